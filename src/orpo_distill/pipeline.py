"""`orpo-distill run`: the whole pipeline in order, each stage skipped when its outputs exist; sweeps; the demo.

Stages: (1) teacher traces and (2) the initial student's traces, sampled into the run's trace store (only what the
store lacks, so a re-run makes zero teacher calls); (3) every variant x seed trained from the same initial student
and evaluated on the same split (a variant whose `result.json` exists is skipped; an interrupted one resumes from
its last checkpoint); (4) `results.json`, `results.md` and plots. A sweep runs this for every cell of a grid of
overrides, sharing one trace store (teacher and initial-student traces are sampled once), evaluates every trained
student on the validation split as well, and chooses the best cell on validation accuracy only.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, apply_overrides, config_from_dict, dump_config, parse_override
from .files import atomic_write_text

ORPO_STUDENT_NEGATIVES = ("orpo_off", "orpo_on", "orpo_mixed")


def seeds_of(cfg: Config) -> list[int]:
    return [cfg.run.seed + i for i in range(cfg.run.seeds)]


def _epoch_entry(e: dict[str, Any]) -> dict[str, Any]:
    """One per-epoch record of a trainer result in the results.json schema (epoch, accuracy, loss, pool)."""
    ev = e.get("eval") or {}
    out = {"epoch": e.get("epoch"), "accuracy": ev.get("accuracy"), "loss": e.get("train_loss")}
    for k in ("log_odds", "pref_acc", "nll", "l_or", "chosen_logp", "rejected_logp"):
        if e.get(f"train_{k}") is not None:
            out[k] = e[f"train_{k}"]
    if e.get("pool") is not None:
        out["pool"] = e["pool"]
    return out


def seed_entry(result: dict[str, Any], split_key: str = "final_eval") -> dict[str, Any]:
    """A trainer result (one variant, one seed) as the per-seed entry `report.aggregate` takes."""
    ev = result.get(split_key) or {}
    if "accuracy" not in ev:
        raise RuntimeError(f"variant {result.get('variant')} seed {result.get('seed')} has no {split_key} "
                           "(was an evaluation split configured?)")
    return {"accuracy": ev["accuracy"], "n": ev.get("n"), "unparsed": ev.get("unparsed"), "seed": result.get("seed"),
            "per_epoch": [_epoch_entry(e) for e in result.get("per_epoch", [])]}


def _store_costs(cfg: Config) -> dict[str, Any]:
    """Sampling costs as the store recorded them (every invocation that filled it, so a resumed or re-run pipeline
    reports what the traces cost, not what this invocation spent): teacher, initial student, student refreshes."""
    from .sampling.stage import store_path
    from .store import TraceStore

    path = store_path(cfg)
    if not path.is_file():
        return {}
    with TraceStore(path, readonly=True) as store:
        runs = store.stats().get("runs", {})
    fields = ("sampled", "errors", "prompt_tokens", "completion_tokens", "seconds", "cost_usd")
    out: dict[str, Any] = {}
    for name, pick in (("teacher", lambda k: k.startswith("teacher/")),
                       ("student_initial", lambda k: k == "student/initial"),
                       ("student_refresh", lambda k: k.startswith("student/epoch:"))):
        rows = [v for k, v in runs.items() if pick(k)]
        if rows:
            out[name] = {f: round(sum(float(r.get(f, 0) or 0) for r in rows), 4) for f in fields}
    return out


def run(cfg: Config, *, progress: bool = True, validate: bool = False) -> dict[str, Any]:
    """Run the whole pipeline for one config; returns the results dict also written to `results.json`."""
    from . import report
    from .sampling.stage import run_traces
    from .train import run_train

    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    variants = list(cfg.run.variants)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # 1-2. traces: only what the store lacks is sampled (a finished stage costs a store look-up)
    if any(v != "zero_shot" for v in variants):
        _log(progress, "stage 1/4: teacher traces")
        t = time.perf_counter()
        run_traces(cfg, "teacher", progress=progress)
        timings["teacher_traces_s"] = time.perf_counter() - t
    if any(v in ORPO_STUDENT_NEGATIVES for v in variants):
        _log(progress, "stage 2/4: initial student traces")
        t = time.perf_counter()
        run_traces(cfg, "student", progress=progress)
        timings["student_traces_s"] = time.perf_counter() - t

    # 3. every variant x seed (each skipped when its result.json exists, resumed from its checkpoint otherwise)
    _log(progress, f"stage 3/4: {len(variants)} variant(s) x {cfg.run.seeds} seed(s)")
    t = time.perf_counter()
    trained = run_train(cfg, variants=variants, seeds=seeds_of(cfg), progress=progress)
    timings["train_and_eval_s"] = time.perf_counter() - t
    if validate:
        trained = [validate_result(cfg, r, progress=progress) for r in trained]

    # 4. results.json, results.md, plots
    _log(progress, "stage 4/4: report")
    results = build_results(cfg, trained)
    results["costs"].update({"pipeline_seconds_this_invocation": round(time.perf_counter() - t0, 2), **timings})
    report.save_results(out, results)
    report.write_report(out, results)
    return results


def build_results(cfg: Config, trained: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The results.json dict from the trainer's per-variant, per-seed results."""
    from .report import aggregate

    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in trained:
        by_variant.setdefault(r["variant"], []).append(r)
    variants: dict[str, Any] = {}
    # student sampling between epochs is counted from the store, under costs.student_refresh
    train_cost = {"train_seconds": 0.0, "eval_seconds": 0.0, "train_tokens": 0, "optimizer_steps": 0}
    for v in cfg.run.variants:
        rs = by_variant.get(v, [])
        if not rs:
            continue
        entry = aggregate([seed_entry(r) for r in rs])
        if all(r.get("validation_eval") for r in rs):
            val = aggregate([seed_entry(r, "validation_eval") for r in rs])
            entry["validation"] = {"accuracy": val["accuracy"], "std": val["std"], "n": val["n"],
                                   "seeds": val["seeds"]}
        entry["costs"] = {k: sum(float(r.get("costs", {}).get(k, 0) or 0) for r in rs) for k in train_cost}
        entry["model_dirs"] = [r.get("model_dir") for r in rs]
        variants[v] = entry
        for k in train_cost:
            train_cost[k] += entry["costs"][k]
    costs: dict[str, Any] = {**_store_costs(cfg), "training": train_cost}
    return {"task": cfg.task.name, "teacher": cfg.teacher.model, "student": cfg.student.model,
            "variants": variants, "costs": costs, "config": cfg.model_dump(mode="json")}


def validate_result(cfg: Config, result: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Add `validation_eval` (greedy accuracy on the validation split) to a trainer result, cached in the
    variant's folder, so that sweeps can choose a setting without looking at test accuracy."""
    from .evaluate import evaluate_with_config, write_metrics
    from .sampling.hf import HFGenerator
    from .tasks import load_questions, load_task
    from .train import variant_dir

    if result.get("validation_eval"):
        return result
    vdir = variant_dir(cfg, result["variant"], result["seed"])
    cached = vdir / "validation_metrics.json"
    if cached.is_file():
        return {**result, "validation_eval": json.loads(cached.read_text(encoding="utf-8"))}
    task = load_task(cfg.task)
    questions = load_questions(cfg.task, "validation")
    gen = HFGenerator.from_config(cfg.student, checkpoint=result.get("model_dir"))  # zero_shot: no model_dir
    res = evaluate_with_config(gen, task, questions, cfg, progress=progress)
    write_metrics(cached, res)
    return {**result, "validation_eval": res.metrics()}


# ---- sweeps -------------------------------------------------------------------------------------------------------

def parse_sweep(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["objective.lam=0.1,0.3,1", "policy.phi=0,0.5,1"]` -> {"objective.lam": [0.1, 0.3, 1.0], ...}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--sweep {item!r} must look like section.key=v1,v2,...")
        key, raw = item.split("=", 1)
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        if not values:
            raise ValueError(f"--sweep {item!r} lists no values")
        grid[key.strip()] = values
    return grid


def cell_name(overrides: dict[str, Any]) -> str:
    return "__".join(f"{k}={v}" for k, v in overrides.items()).replace("/", "_") or "defaults"


def sweep_cells(base: Config, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Config]]:
    """Every cell of the grid as (its overrides, its config); each cell writes under `<out>/cells/<name>` and all
    cells share `<out>/traces.sqlite`."""
    out = Path(base.run.out_dir)
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        ov = dict(zip(keys, values))
        data = apply_overrides(base.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in ov.items()])
        data["run"]["out_dir"] = str(out / "cells" / cell_name(ov))
        data["run"]["store"] = str(out / "traces.sqlite")
        cells.append((ov, config_from_dict(data, f"sweep cell {cell_name(ov)}")))
    return cells


def run_sweep(base: Config, grid: dict[str, list[Any]], *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell (validation evaluated too), then write `<out>/sweep.md|json` with the best cell per variant
    chosen on validation accuracy."""
    from .report import write_sweep_report

    cells_out = []
    for ov, cfg in sweep_cells(base, grid):
        _log(progress, f"sweep cell {cell_name(ov)}")
        res = run(cfg, progress=progress, validate=True)
        for v, e in res["variants"].items():
            val = e.get("validation") or {}
            cells_out.append({"variant": v, "overrides": ov, "validation": val.get("seeds", []),
                              "test": e.get("seeds", [])})
    write_sweep_report(Path(base.run.out_dir), cells_out)
    return cells_out


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[orpo-distill] {msg}", flush=True)


# ---- the offline demo ---------------------------------------------------------------------------------------------

def demo_config(out: str | os.PathLike[str], *, quick: bool = False, overrides: Sequence[str] = ()) -> Config:
    """The shipped demo config (`orpo_distill/configs/demo.yaml`) with the shipped tiny models' paths filled in."""
    from importlib import resources

    import yaml

    from .demo import assets_dir

    text = resources.files("orpo_distill").joinpath("configs/demo.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data.setdefault("teacher", {})["model"] = str(assets_dir() / "teacher")
    data.setdefault("student", {})["model"] = str(assets_dir() / "student")
    quick_over = ((data.pop("quick", None) or {}) if quick else {})
    data.pop("quick", None)
    items = [f"{k}={json.dumps(v)}" for k, v in quick_over.items()] + [f"run.out_dir={out}", *overrides]
    return config_from_dict(apply_overrides(data, items), "demo.yaml" + (" --quick" if quick else ""))


def run_demo(out: str | os.PathLike[str], *, quick: bool = False, overrides: Sequence[str] = (),
             progress: bool = True) -> dict[str, Any]:
    """`orpo-distill demo`: the whole pipeline on the synthetic task with the shipped tiny teacher and student."""
    from .report import render_results_md

    cfg = demo_config(out, quick=quick, overrides=overrides)
    t0 = time.perf_counter()
    results = run(cfg, progress=progress)
    print(render_results_md(results, []), end="")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {cfg.run.out_dir} "
          "(results.json, results.md, plots/)")
    return results
