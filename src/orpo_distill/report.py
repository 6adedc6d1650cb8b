"""Reporting: results dicts become the paper's table (Markdown) and PNG plots, for one run, several runs or a sweep.

A run's `results.json` holds `{"task", "teacher", "student", "variants": {NAME: {"accuracy", "std", "n",
"unparsed", "seeds", "per_epoch"}}, "costs", "config"}` (accuracies in 0..1). `write_report` renders one run
(`results.md` + `plots/`), `aggregate` folds per-seed results into one variant entry (mean, sample std),
`report_runs` puts several run directories in one table whose columns are labelled by what differs in their
configs, `sweep_table`/`write_sweep_report` render a hyper-parameter sweep and mark the setting chosen on
*validation* accuracy, and `paper_reference_table` shows the paper's own (secondary-source) numbers. Tables use
the paper's row order and names; plots use matplotlib's object API (no pyplot, no global backend state).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ALL_VARIANTS
from .errors import UserError
from .files import atomic_path, atomic_write_json, atomic_write_text
from .secrets import redact_text

# The paper's names, in the paper's row order (ORPO with teacher negatives is its ablation row).
VARIANT_NAMES: dict[str, str] = {
    "zero_shot": "zero-shot CoT",
    "sft_single": "single-CoT SFT",
    "sft_diverse": "diverse-CoT SFT",
    "orpo_teacher_neg": "ORPO teacher negatives",
    "orpo_off": "off-policy ORPO",
    "orpo_on": "on-policy ORPO",
    "orpo_mixed": "mixed-policy ORPO",
    # beyond the paper
    "orpo_mixed_prefix": "mixed ORPO, rejected after shared prefix",
    "orpo_mixed_firsterr": "mixed ORPO, rejected from first error",
    "orpo_adaptive": "ORPO, adaptive phi",
}
assert tuple(VARIANT_NAMES) == ALL_VARIANTS

# Our task names -> the paper's column names.
PAPER_TASKS: dict[str, str] = {"medqa": "MedQA", "arc_challenge": "ARC-C", "strategyqa": "StrategyQA",
                               "openbookqa": "OBQA", "gsm8k": "GSM8K"}

# ORPO-Distill (arXiv 2509.25100), accuracy %, as given by a secondary source (see docs/METHOD.md).
# Columns: MedQA, ARC-C, StrategyQA, OBQA, GSM8K, avg. Teacher: InternLM2.5-7B-Chat.
PAPER_TEACHER = "InternLM2.5-7B-Chat"
PAPER_RESULTS: dict[str, dict[str, tuple[float | None, ...]]] = {
    "TinyLlama-1.1B": {
        "zero_shot": (29.78, 29.95, 43.52, 26.60, 11.97, 28.36),
        "sft_single": (32.10, 32.63, 46.25, 29.05, 31.56, 34.32),
        "sft_diverse": (34.85, 35.40, 47.84, 33.60, 36.22, 37.58),
        "orpo_off": (38.95, 41.20, 49.77, 37.45, 39.45, 41.36),
        "orpo_on": (35.11, 38.01, 49.24, 35.60, 36.88, 38.97),
        "orpo_mixed": (40.25, 43.55, 51.25, 40.10, 40.72, 43.17),
    },
    "InternLM2.5-1.8B": {
        "zero_shot": (35.82, 37.12, 54.15, 27.40, 41.02, 39.10),
        "sft_single": (37.94, 40.45, 57.50, 41.35, 44.38, 44.32),
        "sft_diverse": (40.56, 42.15, 58.66, 54.50, 47.50, 48.67),
        # The ablation: off-policy ORPO with the teacher's own wrong traces as negatives (MedQA, ARC-C only).
        "orpo_teacher_neg": (41.72, 45.87, None, None, None, None),
        "orpo_off": (49.33, 56.48, 59.39, 53.20, 51.25, 53.93),
        "orpo_on": (43.25, 49.80, 58.50, 52.79, 47.94, 50.46),
        "orpo_mixed": (50.43, 59.32, 61.75, 55.22, 52.47, 55.84),
    },
}
_PAPER_COLUMNS = ("medqa", "arc_challenge", "strategyqa", "openbookqa", "gsm8k")

# Where a question's negatives came from, stacked in this order: the student being trained, an earlier epoch's
# student (the policy's fallback for initial-drawn questions), the initial student, the teacher's wrong traces.
POOL_SOURCES = ("current", "older", "initial", "teacher")
_DASH = "—"


# --------------------------------------------------------------------------------------------------------------
# small pure helpers


def variant_label(name: str) -> str:
    """The paper's name for a variant (unknown names are shown as they are)."""
    return VARIANT_NAMES.get(name, name)


def task_label(task: str) -> str:
    return PAPER_TASKS.get(task, task)


def ordered_variants(names: Sequence[str]) -> list[str]:
    """The paper's order first, then any other variant names in the order given."""
    known = [v for v in ALL_VARIANTS if v in names]
    return known + [v for v in names if v not in VARIANT_NAMES]


def n_seeds(entry: Mapping[str, Any]) -> int:
    seeds = entry.get("seeds")
    return len(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, str) and seeds else 1


def _finite(x: Any) -> float | None:
    """`x` as a float when it is a finite number, else None (NaN, inf, None, bool, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def accuracy_of(entry: Mapping[str, Any] | None) -> float | None:
    """A variant entry's accuracy (0..1), None when missing or when the variant diverged (no accuracy exists)."""
    return None if entry is None else _finite(entry.get("accuracy"))


def is_diverged(entry: Mapping[str, Any] | None) -> bool:
    """Whether every seed of a variant diverged (`"diverged": true`, or a NaN/inf accuracy): it has no accuracy
    and is shown as "diverged", never as 0."""
    if entry is None:
        return False
    acc = entry.get("accuracy")
    return bool(entry.get("diverged")) or (isinstance(acc, float) and not math.isfinite(acc))


def format_accuracy(entry: Mapping[str, Any] | None) -> str:
    """'41.20' (percent), or '41.20 ± 1.35' when the entry has more than one seed; '—' when missing; 'diverged'
    when the variant diverged (with '(k of n seeds diverged)' appended when only some seeds did)."""
    if is_diverged(entry):
        return "diverged"
    acc = accuracy_of(entry)
    if acc is None:
        return _DASH
    acc *= 100.0
    std = _finite(entry.get("std"))
    text = f"{acc:.2f} ± {100.0 * std:.2f}" if n_seeds(entry) > 1 and std is not None else f"{acc:.2f}"
    k = entry.get("diverged_seeds")
    if isinstance(k, int) and k > 0:
        text += f" ({k} of {n_seeds(entry) + k} seeds diverged)"
    return text


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def pool_makeup(pool: Mapping[str, Any]) -> dict[str, Any]:
    """A negative pool's make-up as shares of the questions that got negatives, per source (POOL_SOURCES),
    plus `none` (questions without a negative) and `mean_age`.

    Accepts the results schema (`{"current": share, "initial": share, "teacher": share, "none": count,
    "mean_age": ...}`) or the policy's per-epoch `PoolStats.as_dict()` (`from_current`, ..., `no_negatives`).
    """
    if any(f"from_{s}" in pool for s in POOL_SOURCES):
        counts = {s: float(pool.get(f"from_{s}") or 0) for s in POOL_SOURCES}
        total = sum(counts.values())
        out: dict[str, Any] = {s: (c / total if total else 0.0) for s, c in counts.items()}
        out["none"] = pool.get("no_negatives")
        questions = _finite(pool.get("questions"))
        none = _finite(pool.get("no_negatives"))
        if questions and none is not None:  # of all questions with chosen traces: those left SFT-only
            out["none_share"] = none / questions
    else:
        out = {s: pool.get(s) for s in POOL_SOURCES}
        out["none"] = pool.get("none")
        if _finite(pool.get("none_share")) is not None:
            out["none_share"] = pool.get("none_share")
    out["mean_age"] = pool.get("mean_age")
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    # redact_text: a cell may show a config value (a run's label), and a URL in it must not carry a credential
    esc = [[redact_text(str(c)).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(esc[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# results dicts


def validate_results(results: Mapping[str, Any], source: str = "<results>") -> None:
    """Raise ValueError naming `source`, the variant and the field when `results` does not fit the schema."""
    if not isinstance(results, Mapping):
        raise UserError(f"{source}: results must be a JSON object, got {type(results).__name__}")
    variants = results.get("variants")
    if not isinstance(variants, Mapping) or not variants:
        raise UserError(f"{source}: field 'variants' must be a non-empty object of variant name -> result")
    for name, e in variants.items():
        if not isinstance(e, Mapping):
            raise UserError(f"{source}: variants.{name} must be an object")
        acc = e.get("accuracy")
        if is_diverged(e) and (acc is None or _finite(acc) is None):
            pass  # a diverged variant has no accuracy
        elif not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0.0 <= float(acc) <= 1.0:
            raise UserError(f"{source}: variants.{name}.accuracy must be a number in 0..1 "
                             f"(a fraction, not a percentage; null with \"diverged\": true for a variant that "
                             f"diverged), got {acc!r}")
        for key in ("seeds", "per_epoch"):
            if key in e and e[key] is not None and not isinstance(e[key], list):
                raise UserError(f"{source}: variants.{name}.{key} must be a list")
        for i, ep in enumerate(e.get("per_epoch") or []):
            if not isinstance(ep, Mapping) or "epoch" not in ep:
                raise UserError(f"{source}: variants.{name}.per_epoch[{i}] must be an object with 'epoch'")


def save_results(run_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Validate `results` and write it as `run_dir/results.json` (atomically, strict JSON: a NaN/inf becomes null,
    and a variant whose accuracy is NaN/inf is marked `"diverged": true`)."""
    path = Path(run_dir) / "results.json"
    results = mark_diverged(results)
    validate_results(results, str(path))
    atomic_write_json(path, results)
    return path


def mark_diverged(results: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `results` where each variant with a non-finite accuracy has `accuracy: None, diverged: True`."""
    out = dict(results)
    variants = results.get("variants")
    if isinstance(variants, Mapping):
        out["variants"] = {name: ({**e, "accuracy": None, "diverged": True} if isinstance(e, Mapping)
                                  and is_diverged(e) else e) for name, e in variants.items()}
    return out


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`run_dir/results.json` (or the file itself when given one), validated."""
    p = Path(run_dir)
    path = p if p.is_file() else p / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (has the run finished?)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    validate_results(results, str(path))
    return results


def _get(r: Any, key: str) -> Any:
    return r.get(key) if isinstance(r, Mapping) else getattr(r, key, None)


def aggregate(seed_results: Sequence[Mapping[str, Any] | Any]) -> dict[str, Any]:
    """One variant entry from its per-seed results (dicts or `EvalResult`s with `accuracy`, `n`, `unparsed`,
    optionally `per_epoch`).

    accuracy = mean over seeds, std = sample standard deviation (ddof 1; 0.0 for one seed), seeds = the per-seed
    accuracies, unparsed = mean count per seed, per_epoch = per-epoch means over the seeds that have that epoch
    (with `accuracy_std` where several seeds have an accuracy). All seeds must have the same `n`.
    """
    if not seed_results:
        raise ValueError("aggregate: no seed results")
    accs: list[float] = []
    diverged = 0
    for i, r in enumerate(seed_results):
        a = _get(r, "accuracy")
        if _get(r, "diverged") or (isinstance(a, float) and not math.isfinite(a)):
            diverged += 1  # no accuracy exists for a diverged seed: not averaged in as 0
            continue
        if not isinstance(a, (int, float)) or isinstance(a, bool):
            raise ValueError(f"aggregate: seed result {i} has no numeric 'accuracy' (got {a!r})")
        accs.append(float(a))
    if not accs:
        return {"accuracy": None, "std": None, "diverged": True, "diverged_seeds": diverged, "seeds": [],
                "n": _get(seed_results[0], "n")}
    seed_results = [r for r in seed_results if _finite(_get(r, "accuracy")) is not None
                    and not _get(r, "diverged")]
    ns = {_get(r, "n") for r in seed_results}
    if len(ns) > 1:
        raise ValueError(f"aggregate: seeds were evaluated on different numbers of questions {sorted(ns, key=str)}; "
                         "every seed must use the same test split")
    mean, std = _mean_std(accs)
    unparsed = [float(u) for u in (_get(r, "unparsed") for r in seed_results) if u is not None]
    out: dict[str, Any] = {"accuracy": mean, "std": std, "n": ns.pop(),
                           "unparsed": (sum(unparsed) / len(unparsed)) if unparsed else None, "seeds": accs}
    seed_ids = [_get(r, "seed") for r in seed_results]
    if all(s is not None for s in seed_ids):
        out["seed_ids"] = seed_ids
    if diverged:
        out["diverged_seeds"] = diverged
    epochs = [list(_get(r, "per_epoch") or []) for r in seed_results]
    if any(epochs):
        out["per_epoch"] = _aggregate_epochs(epochs)
    return out


def _mean_of(values: Sequence[Any]) -> float | None:
    xs = [x for x in map(_finite, values) if x is not None]
    return sum(xs) / len(xs) if xs else None


def _aggregate_epochs(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    by_epoch: dict[Any, list[Mapping[str, Any]]] = {}
    for eps in per_seed:
        for ep in eps:
            by_epoch.setdefault(ep["epoch"], []).append(ep)
    out = []
    for epoch in sorted(by_epoch, key=lambda e: (not isinstance(e, (int, float)), e)):
        rows = by_epoch[epoch]
        agg: dict[str, Any] = {"epoch": epoch}
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("epoch", "pool")]
        for k in keys:
            agg[k] = _mean_of([r.get(k) for r in rows])
        accs = [x for x in (_finite(r.get("accuracy")) for r in rows) if x is not None]
        if len(accs) > 1:
            agg["accuracy_std"] = _mean_std(accs)[1]
        pools = [pool_makeup(r["pool"]) for r in rows if isinstance(r.get("pool"), Mapping)]
        if pools:
            pkeys = dict.fromkeys(k for p in pools for k in p)
            agg["pool"] = {k: _mean_of([p.get(k) for p in pools]) for k in pkeys if any(
                p.get(k) is not None for p in pools)}
        agg["n_seeds"] = len(rows)
        out.append(agg)
    return out


# --------------------------------------------------------------------------------------------------------------
# one run


def results_table(results: Mapping[str, Any]) -> str:
    """The paper's layout for one run: rows = variants (paper order and names), one column for the task."""
    variants = results["variants"]
    col = task_label(str(results.get("task", "accuracy")))
    rows = [[variant_label(v), format_accuracy(variants[v])] for v in ordered_variants(list(variants))]
    return _md_table(["setting", col], rows)


def model_label(model: Any) -> str:
    """A model's name for titles: hub ids as they are, a local absolute path shortened to its last two parts
    (`.../demo/assets/teacher` -> `assets/teacher`); results.json keeps the full path."""
    text = str(model)
    parts = Path(text).parts
    return "/".join(parts[-2:]) if Path(text).is_absolute() and len(parts) > 2 else text


def _run_header(results: Mapping[str, Any]) -> list[str]:
    variants = results["variants"]
    ns = sorted({e.get("n") for e in variants.values() if e.get("n") is not None})
    seeds = sorted({n_seeds(e) for e in variants.values()})
    parts = [f"teacher: `{results.get('teacher', '?')}`", f"student: `{results.get('student', '?')}`",
             f"task: `{results.get('task', '?')}`",
             "test questions (n): " + (", ".join(str(n) for n in ns) if ns else "?"),
             "seeds: " + ", ".join(str(s) for s in seeds)]
    return parts


def _eval_note(results: Mapping[str, Any]) -> str:
    cfg = results.get("config") or {}
    ev = cfg.get("eval") or {}
    k = ev.get("majority_k", 1)
    how = f"majority vote over {k} samples" if isinstance(k, int) and k > 1 else "greedy decoding"
    split = ev.get("split", "test")
    return (f"Accuracy (%) on the {split} split, {how}. With more than one seed: mean ± sample standard "
            "deviation over seeds (each seed trains the variant again from the same initial student).")


def _details_table(results: Mapping[str, Any]) -> str:
    variants = results["variants"]
    rows = []
    for v in ordered_variants(list(variants)):
        e = variants[v]
        seeds = e.get("seeds") or []
        up = e.get("unparsed")
        acc, std = accuracy_of(e), _finite(e.get("std"))
        rows.append([variant_label(v), "diverged" if is_diverged(e) else f"{100 * acc:.2f}" if acc is not None
                     else _DASH,
                     f"{100 * std:.2f}" if std is not None and n_seeds(e) > 1 else _DASH,
                     str(n_seeds(e)), _fmt_value(e.get("n")) if e.get("n") is not None else _DASH,
                     _fmt_value(up) if up is not None else _DASH,
                     ", ".join(f"{100 * float(s):.2f}" for s in seeds) if seeds else _DASH])
    return _md_table(["setting", "accuracy %", "std", "seeds", "n", "unparsed", "per-seed accuracy %"], rows)


def _epochs_table(results: Mapping[str, Any]) -> str | None:
    variants = results["variants"]
    rows = []
    pools_seen = [pool_makeup(ep["pool"]) for v in variants.values() for ep in v.get("per_epoch") or []
                  if isinstance(ep.get("pool"), Mapping)]
    sources = [s for s in POOL_SOURCES if s != "older" or any(p.get("older") for p in pools_seen)]
    for v in ordered_variants(list(variants)):
        for ep in variants[v].get("per_epoch") or []:
            pool = pool_makeup(ep["pool"]) if isinstance(ep.get("pool"), Mapping) else {}

            def share(k: str, pool: Mapping[str, Any] = pool) -> str:
                x = pool.get(k)
                return f"{100 * float(x):.0f}%" if isinstance(x, (int, float)) else _DASH

            acc = _finite(ep.get("accuracy"))
            loss = _finite(ep.get("loss"))
            none = pool.get("none")
            age = pool.get("mean_age")
            rows.append([variant_label(v), str(ep["epoch"]),
                         f"{100 * acc:.2f}" if acc is not None else _DASH,
                         f"{loss:.4f}" if loss is not None else ("diverged" if ep.get("loss") is not None
                                                                 else _DASH),
                         *[share(src) for src in sources],
                         _fmt_value(none) if none is not None else _DASH,
                         f"{float(age):.2f}" if isinstance(age, (int, float)) else _DASH])
    if not rows:
        return None
    return _md_table(["setting", "epoch", "accuracy %", "loss", *[f"neg. {src}" for src in sources],
                      "no negative", "mean neg. age"], rows)


def _costs_table(costs: Mapping[str, Any]) -> str | None:
    """Stages whose costs are a mapping of measures (teacher, student_initial, student_refresh, training) as one
    row each, stages that share their measures in one table; scalars in a two-column table."""
    if not costs:
        return None
    groups: dict[tuple[str, ...], list[tuple[str, Mapping[str, Any]]]] = {}
    scalars: dict[str, Any] = {}
    for k, v in costs.items():
        if isinstance(v, Mapping) and v and not any(isinstance(x, Mapping) for x in v.values()):
            groups.setdefault(tuple(v), []).append((k, v))
        elif isinstance(v, Mapping):
            scalars.update({f"{k}.{fk}": fv for fk, fv in _flatten(v).items()})
        else:
            scalars[k] = v
    parts = [_md_table(["stage", *cols], [[name, *[_fmt_value(v[c]) for c in cols]] for name, v in rows])
             for cols, rows in groups.items()]
    if scalars:
        parts.append(_md_table(["cost", "value"], [[k, _fmt_value(v)] for k, v in scalars.items()]))
    return "\n\n".join(parts)


def render_results_md(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole `results.md` of one run; `plots` are paths relative to the run directory."""
    task = str(results.get("task", "?"))
    out = [f"# ORPO-Distill results: {task}", "", " · ".join(_run_header(results)), "",
           results_table(results), _eval_note(results), ""]
    out += ["## Per variant", "", _details_table(results)]
    ep = _epochs_table(results)
    if ep:
        out += ["## By epoch", "", "Accuracy and training loss after each epoch; the negative pool's make-up is "
                "the share of questions whose rejected traces came from the current student, the initial student "
                "or the teacher, the count of questions left without a negative (trained with SFT only), and the "
                "mean age (epochs) of the negatives. Averaged over seeds.", "", ep]
    costs = _costs_table(results.get("costs") or {})
    if costs:
        out += ["## Costs", "", costs]
    teachers = [t for t in results.get("teachers") or [] if isinstance(t, Mapping)]
    if len(teachers) > 1:  # several teachers (results.json `teachers`, sampling/stage.teacher_stats)
        out += ["## Teachers", "", "Each teacher's stored traces (its own K), correct rate, correct traces its own "
                "ROUGE-L filter kept, how many of those the filter across the pool kept (teachers in config order), "
                "tokens and cost.", "",
                _md_table(["teacher", "backend", "k", "traces", "correct", "kept correct", "pooled chosen",
                           "completion tokens", "errors", "cost $"],
                          [[str(t.get("teacher")), str(t.get("backend")), str(t.get("k")), str(t.get("traces")),
                            f"{100 * float(t.get('correct_rate') or 0):.1f}%", str(t.get("kept_correct")),
                            str(t.get("pooled_chosen")), str(t.get("completion_tokens")), str(t.get("errors")),
                            f"{float(t.get('cost_usd') or 0):.4f}"] for t in teachers]), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots] + [""]
    if task in PAPER_TASKS:
        out += ["## For comparison: the paper's numbers", "", paper_reference_table([task])]
    return "\n".join(out).rstrip() + "\n"


def write_report(run_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> list[Path]:
    """Write `run_dir/results.md` and `run_dir/plots/*.png` from a results dict; returns the files written.

    Plots: accuracy by variant (bars with ± std), accuracy and loss by epoch per variant, and the negative
    pool's make-up by epoch for each ORPO variant (a plot is skipped when the results have no data for it).
    """
    run_dir = Path(run_dir)
    results = mark_diverged(results)
    validate_results(results, str(run_dir / "results.json"))
    plots_dir = run_dir / "plots"
    written = plot_run(results, plots_dir)
    md = run_dir / "results.md"
    atomic_write_text(md, render_results_md(results, [p.relative_to(run_dir).as_posix() for p in written]))
    return [md, *written]


# --------------------------------------------------------------------------------------------------------------
# plots


def _colors() -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i) for i, v in enumerate(ALL_VARIANTS)}


def _color(name: str, i: int = 0) -> Any:
    from matplotlib import colormaps

    return _colors().get(name) or colormaps["tab20"]((len(ALL_VARIANTS) + i) % 20)


def _save(fig: Any, path: Path) -> Path:
    # format= because the temporary name has no .png suffix; a failed or interrupted savefig leaves no temp file.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def model_title(model: Any) -> str:
    """A model's name for plot titles: a local folder by its name and architecture from its config.json
    ("student (llama, 2 x 128, 0.4M)"), anything else as `model_label` gives it."""
    if isinstance(model, (list, tuple)):
        return " + ".join(model_title(m) for m in model)
    text = str(model)
    cfg_path = Path(text) / "config.json"
    try:
        c = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else None
    except (OSError, ValueError):
        c = None
    if not isinstance(c, dict):
        return model_label(model)
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    hidden = c.get("hidden_size") or c.get("n_embd")
    size = f", {layers} x {hidden}" if layers and hidden else ""
    params = _safetensors_params(Path(text) / "model.safetensors")
    count = f", {params / 1e6:.2f}M params" if params else ""
    return f"{Path(text).name} ({c.get('model_type', '?')}{size}{count})"


def _safetensors_params(path: Path) -> int | None:
    """Parameters in a safetensors file, from its header alone (no tensor is read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 1 << 26 else {}
    except (OSError, ValueError):
        return None
    total = 0
    for name, meta in header.items():
        if name != "__metadata__" and isinstance(meta, dict):
            total += math.prod(int(d) for d in meta.get("shape", []))
    return total or None


def _title(results: Mapping[str, Any]) -> str:
    return (f"{results.get('task', '')}: {model_title(results.get('student', '?'))} taught by "
            f"{model_title(results.get('teacher', '?'))}")


def plot_run(results: Mapping[str, Any], plots_dir: str | os.PathLike[str]) -> list[Path]:
    """The PNG plots of one run into `plots_dir`; returns the files written."""
    plots_dir = Path(plots_dir)
    out = [plot_accuracy_by_variant(results, plots_dir / "accuracy_by_variant.png")]
    p = plot_epochs(results, plots_dir / "accuracy_loss_by_epoch.png")
    if p:
        out.append(p)
    p = plot_negative_pool(results, plots_dir / "negative_pool_by_epoch.png")
    if p:
        out.append(p)
    return out


def plot_accuracy_by_variant(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    from matplotlib.figure import Figure

    variants = results["variants"]
    names = ordered_variants(list(variants))
    # A diverged variant has no bar (height 0) and is labelled "diverged", not "0.0".
    accs = [100 * (accuracy_of(variants[v]) or 0.0) for v in names]
    errs = [100 * (_finite(variants[v].get("std")) or 0.0) if n_seeds(variants[v]) > 1 else 0.0 for v in names]
    gone = [accuracy_of(variants[v]) is None for v in names]
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    bars = ax.bar(xs, accs, yerr=errs, capsize=4, color=[_color(v, i) for i, v in enumerate(names)],
                  edgecolor="black", linewidth=0.5)
    for b, a, e, g, v in zip(bars, accs, errs, gone, names, strict=True):
        label = ("diverged" if is_diverged(variants[v]) else "n/a") if g else f"{a:.1f}" + (f"±{e:.1f}" if e else "")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, a + e),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [variant_label(v) for v in names], rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    top = max((a + e for a, e in zip(accs, errs, strict=True)), default=0.0)
    ax.set_ylim(0, min(100.0, top * 1.15 + 5))
    seeds = max(n_seeds(variants[v]) for v in names)
    sub = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    ax.set_title(f"{_title(results)}\naccuracy by variant ({sub})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, Path(path))


def plot_epochs(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Accuracy after each epoch (shaded: ± std over the seeds), then the losses on their own axes: the NLL of the
    chosen traces (an SFT variant's whole loss, an ORPO variant's L_SFT part) and ORPO's odds-ratio term L_OR,
    which have different scales and meanings. An ORPO entry without its parts logged shows its total loss in the
    third panel, named so."""
    from matplotlib.figure import Figure

    variants = results["variants"]
    series = {v: variants[v].get("per_epoch") or [] for v in ordered_variants(list(variants))}
    series = {v: eps for v, eps in series.items() if eps}
    if not series:
        return None

    def pts(eps: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> list[tuple[Any, float]]:
        return [(ep["epoch"], scale * x) for ep in eps if (x := _finite(ep.get(key))) is not None]

    def is_orpo(eps: Sequence[Mapping[str, Any]]) -> bool:
        return any(_finite(ep.get(k)) is not None for ep in eps for k in ("l_or", "log_odds", "pref_acc"))

    has_orpo = any(is_orpo(eps) for eps in series.values())
    fig = Figure(figsize=(15 if has_orpo else 11, 4.4))
    axes = fig.subplots(1, 3 if has_orpo else 2)
    ax_acc, ax_nll = axes[0], axes[1]
    ax_or = axes[2] if has_orpo else None
    seeds = max((int(ep.get("n_seeds") or 1) for eps in series.values() for ep in eps), default=1)
    or_total = False
    for i, (v, eps) in enumerate(series.items()):
        c = _color(v, i)
        acc = pts(eps, "accuracy", 100.0)
        if acc:
            ax_acc.plot(*zip(*acc, strict=True), marker="o", color=c, label=variant_label(v))
            errs = [100 * (_finite(ep.get("accuracy_std")) or 0.0) for ep in eps
                    if _finite(ep.get("accuracy")) is not None]
            if any(errs):
                ax_acc.fill_between([p[0] for p in acc], [p[1] - e for p, e in zip(acc, errs, strict=True)],
                                    [p[1] + e for p, e in zip(acc, errs, strict=True)], color=c, alpha=0.15)
        orpo = is_orpo(eps)
        nll = pts(eps, "nll") if orpo else pts(eps, "loss")
        if nll:
            ax_nll.plot(*zip(*nll, strict=True), marker="o", color=c, linestyle="--" if orpo else "-",
                        label=variant_label(v))
        if orpo and ax_or is not None:
            lor = pts(eps, "l_or")
            if not lor:
                lor, or_total = pts(eps, "loss"), True
            if lor:
                ax_or.plot(*zip(*lor, strict=True), marker="o", color=c, label=variant_label(v))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)" if _eval_split(results) == "test" else "accuracy (%)")
    band = f"; band: ± std over {seeds} seeds" if seeds > 1 else " (one seed)"
    ax_acc.set_title(f"accuracy after each epoch (mean{band})" if seeds > 1 else f"accuracy after each epoch{band}",
                     fontsize=9)
    ax_nll.set_xlabel("epoch")
    ax_nll.set_ylabel("mean NLL per completion token (epoch mean)")
    ax_nll.set_title("NLL of the chosen (teacher) traces\nsolid: SFT loss; dashed: L_SFT part of ORPO", fontsize=9)
    if ax_or is not None:
        ax_or.set_xlabel("epoch")
        ax_or.set_ylabel("L_OR = -log sigmoid(log odds ratio)" if not or_total else "ORPO loss")
        ax_or.set_title("ORPO odds-ratio term L_OR (epoch mean)\nln 2 = 0.69: chosen and rejected equally likely"
                        if not or_total else "ORPO total loss L_SFT + lambda L_OR (parts not logged)", fontsize=9)
        if not or_total:
            ax_or.axhline(math.log(2), color="grey", linewidth=0.8, linestyle=":")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_nll.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle(_title(results), fontsize=10)
    fig.subplots_adjust(bottom=0.27, top=0.8, wspace=0.3)
    return _save(fig, Path(path))


def _eval_split(results: Mapping[str, Any]) -> str:
    return str(((results.get("config") or {}).get("eval") or {}).get("split", ""))


def plot_negative_pool(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Stacked bars per ORPO variant and epoch: the share of questions whose negatives came from the current
    student, an earlier epoch's, the initial student or the teacher, and (hatched) the share left without any
    negative, trained SFT-only that epoch (older results without that share: its count above the bar)."""
    from matplotlib.figure import Figure

    variants = results["variants"]
    series = {}
    for v in ordered_variants(list(variants)):
        eps = [{"epoch": ep["epoch"], "pool": pool_makeup(ep["pool"])} for ep in variants[v].get("per_epoch") or []
               if isinstance(ep.get("pool"), Mapping)]
        if eps:
            series[v] = eps
    if not series:
        return None
    src_colors = {"current": "#d62728", "older": "#ff9896", "initial": "#1f77b4", "teacher": "#7f7f7f"}
    src_labels = {"current": "current student", "older": "earlier epoch's student", "initial": "initial student",
                  "teacher": "teacher"}
    sources = [s for s in POOL_SOURCES if s != "older" or any(ep["pool"].get("older") for eps in series.values()
                                                               for ep in eps)]
    # Questions left without a negative (trained SFT-only that epoch) are their own share of the bar, so the
    # sources' shares are scaled to the questions that did get one; an old results file without the share of
    # questions only says how many.
    with_share = all(_finite(ep["pool"].get("none_share")) is not None for eps in series.values() for ep in eps)
    cols = min(4, len(series))  # rows of at most four panels: seven ORPO rows stay readable
    rows = -(-len(series) // cols)
    fig = Figure(figsize=(max(4.0, 3.6 * cols), 0.6 + 3.4 * rows))
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(series):]:
        ax.set_visible(False)
    for ax, (v, eps) in zip(axes, series.items()):
        xs = [ep["epoch"] for ep in eps]
        bottom = [0.0] * len(eps)
        got = [1.0 - float(ep["pool"]["none_share"]) if with_share else 1.0 for ep in eps]
        for src in sources:
            vals = [100 * g * float(ep["pool"].get(src) or 0.0) for g, ep in zip(got, eps, strict=True)]
            ax.bar(xs, vals, bottom=bottom, color=src_colors[src], label=src_labels[src], edgecolor="white",
                   linewidth=0.5)
            bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
        if with_share:
            vals = [100 * (1.0 - g) for g in got]
            ax.bar(xs, vals, bottom=bottom, color="white", hatch="///", edgecolor="#555555", linewidth=0.5,
                   label="no negative (SFT only)")
            for x, b, val in zip(xs, bottom, vals, strict=True):
                if val >= 6:
                    ax.annotate(f"{val:.0f}%", (x, b + val / 2), ha="center", va="center", fontsize=7)
        else:
            for x, top, ep in zip(xs, bottom, eps, strict=True):
                none = ep["pool"].get("none")
                if isinstance(none, (int, float)) and none > 0:
                    ax.annotate(f"none: {none:g}", (x, top), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=7)
        ax.set_title(variant_label(v), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xticks(xs)
        ax.set_ylim(0, 112)
    for row in grid:
        row[0].set_ylabel("share of questions (%)" if with_share else "share of questions' negatives (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{_title(results)}\nwhere each epoch's rejected traces came from", fontsize=10)
    fig.subplots_adjust(bottom=0.25 / rows, top=1 - 0.2 / rows, hspace=0.45)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------------------------
# several runs

_IGNORED_KEYS = ("run.out_dir",)


def _short_key(k: str) -> str:
    return {"student.model": "student", "teacher.model": "teacher", "task.name": "task"}.get(k, k)


def _run_config(results: Mapping[str, Any]) -> dict[str, Any]:
    flat = _flatten(results.get("config") or {})
    flat.setdefault("teacher.model", results.get("teacher"))
    flat.setdefault("student.model", results.get("student"))
    flat.setdefault("task.name", results.get("task"))
    return flat


def describe_differences(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(group label per run, the config keys that label them) for runs to be shown side by side.

    A run's label lists the config keys whose values differ between the runs, except keys that only differ
    because the task differs (those are the table's task columns): e.g. `student=TinyLlama, policy.phi=0.5`.
    """
    flats = [_run_config(r) for r in runs]
    tasks = [str(r.get("task", "?")) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    differing = []
    for k in keys:
        if k in _IGNORED_KEYS:
            continue
        vals = {json.dumps(f.get(k, "<unset>"), sort_keys=True, default=str) for f in flats}
        if len(vals) < 2:
            continue
        if k.startswith("task.") or k == "task":
            per_task: dict[str, set[str]] = {}
            for f, t in zip(flats, tasks, strict=True):
                per_task.setdefault(t, set()).add(json.dumps(f.get(k, "<unset>"), sort_keys=True, default=str))
            if all(len(s) == 1 for s in per_task.values()):
                continue  # explained by the task columns
        differing.append(k)
    labels = [redact_text(", ".join(f"{_short_key(k)}={_fmt_value(f.get(k, '<unset>'))}" for k in differing))
              for f in flats]
    return labels, differing


def runs_table(runs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """One Markdown table across runs, and its data as a dict (`layout`, `columns`, `rows`).

    One kind of run, several tasks: rows = variants, columns = tasks + avg (the paper's layout).
    One task, several kinds of run (e.g. phi, lambda, student): columns = the runs, labelled by what differs.
    Several of both: a block of rows per kind of run (like the paper's TinyLlama / InternLM blocks), columns =
    tasks + avg. `names` (e.g. the run directories) label runs whose configs do not differ.
    """
    groups, _ = describe_differences(runs)
    tasks_of = [str(r.get("task", "?")) for r in runs]
    # Two runs with the same group and task: tell them apart by name.
    seen: dict[tuple[str, str], int] = {}
    for g, t in zip(groups, tasks_of, strict=True):
        seen[(g, t)] = seen.get((g, t), 0) + 1
    groups = [(f"{g} ({n})" if g else n) if seen[(g, t)] > 1 else g for g, t, n in zip(groups, tasks_of, names, strict=True)]
    tasks = list(dict.fromkeys(tasks_of))
    group_list = list(dict.fromkeys(groups))
    cell = {(g, t): r for g, t, r in zip(groups, tasks_of, runs, strict=True)}
    all_variants = ordered_variants(list(dict.fromkeys(v for r in runs for v in r["variants"])))

    def entry(g: str, t: str, v: str) -> Mapping[str, Any] | None:
        r = cell.get((g, t))
        return None if r is None else r["variants"].get(v)

    def avg(g: str, v: str) -> str:
        es = [entry(g, t, v) for t in tasks]
        if any(is_diverged(e) for e in es):
            return "diverged"
        accs = [accuracy_of(e) for e in es]
        if any(a is None for a in accs):
            return _DASH
        return f"{100 * sum(accs) / len(accs):.2f}"

    def acc_std(e: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
        acc = accuracy_of(e)
        if e is None or acc is None:
            return None, None
        std = _finite(e.get("std"))
        return acc, (std if n_seeds(e) > 1 else None)

    data: dict[str, Any] = {"rows": []}
    if len(group_list) > 1 and len(tasks) == 1:
        t = tasks[0]
        data.update(layout="runs_as_columns", columns=group_list, task=t)
        header = [f"setting ({task_label(t)})", *group_list]
        rows = []
        for v in all_variants:
            es = [entry(g, t, v) for g in group_list]
            rows.append([variant_label(v), *[format_accuracy(e) for e in es]])
            data["rows"].append({"variant": v, "cells": [acc_std(e)[0] for e in es],
                                 "stds": [acc_std(e)[1] for e in es]})
        return _md_table(header, rows), data
    with_avg = len(tasks) > 1
    blocks = len(group_list) > 1
    header = (["run"] if blocks else []) + ["setting", *[task_label(t) for t in tasks]] + (["avg"] if with_avg else [])
    data.update(layout="tasks_as_columns", columns=tasks, groups=group_list)
    rows = []
    for g in group_list:
        first = True
        for v in all_variants:
            es = [entry(g, t, v) for t in tasks]
            if all(e is None for e in es):
                continue
            # the run's label on its block's first row only, like the paper's "TinyLlama-1.1B zero-shot CoT"
            row = ([g if first else ""] if blocks else []) + [variant_label(v), *[format_accuracy(e) for e in es]]
            first = False
            if with_avg:
                row.append(avg(g, v))
            rows.append(row)
            data["rows"].append({"group": g, "variant": v, "cells": [acc_std(e)[0] for e in es],
                                 "stds": [acc_std(e)[1] for e in es]})
    n_left = 2 if blocks else 1
    return _md_table(header, rows, ["---"] * n_left + ["---:"] * (len(header) - n_left)), data


def report_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One table (`out_dir/report.md`, data in `report.json`) and a grouped bar plot across several run dirs,
    each read from `DIR/results.json`; returns the files written."""
    if not run_dirs:
        raise UserError("report_runs: no run directories given")
    dirs = [Path(d) for d in run_dirs]
    runs = [load_results(d) for d in dirs]
    names = [d.name if d.is_dir() else d.parent.name for d in dirs]
    table, data = runs_table(runs, names)
    _, differing = describe_differences(runs)
    out_dir = Path(out_dir)
    common = []
    for key, label in (("teacher", "teacher"), ("student", "student"), ("task", "task")):
        vals = list(dict.fromkeys(str(r.get(key, "?")) for r in runs))
        if len(vals) == 1:
            common.append(f"{label}: `{vals[0]}`")
    lines = ["# ORPO-Distill: results across runs", ""]
    if common:
        lines += ["Common to all runs: " + " · ".join(common), ""]
    what = [f"`{k}`" for k in differing]
    if len({str(r.get("task", "?")) for r in runs}) > 1:
        what.insert(0, "the task (the columns)")
    lines += ["Runs differ in: " + (", ".join(what) if what else "nothing in their configs (labelled by "
                                                                 "directory)"), ""]
    lines += [table, "Accuracy (%); mean ± sample std over seeds where a run has more than one seed.", ""]
    lines += ["## Runs", "", _md_table(["directory", "task", "teacher", "student", "n", "seeds"], [
        [str(d), str(r.get("task", "?")), str(r.get("teacher", "?")), str(r.get("student", "?")),
         ", ".join(str(x) for x in sorted({e.get("n") for e in r["variants"].values()}, key=str)),
         ", ".join(str(x) for x in sorted({n_seeds(e) for e in r["variants"].values()}))]
        for d, r in zip(dirs, runs, strict=True)], ["---"] * 4 + ["---:"] * 2)]
    plot = plot_runs(data, out_dir / "plots" / "accuracy_across_runs.png")
    lines += ["## Plot", "", f"![accuracy across runs]({plot.relative_to(out_dir).as_posix()})", ""]
    md = out_dir / "report.md"
    atomic_write_text(md, "\n".join(lines).rstrip() + "\n")
    js = out_dir / "report.json"
    atomic_write_json(js, {"runs": [str(d) for d in dirs], "differing_keys": differing, **data}, default=str)
    return [md, js, plot]


def plot_runs(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bars: x = variants; one bar per column of the table (per run, or per task and kind of run)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = data["rows"]
    if data["layout"] == "runs_as_columns":
        series_labels = list(data["columns"])
        variants = [r["variant"] for r in rows]
        values = {s: [r["cells"][j] for r in rows] for j, s in enumerate(series_labels)}
        stds = {s: [r["stds"][j] for r in rows] for j, s in enumerate(series_labels)}
    else:
        groups = data["groups"]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        series_labels, values, stds = [], {}, {}
        for g in groups:
            for j, t in enumerate(data["columns"]):
                label = " / ".join(x for x in (g if len(groups) > 1 else "", task_label(t)) if x)
                series_labels.append(label)
                lookup = {r["variant"]: (r["cells"][j], r["stds"][j]) for r in rows if r["group"] == g}
                values[label] = [lookup.get(v, (None, None))[0] for v in variants]
                stds[label] = [lookup.get(v, (None, None))[1] for v in variants]
    fig = Figure(figsize=(min(16.0, max(7.0, 0.45 * len(variants) * max(1, len(series_labels)) + 3)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series_labels))
    cmap = colormaps["tab10"]
    for j, s in enumerate(series_labels):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(variants))]
        ys = [100 * float(x) if x is not None else 0.0 for x in values[s]]
        errs = [100 * float(e) if e is not None else 0.0 for e in stds[s]]
        ax.bar(xs, ys, width=width * 0.95, yerr=errs if any(errs) else None, capsize=2, color=cmap(j % 10),
               label=s, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(variants)), [variant_label(v) for v in variants], rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("accuracy by variant across runs", fontsize=10)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------------------------
# sweeps


def _cell_stats(xs: Any) -> tuple[float, float, int] | None:
    if xs is None:
        return None
    if isinstance(xs, (int, float)) and not isinstance(xs, bool):
        xs = [xs]
    vals = [x for x in map(_finite, xs) if x is not None]  # a diverged seed has no accuracy
    if not vals:
        return None
    m, s = _mean_std(vals)
    return m, s, len(vals)


def best_cell(cells: Sequence[Mapping[str, Any]]) -> int:
    """Index of the cell with the highest mean VALIDATION accuracy (ties: the earlier cell).

    Test accuracy is never looked at. Cells without validation accuracy cannot be chosen; when no cell has
    any, this is an error rather than a silent fallback to test.
    """
    best, best_val = -1, -math.inf
    for i, c in enumerate(cells):
        st = _cell_stats(c.get("validation"))
        if st is not None and st[0] > best_val:
            best, best_val = i, st[0]
    if best < 0:
        raise UserError("no sweep cell has validation accuracy; the best setting must be chosen on a validation "
                         "split (set task.validation), never on test")
    return best


def chosen_cells(cells: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The chosen cell index per variant (`best_cell` within each variant's cells; key "" when cells name no
    variant). Variants whose cells have no validation accuracy get no choice; none at all is an error."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault(str(c["variant"]) if "variant" in c else "", []).append(i)
    chosen: dict[str, int] = {}
    for v, idx in groups.items():
        try:
            chosen[v] = idx[best_cell([cells[i] for i in idx])]
        except ValueError:
            continue
    if not chosen:
        best_cell([])  # raises the explanatory error
    return chosen


def sweep_table(cells: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per cell (its overridden keys, validation and test accuracy as mean ± std over seeds),
    the best cell on validation marked. Each cell: `{"overrides": {key: value}, "validation": [acc per seed],
    "test": [acc per seed]}` (accuracies 0..1), optionally `"variant"`; with variants, the best is chosen
    per variant."""
    if not cells:
        raise ValueError("sweep_table: no cells")
    keys = list(dict.fromkeys(k for c in cells for k in (c.get("overrides") or {})))
    has_variant = any("variant" in c for c in cells)
    best = set(chosen_cells(cells).values())

    def fmt(xs: Any) -> str:
        st = _cell_stats(xs)
        if st is None:
            return _DASH
        m, s, k = st
        return f"{100 * m:.2f} ± {100 * s:.2f}" if k > 1 else f"{100 * m:.2f}"

    header = (["variant"] if has_variant else []) + keys + ["validation %", "test %", "seeds", "chosen"]
    rows = []
    for i, c in enumerate(cells):
        ov = c.get("overrides") or {}
        st = _cell_stats(c.get("test")) or _cell_stats(c.get("validation"))
        rows.append(([variant_label(str(c.get("variant")))] if has_variant else [])
                    + [_fmt_value(ov[k]) if k in ov else _DASH for k in keys]
                    + [fmt(c.get("validation")), fmt(c.get("test")), str(st[2] if st else 0),
                       "**best (validation)**" if i in best else ""])
    n_left = len(keys) + (1 if has_variant else 0)
    return _md_table(header, rows, ["---"] * n_left + ["---:"] * 3 + ["---"])


def sweep_labels(cells: Sequence[Mapping[str, Any]], sep: str = "\n") -> list[str]:
    """One x-axis label per cell, its overridden keys joined by `sep`: the key's last part when that is
    unambiguous (`phi=0.5`, not `policy.phi=0.5`), and the variant first when the cells' variants differ."""
    keys = list(dict.fromkeys(k for c in cells for k in (c.get("overrides") or {})))
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails)}
    several = len({str(c.get("variant")) for c in cells}) > 1
    labels = []
    for c in cells:
        lines = [f"{short[k]}={_fmt_value(v)}" for k, v in (c.get("overrides") or {}).items()]
        if several and "variant" in c:
            lines.insert(0, variant_label(str(c["variant"])))
        labels.append(sep.join(lines) or "(defaults)")
    return labels


def write_sweep_report(out_dir: str | os.PathLike[str], cells: Sequence[Mapping[str, Any]],
                       title: str = "sweep") -> list[Path]:
    """`out_dir/sweep.md` (the sweep table), `sweep.json` (the cells and the chosen index) and a plot of
    validation and test accuracy per cell; returns the files written."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    table = sweep_table(cells)
    chosen = chosen_cells(cells)
    labels = sweep_labels(cells)
    # a label a line per key fits under its bars up to ~14 characters a line; longer ones go on one slanted line
    slanted = max(len(line) for label in labels for line in label.split("\n")) > 14
    if slanted:
        labels = sweep_labels(cells, sep=", ")
    variants = {str(c["variant"]) for c in cells if "variant" in c}
    if len(variants) == 1 and all("variant" in c for c in cells):  # one variant: said once, in the title (by
        title = f"{title} of variant {variants.pop()}"  # its name: a swept phi makes orpo_mixed off- or on-policy)
    depth = 0.065 * max(map(len, labels)) if slanted else 0.16 * max(s.count("\n") + 1 for s in labels)
    fig = Figure(figsize=(max(6.0, 0.9 * len(cells) + 2), 4.0 + depth))
    ax = fig.add_subplot()
    for j, (split, color) in enumerate((("validation", "#2ca02c"), ("test", "#9467bd"))):
        stats = [_cell_stats(c.get(split)) for c in cells]
        xs = [i - 0.2 + 0.4 * j for i in range(len(cells))]
        ax.bar(xs, [100 * s[0] if s else 0.0 for s in stats], width=0.38,
               yerr=[100 * s[1] if s else 0.0 for s in stats], capsize=3, color=color, label=split)
    for k, i in enumerate(sorted(chosen.values())):
        ax.axvspan(i - 0.5, i + 0.5, color="gold", alpha=0.3, zorder=0,
                   label="chosen on validation" if k == 0 else None)
    if slanted:
        ax.set_xticks(range(len(cells)), labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    else:
        ax.set_xticks(range(len(cells)), labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"{title}: mean ± std over seeds", fontsize=10)
    plot = _save(fig, out_dir / "plots" / "sweep.png")
    md = out_dir / "sweep.md"
    atomic_write_text(md, f"# {title}\n\n{table}\nThe chosen setting is the one with the highest mean "
                           "validation accuracy; test accuracy is reported, never used to choose.\n\n"
                           f"![sweep]({plot.relative_to(out_dir).as_posix()})\n")
    js = out_dir / "sweep.json"
    atomic_write_json(js, {"cells": list(cells), "chosen": chosen.get("") if list(chosen) == [""] else chosen},
                      default=str)
    return [md, js, plot]


# --------------------------------------------------------------------------------------------------------------
# the paper's numbers


def paper_reference_table(tasks: Sequence[str] | None = None) -> str:
    """The paper's TinyLlama-1.1B and InternLM2.5-1.8B rows (accuracy %) as a Markdown table, restricted to
    `tasks` (our names: medqa, arc_challenge, strategyqa, openbookqa, gsm8k) when given; avg only with all five."""
    cols = [t for t in _PAPER_COLUMNS if tasks is None or t in tasks]
    if tasks is not None and not cols:
        raise ValueError(f"none of {list(tasks)} is a task of the paper ({', '.join(_PAPER_COLUMNS)})")
    with_avg = len(cols) == len(_PAPER_COLUMNS)
    idx = [_PAPER_COLUMNS.index(t) for t in cols] + ([5] if with_avg else [])
    header = ["student / setting", *[PAPER_TASKS[t] for t in cols]] + (["avg"] if with_avg else [])
    rows = []
    for student, block in PAPER_RESULTS.items():
        for i, v in enumerate(ordered_variants(list(block))):
            vals = [block[v][j] for j in idx]
            if all(x is None for x in vals):
                continue
            name = variant_label(v) + (" (ablation, off-policy)" if v == "orpo_teacher_neg" else "")
            rows.append([f"{student} {name}" if i == 0 else name,
                         *[f"{x:.2f}" if x is not None else _DASH for x in vals]])
    note = (f"Source: ORPO-Distill (Singh, Vaddina, Birru; arXiv 2509.25100), teacher {PAPER_TEACHER}; numbers "
            "from a secondary source (the paper's full text was not readable), not produced by this tool, and "
            "measured on the full benchmarks with the paper's models: compare orderings, not absolute values.")
    return f"The paper's numbers (accuracy %, secondary source):\n\n{_md_table(header, rows)}\n{note}\n"
