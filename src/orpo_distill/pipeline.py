"""`orpo-distill run`: the whole pipeline in order, each stage skipped when its outputs exist; sweeps; the demo.

Stages: (1) teacher traces and (2) the initial student's traces, sampled into the run's trace store (only what the
store lacks, so a re-run makes zero teacher calls); (3) every variant x seed trained from the same initial student
and evaluated on the same split (a variant whose `result.json` exists is skipped; an interrupted one resumes from
its last checkpoint); (4) `results.json`, `results.md` and plots. A sweep runs this for every cell of a grid of
overrides, sharing one trace store (teacher and initial-student traces are sampled once), evaluates every trained
student on the validation split as well, and chooses the best cell on validation accuracy only.

Before the first expensive step, `preflight` checks everything that can be checked in seconds (models, devices,
data, sizes, the trace store, the output folder, a finished run with other settings in the same folder) and
raises one `UserError` listing each problem. A variant that diverges (`TrainingDiverged`) does not stop the
others: it is recorded as diverged (no accuracy), and `run` raises `TrainingDiverged` naming it at the very end,
after every output is written, with the results attached (`error.results`) so the caller can still show them.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, apply_overrides, config_from_dict, dump_config, parse_override
from .errors import TrainingDiverged, UserError
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


def run(cfg: Config, *, progress: bool = True, validate: bool = False, checked: bool = False,
        job_bars: bool = True) -> dict[str, Any]:
    """Run the whole pipeline for one config; returns the results dict also written to `results.json`.

    With `progress`, one overall line per event (stage, jobs done of total, elapsed, ETA) and each job's accuracy
    as it finishes; `job_bars` adds each job's own step bars when jobs run one at a time.

    Raises `UserError` from `preflight` before anything is written (unless `checked`: the caller ran it), and
    `TrainingDiverged` at the end when a variant diverged (the others are trained and reported first)."""
    from . import report
    from .distributed import init_process_group
    from .sampling.stage import run_traces

    # Under a launcher (torchrun, `accelerate launch`) every rank runs this function: rank 0 alone samples the
    # teacher and initial student and writes every file; all ranks train together; the others wait at barriers
    # (a long timeout: teacher sampling can take hours while they wait).
    info = init_process_group(timeout_s=7 * 24 * 3600.0)
    main = info.is_main
    progress = progress and main
    variants = list(cfg.run.variants)
    if not checked:
        preflight(cfg, validate=validate)
    _barrier(info)
    out = Path(cfg.run.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # 1-2. traces: only what the store lacks is sampled (a finished stage costs a store look-up)
    if main and any(v != "zero_shot" for v in variants):
        _log(progress, "stage 1/4: teacher traces")
        t = time.perf_counter()
        run_traces(cfg, "teacher", progress=progress)  # prompts that all fail stop here (exit 3)
        timings["teacher_traces_s"] = time.perf_counter() - t
    if main and any(v in ORPO_STUDENT_NEGATIVES for v in variants):
        _log(progress, "stage 2/4: initial student traces")
        t = time.perf_counter()
        run_traces(cfg, "student", progress=progress)
        timings["student_traces_s"] = time.perf_counter() - t
    _barrier(info)

    # 3. every variant x seed (each skipped when its result.json exists, resumed from its checkpoint otherwise);
    # each job on its own, so that a variant that diverges is recorded and the others still run; in one process
    # they may run side by side in `run.workers` worker processes
    workers = effective_workers(cfg, info.world, len(variants) * cfg.run.seeds)
    _log(progress, f"stage 3/4: {len(variants)} variant(s) x {cfg.run.seeds} seed(s)"
         + (f" in {workers} worker processes" if workers > 1 else ""))
    t = time.perf_counter()
    trained, diverged = train_jobs(cfg, [(v, s) for v in variants for s in seeds_of(cfg)], workers=workers,
                                   progress=progress, job_bars=job_bars)
    timings["train_and_eval_s"] = time.perf_counter() - t
    if validate and main:
        trained = [validate_result(cfg, r, progress=progress) for r in trained]

    # 4. results.json, results.md, plots
    _log(progress, "stage 4/4: report")
    results = build_results(cfg, trained, diverged)
    results["costs"].update({"pipeline_seconds_this_invocation": round(time.perf_counter() - t0, 2), **timings})
    if main:
        report.save_results(out, results)
        report.write_report(out, results)
    _barrier(info)
    if diverged:
        err = TrainingDiverged(diverged_message(diverged))
        err.results = results  # type: ignore[attr-defined]
        raise err
    return results


def effective_workers(cfg: Config, world: int, n_jobs: int) -> int:
    """How many worker processes train the jobs: `run.workers`, or when unset `auto_workers` (one per CPU core
    that memory allows); never more than the jobs, and 1 under a launcher (the ranks share every job) or with a
    vLLM student (its engine)."""
    if world > 1 or cfg.student.backend == "vllm" or n_jobs <= 1:
        return 1
    return max(1, min(cfg.run.workers or auto_workers(cfg), n_jobs))


def auto_workers(cfg: Config) -> int:
    """`run.workers` unset: one worker per CPU core for a CPU student, as many as the memory available holds
    (each holds the student, its gradients and Adam's two moments, ~16 bytes a parameter, plus ~1 GiB for the
    process and activations); 1 for a GPU student, whose trainers would only queue on the one device."""
    workers = cpu_workers(cfg)
    if workers > 1:
        from .models import count_parameters

        params, free = count_parameters(cfg.student), available_memory()
        if params is not None and free is not None:
            workers = max(1, min(workers, free // (16 * params + (1 << 30))))
    return workers


def cpu_workers(cfg: Config) -> int:
    """One worker per CPU core this process may use, for a CPU student (1 on any accelerator, CUDA or MPS:
    trainers would queue on it)."""
    device = str(cfg.student.device)
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if device.split(":")[0] != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux `MemAvailable`), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _worker_init(parent: int) -> None:
    """In each worker process: exit as soon as the run that started it is gone. A run killed with SIGTERM or
    SIGKILL cannot stop its workers itself, and orphaned workers would go on training, and writing, beside the
    run that resumes it. Exiting at any point is safe: every output is written atomically, as for a killed run."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    if os.getppid() != parent:  # the run died while this process started
        os._exit(70)
    threading.Thread(target=watch, name="orpo-distill-parent-watch", daemon=True).start()


def _job_worker(cfg: Config, variant: str, seed: int, threads: int) -> tuple[str, Any]:
    """One variant x seed in a worker process: ("ok", [result]) or ("diverged", message)."""
    import torch
    from transformers.utils import logging as hf_logging

    from .train import run_train

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # this process only: the parent draws the run's one progress line
    try:
        return "ok", run_train(cfg, variants=[variant], seeds=[seed], progress=False)
    except TrainingDiverged as e:
        return "diverged", str(e)


def _job_weight(cfg: Config, variant: str) -> float:
    from .demo.estimate import DEFAULT_UNITS, variant_seconds

    try:
        return max(1e-3, variant_seconds(cfg, variant, DEFAULT_UNITS))
    except Exception:  # an estimate is never worth failing a run over  # noqa: BLE001
        return 1.0


def train_jobs(cfg: Config, jobs: Sequence[tuple[str, int]], *, workers: int = 1, progress: bool = True,
               job_bars: bool = True) -> tuple[list[dict[str, Any]], list[tuple[str, int, str]]]:
    """Train and evaluate every (variant, seed) job; returns the results in job order and the diverged jobs.

    With `workers` > 1 the jobs run in that many spawned processes (one `run_train` call per job, as in
    sequence, so the results are the same): each opens the shared trace store itself (SQLite WAL, writers wait
    for each other; the student refreshes it writes are keyed by variant and seed, each sampled under its own
    identity's lock). Workers exit when the run's process is gone, however it was stopped. The most expensive
    jobs start first. A job that diverges is recorded; any other error stops the run.
    """
    from .train import run_train

    line = ProgressLine(progress, "stage 3/4: train + eval", {j: _job_weight(cfg, j[0]) for j in jobs}, workers)
    done: dict[tuple[str, int], list[dict[str, Any]]] = {}
    diverged: dict[tuple[str, int], str] = {}

    def finished(job: tuple[str, int], status: str, payload: Any) -> None:
        if status == "ok":
            done[job] = payload
            line.job_done(job, payload[0] if payload else None)
        else:
            diverged[job] = payload
            line.job_done(job, None, note="diverged")
            print(f"orpo-distill: {payload} (the other variants go on)", file=sys.stderr, flush=True)

    if workers <= 1:
        for v, s in jobs:
            line.tick([(v, s)])
            try:
                finished((v, s), "ok", run_train(cfg, variants=[v], seeds=[s], progress=progress and job_bars))
            except TrainingDiverged as e:
                finished((v, s), "diverged", str(e))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # the cores shared out between the workers (one thread each with one worker per core)
        threads = cfg.run.threads or max(1, cpu_workers(cfg) // workers)
        order = sorted(jobs, key=lambda j: -line.weights[j])  # longest first: the last job ends soonest
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_job_worker, cfg, v, s, threads): (v, s) for v, s in order}
            try:
                pending = set(futures)
                while pending:
                    ready, pending = wait(pending, timeout=line.tick_s, return_when=FIRST_COMPLETED)
                    line.tick([futures[f] for f in pending if f.running()])
                    for f in ready:
                        finished(futures[f], *f.result())
                    line.tick([futures[f] for f in pending if f.running()])
            except BaseException:  # Ctrl-C, a failed job: stop the other jobs now rather than wait for them
                pool.shutdown(wait=False, cancel_futures=True)
                for child in mp.active_children():
                    child.terminate()
                raise
    line.close()
    trained = [r for j in jobs for r in done.get(j, [])]
    return trained, [(v, s, diverged[(v, s)]) for v, s in jobs if (v, s) in diverged]


class ProgressLine:
    """The run's one progress line: stage, jobs done of total, elapsed, ETA; each job's accuracy as it ends.

    The ETA weighs each remaining job by its estimated cost (`demo.estimate`: unit costs measured on a small CPU)
    and, once a job has finished, scales the estimate by how fast this run actually goes. On a terminal the line
    is redrawn in place; in a log one line is written per finished job.
    """

    def __init__(self, enabled: bool, stage: str, weights: dict[tuple[str, int], float], workers: int) -> None:
        self.enabled, self.stage, self.weights, self.workers = enabled, stage, dict(weights), max(1, workers)
        self.t0 = time.perf_counter()
        self.done_w = 0.0
        self.running_w = 0.0  # estimated cost of the jobs started and not finished
        self.finished: dict[str, list[Any]] = {}  # variant -> final accuracies of its finished seeds
        self.n_done = 0
        self.tty = enabled and sys.stdout.isatty()
        self.tick_s = 1.0 if self.tty else 30.0
        self.draw()

    def eta_s(self) -> float:
        left = sum(self.weights.values()) - self.done_w
        elapsed = time.perf_counter() - self.t0
        # jobs in flight count as half done: with N workers, N jobs are always part-way through
        done = self.done_w + 0.5 * self.running_w
        if self.done_w > 0 and done > 0:
            return max(0.0, (left - 0.5 * self.running_w) * elapsed / done)
        return max(0.0, left / self.workers - elapsed)

    def text(self) -> str:
        return (f"[orpo-distill] {self.stage}: {self.n_done}/{len(self.weights)} variant x seed done, "
                f"{_clock(time.perf_counter() - self.t0)} elapsed, ETA {_clock(self.eta_s())}")

    def draw(self) -> None:
        if self.tty:
            print("\r\033[K" + self.text(), end="", flush=True)
        elif self.enabled:
            print(self.text(), flush=True)

    def tick(self, running: Sequence[tuple[str, int]] = ()) -> None:
        self.running_w = sum(self.weights.get(j, 0.0) for j in running)
        if self.tty:
            self.draw()

    def job_done(self, job: tuple[str, int], result: dict[str, Any] | None, note: str = "") -> None:
        self.n_done += 1
        self.done_w += self.weights.get(job, 0.0)
        if not self.enabled:
            return
        fin = (result or {}).get("final_eval") or {}
        acc = f"accuracy {100 * fin['accuracy']:.1f}%" if "accuracy" in fin else (note or "no accuracy")
        if self.tty:
            print("\r\033[K", end="")
        print(f"  {job[0]} seed {job[1]}: {acc}", flush=True)
        self.finished.setdefault(job[0], []).append(fin.get("accuracy"))
        seeds = sum(1 for v, _ in self.weights if v == job[0])
        accs = [a for a in self.finished[job[0]] if isinstance(a, (int, float))]
        if seeds > 1 and len(self.finished[job[0]]) == seeds and accs:  # the variant's row is complete
            import statistics

            from .report import variant_label

            pct = [100 * a for a in accs]
            mean, std = statistics.fmean(pct), (statistics.stdev(pct) if len(pct) > 1 else 0.0)
            print(f"  = {variant_label(job[0])}: {mean:.1f} ± {std:.1f}% over {len(accs)} seeds", flush=True)
        self.draw()

    def close(self) -> None:
        if self.tty:
            print(flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _barrier(info: Any) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def diverged_message(diverged: Sequence[tuple[str, int, str]]) -> str:
    """One line naming every diverged variant/seed and what to do (the exit-4 message)."""
    names = ", ".join(f"{v} seed {s}" for v, s, _ in diverged)
    return (f"training diverged (a NaN/inf loss or gradient) for {names}; the other variants finished and are in "
            "results.json. Lower trainer.lr or set trainer.max_grad_norm, then run the same command (finished "
            "variants are skipped)")


def build_results(cfg: Config, trained: Sequence[dict[str, Any]],
                  diverged: Sequence[tuple[str, int, str]] = ()) -> dict[str, Any]:
    """The results.json dict from the trainer's per-variant, per-seed results; a diverged (variant, seed) counts
    as a diverged seed (no accuracy, never 0)."""
    from .report import aggregate

    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in trained:
        by_variant.setdefault(r["variant"], []).append(r)
    failed: dict[str, list[dict[str, Any]]] = {}
    for v, s, msg in diverged:
        failed.setdefault(v, []).append({"accuracy": None, "diverged": True, "seed": s, "n": None,
                                         "message": msg})
    variants: dict[str, Any] = {}
    # student sampling between epochs is counted from the store, under costs.student_refresh
    train_cost = {"train_seconds": 0.0, "eval_seconds": 0.0, "train_tokens": 0, "optimizer_steps": 0}
    for v in cfg.run.variants:
        rs = by_variant.get(v, [])
        if not rs and not failed.get(v):
            continue
        entry = aggregate([seed_entry(r) for r in rs] + failed.get(v, []))
        if failed.get(v):
            entry["diverged_seed_ids"] = [f["seed"] for f in failed[v]]
        if rs and all(r.get("validation_eval") for r in rs):
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
            "teachers": _teacher_stats(cfg), "variants": variants, "costs": costs,
            "config": cfg.model_dump(mode="json")}


def _teacher_stats(cfg: Config) -> list[dict[str, Any]]:
    """Per configured teacher: traces, correct rate, kept and pooled chosen traces, tokens, cost (stage.py)."""
    from .sampling.stage import store_path, teacher_stats
    from .store import TraceStore

    path = store_path(cfg)
    if not path.is_file():
        return []
    with TraceStore(path, readonly=True) as store:
        return teacher_stats(cfg, store)


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


# ---- checks before anything expensive ----------------------------------------------------------------------------

def _store_hint(message: str) -> str:
    m = message.lower()
    if "full" in m:
        return ("the disk holding it is full: free space and run the same command again (every trace committed "
                "so far is kept)")
    if "readonly" in m or "read-only" in m:
        return ("it cannot be written (a read-only file, folder or file system): make it writable, or point "
                "run.store at a writable place")
    if "locked" in m or "busy" in m:
        return "another process holds it locked: wait for that process to finish, or stop it, then run again"
    if "not a database" in m or "malformed" in m or "not a trace store" in m or "schema" in m:
        return ("it is damaged or is not an orpo-distill trace store: move it away (a new store is created, and "
                "traces are sampled again) or restore a copy")
    if "unable to open" in m:
        return "it cannot be opened: check that its folder exists and is writable"
    return "check the file, its folder and the free disk space"


def store_error(path: str | os.PathLike[str], e: BaseException) -> UserError:
    """A trace-store failure (sqlite3 error, or the store's own 'not a trace store') as a message naming the
    store's path, SQLite's words ("database or disk is full", ...) and what to do."""
    msg = str(e).removeprefix(f"{path}: ")  # the store's own errors already start with its path
    return UserError(f"trace store {path}: {msg}; {_store_hint(msg)}")


@contextmanager
def store_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any sqlite3 error raised inside the block into `store_error(path, ...)` (the only SQLite file this
    package uses is the trace store)."""
    try:
        yield
    except sqlite3.Error as e:
        raise store_error(path, e) from e


def _check_store(cfg: Config, problems: list[str]) -> None:
    from .sampling.stage import store_path
    from .store import TraceStore

    path = store_path(cfg)
    try:
        if path.exists():
            # opening it read-write runs the schema check and the WAL switch: a damaged, foreign, locked or
            # read-only store fails here, not after a model has been loaded
            with TraceStore(path, timeout_s=5.0):
                pass
            if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
                raise sqlite3.OperationalError("attempt to write a readonly database")
        else:
            parent = next((a for a in [path.parent, *path.parent.parents] if a.exists()), None)
            if parent is not None and not os.access(parent, os.W_OK):
                raise sqlite3.OperationalError(f"unable to open database file (folder {parent} is read-only)")
    except (sqlite3.Error, ValueError) as e:
        problems.append(str(store_error(path, e)))


def _check_out_dir(out: Path, problems: list[str]) -> None:
    if out.exists() and not out.is_dir():
        problems.append(f"run.out_dir: {out} is a file; give a folder")
        return
    parent = next((a for a in [out, *out.parents] if a.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        problems.append(f"run.out_dir: {out} cannot be written ({parent} is read-only); choose another --out")


def finished_with_other_settings(cfg: Config, variants: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """One message per finished variant/seed folder of this run's out_dir whose `result.json` was produced with
    settings that give other numbers than `cfg`. The trainer decides what "other settings" means (its
    `check_finished`, or the `config_hash`/`eval_fingerprint` it records); this only asks it for every folder
    before anything is written, so that a refused run leaves config.yaml and results.json as they were."""
    from . import train

    check = getattr(train, "check_finished", None) or getattr(train, "_check_finished", None)
    fingerprints = getattr(train, "run_fingerprints", None)
    fps = fingerprints(cfg) if check is not None and fingerprints is not None else None
    found = []
    for v in variants:
        for s in seeds:
            vdir = train.variant_dir(cfg, v, s)
            f = vdir / "result.json"
            if not f.is_file():
                continue
            try:
                old = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                found.append(f"{f} is unreadable; remove {vdir} to train {v} seed {s} again, or choose another "
                             "--out")
                continue
            if not isinstance(old, dict):
                continue
            if fps is not None:
                try:
                    check(old, fps, v, vdir)
                    continue
                except UserError as e:
                    found.append(str(e))
                    continue
                except (TypeError, KeyError):  # another trainer API: fall back to the recorded hashes
                    pass
            for key in ("config_hash", "eval_fingerprint"):
                now = getattr(train, key, None)
                if key in old and now is not None and old[key] != now(cfg):
                    found.append(f"{vdir} holds a finished {v} seed {s} made with other settings ({key} "
                                 f"{old[key]}, these settings give {now(cfg)}); choose another --out "
                                 "(run.out_dir), or remove that folder to train it again")
                    break
    return found


def _check_data(cfg: Config, splits: Sequence[str], problems: list[str]) -> None:
    from .tasks import TaskDataError, load_questions, load_task

    try:
        load_task(cfg.task)
    except (TaskDataError, ValueError) as e:
        problems.append(str(e))
        return
    for split in dict.fromkeys(splits):
        try:
            qs = load_questions(cfg.task, split)  # type: ignore[arg-type]
        except (TaskDataError, ValueError, OSError) as e:
            problems.append(str(e))
            continue
        if not qs:
            where = (f"task.synthetic.n_{split} is 0" if cfg.task.name == "synthetic"
                     else f"task.{split} ({getattr(cfg.task, split).path or 'the hub default'}) has no questions")
            problems.append(f"the {split} split is empty: {where}; it needs at least one question")


def _check_model(cfg: Config, which: str, problems: list[str], *, train: bool = False, mcfg: Any = None) -> None:
    from .models import check_model, resolve_device

    mcfg = mcfg if mcfg is not None else getattr(cfg, which)
    if mcfg.backend == "openai":
        if which == "student" and train:
            problems.append("student.backend: openai cannot be trained; use hf (or vllm for the student's "
                            "sampling)")
        elif not mcfg.model:
            problems.append(f"{which}.model is not set: give the served model name")
        elif mcfg.api_key_env and not os.environ.get(mcfg.api_key_env):
            problems.append(f"{which}.api_key_env names the environment variable {mcfg.api_key_env!r}, which is "
                            "not set (or empty); export it before running")
        return
    try:
        check_model(mcfg, key=f"{which}.model")
        resolve_device(mcfg.device, key=f"{which}.device")
    except UserError as e:
        problems.append(str(e))


def preflight(cfg: Config, *, stages: Sequence[str] = ("teacher", "student", "train"),
              variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              validate: bool = False) -> None:
    """Everything `run` (or one stage: "teacher", "student", "train") can check in seconds, before loading a model
    or sampling anything; raises one UserError listing every problem (exit 2). Checks: models (a local folder
    exists, its config.json parses and names a known model_type, tokenizer files), devices, API key variables,
    that every split needed has questions, the trace store opens and is writable, the output folder is writable,
    and that the output folder does not hold finished variants produced with other settings."""
    variants = list(variants or cfg.run.variants)
    seeds = list(seeds) if seeds is not None else seeds_of(cfg)
    needs_teacher = any(v != "zero_shot" for v in variants)
    stages = [st for st in stages
              if st == "train" or (st == "teacher" and needs_teacher)
              or (st == "student" and any(v in ORPO_STUDENT_NEGATIVES for v in variants))]
    problems: list[str] = []
    if "teacher" in stages:
        from .config import teachers_of

        for i, t in enumerate(teachers_of(cfg)):  # a list of teachers: each one's model, device, key variable
            _check_model(cfg, "teacher" if len(teachers_of(cfg)) == 1 else f"teacher[{i}]", problems, mcfg=t)
    if "student" in stages or "train" in stages:
        _check_model(cfg, "student", problems, train="train" in stages)
    splits = ["train"] if {"teacher", "student"} & set(stages) or ("train" in stages and needs_teacher) else []
    if "train" in stages:
        splits += [cfg.eval.split] + (["validation"] if validate else [])
    _check_data(cfg, splits, problems)
    if stages:
        _check_store(cfg, problems)
    if "train" in stages:
        from .recipe import unsupported_engine

        engine = unsupported_engine()
        if engine:  # before any sampling is paid for, not when the first variant starts
            problems.append(engine)
        _check_out_dir(Path(cfg.run.out_dir), problems)
        other = finished_with_other_settings(cfg, variants, seeds)
        if other:  # the first in full (they read alike), and how many more
            problems.append(other[0] + (f" ({len(other) - 1} more finished variant folder(s) in "
                                        f"{cfg.run.out_dir} are in the same case)" if len(other) > 1 else ""))
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else
                        "cannot start:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))


# ---- sweeps -------------------------------------------------------------------------------------------------------

def parse_sweep(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["objective.lam=0.1,0.3,1", "policy.phi=0,0.5,1"]` -> {"objective.lam": [0.1, 0.3, 1.0], ...}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"--sweep {item!r} must look like section.key=v1,v2,... (e.g. policy.phi=0,0.5,1)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise UserError(f"--sweep {item!r}: {key!r} is not a section.key (e.g. objective.lam)")
        if key in grid:
            raise UserError(f"--sweep {key} is given twice; list all its values once: {key}=v1,v2")
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        if not values:
            raise UserError(f"--sweep {item!r} lists no values (e.g. {key}=v1,v2)")
        grid[key] = values
    return grid


def cell_name(overrides: dict[str, Any]) -> str:
    return "__".join(f"{k}={v}" for k, v in overrides.items()).replace("/", "_") or "defaults"


def sweep_cells(base: Config, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Config]]:
    """Every cell of the grid as (its overrides, its config); each cell writes under `<out>/cells/<name>` and all
    cells share one trace store: `run.store` when the config sets it, else `<out>/traces.sqlite`."""
    out = Path(base.run.out_dir)
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        ov = dict(zip(keys, values))
        data = apply_overrides(base.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in ov.items()])
        data["run"]["out_dir"] = str(out / "cells" / cell_name(ov))
        data["run"]["store"] = base.run.store or str(out / "traces.sqlite")
        try:
            cells.append((ov, config_from_dict(data, f"sweep cell {cell_name(ov)}")))
        except ConfigError as e:
            raise ConfigError(f"--sweep {', '.join(f'{k}={v}' for k, v in ov.items())}: {e}") from None
    return cells


def run_sweep(base: Config, grid: dict[str, list[Any]], *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell (validation evaluated too), then write `<out>/sweep.md|json` with the best cell per variant
    chosen on validation accuracy."""
    from .report import write_sweep_report

    cells = sweep_cells(base, grid)  # every cell's config is validated before anything runs
    for _, cfg in cells:
        preflight(cfg, validate=True)
    cells_out = []
    diverged: list[tuple[str, int, str]] = []
    for ov, cfg in cells:
        _log(progress, f"sweep cell {cell_name(ov)}")
        try:
            res = run(cfg, progress=progress, validate=True, checked=True)
        except TrainingDiverged as e:
            res = getattr(e, "results", None) or {"variants": {}}
            diverged += [(f"{v} [{cell_name(ov)}]", s, "") for v, entry in res["variants"].items()
                         for s in entry.get("diverged_seed_ids", [])]
        for v, e in res["variants"].items():
            if e.get("accuracy") is None:  # every seed diverged: nothing to compare
                continue
            val = e.get("validation") or {}
            cells_out.append({"variant": v, "overrides": ov, "validation": val.get("seeds", []),
                              "test": e.get("seeds", [])})
    write_sweep_report(Path(base.run.out_dir), cells_out)
    if diverged:
        raise TrainingDiverged(diverged_message(diverged))
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
    from transformers.utils import logging as hf_logging

    from .report import render_results_md

    cfg = demo_config(out, quick=quick, overrides=overrides)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the demo's own progress lines
    t0 = time.perf_counter()
    try:
        results = run(cfg, progress=progress, job_bars=False)
    except TrainingDiverged as e:  # the finished variants are still worth showing
        if getattr(e, "results", None):
            print(render_results_md(e.results, []), end="")  # type: ignore[attr-defined]
        raise
    print(render_results_md(results, []), end="")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {cfg.run.out_dir} "
          "(results.json, results.md, plots/)")
    return results
