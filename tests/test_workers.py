"""`run.workers`: variant x seed jobs trained in worker processes that share one trace store give the same results,
weights, pools and student-refresh traces as the same jobs in sequence; the worker count rules."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orpo_distill.cli import main
from orpo_distill.config import config_from_dict
from orpo_distill.demo import assets_dir
from orpo_distill.pipeline import effective_workers

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out: Path, workers: int) -> dict:
    return {"run": {"out_dir": str(out), "seeds": 2, "workers": workers, "threads": 1,
                    "variants": ["sft_single", "orpo_on"]},
            "task": {"name": "synthetic", "synthetic": {"n_train": 6, "n_validation": 2, "n_test": 4}},
            "teacher": {"model": str(assets_dir() / "teacher"), "template": "plain", "device": "cpu"},
            "student": {"model": str(assets_dir() / "student"), "template": "plain", "device": "cpu"},
            "sampling": {"k": 2, "max_new_tokens": 40}, "eval": {"max_new_tokens": 40},
            "policy": {"gold_rationale_fallback": True, "unparsed_negatives": True},
            "trainer": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "report_to": ["jsonl"]}}


def _outcome(out: Path) -> dict:
    from orpo_distill.store import TraceStore

    res = json.loads((out / "results.json").read_text())
    weights = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((out / "variants").rglob("model.safetensors"))}
    pools = {str(p.relative_to(out)): p.read_text() for p in sorted((out / "variants").rglob("pools/epoch*.json"))}
    with TraceStore(out / "traces.sqlite", readonly=True) as store:
        refresh = sorted((t.source, t.revision, t.question_id, t.sample_index, t.completion)
                         for t in store.traces(role="student") if t.source.startswith("epoch:"))
    per_seed = {str(p.relative_to(out)): {k: json.loads(p.read_text()).get(k) for k in ("final_eval", "per_epoch")}
                for p in sorted((out / "variants").rglob("result.json"))}
    for r in per_seed.values():  # wall-clock fields differ between any two runs
        for e in [r["final_eval"] or {}] + [ep.get("eval") or {} for ep in r["per_epoch"] or []]:
            e.pop("seconds", None)
        for ep in r["per_epoch"] or []:
            for k in [k for k in ep if "second" in k or k.endswith("_s") or "per_s" in k]:
                ep.pop(k)
    per_seed["table"] = {v: (e["accuracy"], e["seeds"]) for v, e in res["variants"].items()}
    return {"results": per_seed, "weights": weights, "pools": pools, "refresh": refresh}


def test_parallel_workers_equal_sequential(tmp_path):
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        path = tmp_path / f"w{workers}.yaml"
        path.write_text(yaml.safe_dump(_cfg(out, workers)))
        assert main(["run", str(path), "--no-progress"]) == 0
        outs[workers] = _outcome(out)
    seq, par = outs[1], outs[2]
    assert len(seq["weights"]) == 4 and seq["refresh"], "the config must train 4 models and refresh the student"
    assert par["results"] == seq["results"]
    assert par["weights"] == seq["weights"]
    assert par["pools"] == seq["pools"]
    assert par["refresh"] == seq["refresh"]


def test_worker_count_rules(monkeypatch):
    from orpo_distill import pipeline

    cfg = config_from_dict({"run": {"workers": 4}})
    assert effective_workers(cfg, 1, 10) == 4
    assert effective_workers(cfg, 1, 3) == 3  # never more than the jobs
    assert effective_workers(cfg, 2, 10) == 1  # torchrun / accelerate launch: the ranks share each job
    vllm = config_from_dict({"run": {"workers": 4}, "student": {"backend": "vllm"}})
    assert effective_workers(vllm, 1, 10) == 1
    # unset: one per core for a CPU student, as many as the free memory holds, 1 for a GPU student
    monkeypatch.setattr(pipeline, "cpu_workers", lambda c: 1 if str(c.student.device).startswith("cuda") else 8)
    monkeypatch.setattr("orpo_distill.models.count_parameters", lambda m: 100_000_000)  # 1.6 GB + 1 GiB each
    monkeypatch.setattr(pipeline, "available_memory", lambda: 64 << 30)
    cpu = config_from_dict({"student": {"device": "cpu"}})
    assert effective_workers(cpu, 1, 10) == 8
    assert effective_workers(cpu, 1, 5) == 5
    assert effective_workers(cpu, 1, 1) == 1
    monkeypatch.setattr(pipeline, "available_memory", lambda: 8 << 30)
    assert effective_workers(cpu, 1, 10) == 3  # 8 GiB / 2.6 GB
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1 << 30)
    assert effective_workers(cpu, 1, 10) == 1  # never fewer than one
    monkeypatch.setattr(pipeline, "available_memory", lambda: None)  # unknown: cores only
    assert effective_workers(cpu, 1, 10) == 8
    assert effective_workers(config_from_dict({"student": {"device": "cuda"}}), 1, 10) == 1
    monkeypatch.undo()
    for device in ("cuda:1", "mps"):  # any accelerator: one worker, the trainers would queue on it
        assert pipeline.cpu_workers(config_from_dict({"student": {"device": device}})) == 1
    assert pipeline.cpu_workers(config_from_dict({"student": {"device": "cpu"}})) >= 1


def test_auto_workers_reads_the_student_and_memory():
    from orpo_distill.models import count_parameters
    from orpo_distill.pipeline import auto_workers, available_memory, cpu_workers, demo_config

    cfg = demo_config("unused")
    assert cfg.run.workers is None  # the demo uses `run`'s default
    assert count_parameters(cfg.student) == 381_824  # BUILD.json's count, from the config alone
    assert count_parameters(config_from_dict({"student": {"model": "no-org/not-in-any-cache"}}).student) is None
    free = available_memory()
    assert free is None or free > 0
    assert 1 <= auto_workers(cfg) <= cpu_workers(cfg)


def test_demo_cli_sets_workers(tmp_path, capsys):
    from orpo_distill.pipeline import demo_config

    assert demo_config(tmp_path / "d", overrides=["run.workers=1"]).run.workers == 1
    assert main(["demo", "--workers", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--workers" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_die_with_the_run_and_it_resumes(tmp_path, sig):
    """Killing `run` (SIGTERM or SIGKILL) ends its worker processes too: none go on training beside the run that
    resumes it; the resumed run then finishes every job."""
    cfg = _cfg(tmp_path / "out", 2)
    cfg["trainer"]["epochs"] = 6
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "orpo_distill", "run", str(path), "--no-progress"]
    log = tmp_path / "run.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2:  # the resource tracker is a child too: wait for two workers
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no workers started"
            workers = [p for p in _children(proc.pid)
                       if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            time.sleep(0.2)
        time.sleep(3)  # the workers are training
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers):
            assert time.monotonic() < deadline, "workers outlived the run"
            time.sleep(0.2)
    finally:
        for p in [proc.pid] + workers:  # a failure here must not leave processes training
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert main(["run", str(path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {v: len(e["seeds"]) for v, e in res["variants"].items()} == {"sft_single": 2, "orpo_on": 2}


def test_progress_line_eta_counts_jobs_in_flight(capsys):
    """The ETA weighs the jobs left by their estimated cost, scaled by how fast the run goes, counting the jobs
    in flight as half done (with two workers the first finished job is not all the work done so far)."""
    from orpo_distill.pipeline import ProgressLine

    jobs = {("a", 0): 10.0, ("b", 0): 10.0, ("c", 0): 20.0}
    line = ProgressLine(True, "stage", jobs, workers=2)
    line.t0 -= 10.0  # 10 s in
    line.job_done(("a", 0), {"final_eval": {"accuracy": 0.25}})
    line.tick([("b", 0)])
    # done 10 + half of 10 = 15 units in 10 s; left 30 - 5 = 25 units -> about 16.7 s
    assert 15.0 < line.eta_s() < 18.0
    out = capsys.readouterr().out
    assert "a seed 0: accuracy 25.0%" in out and "1/3 variant x seed done" in out
    two = ProgressLine(True, "stage", {("v", 0): 1.0, ("v", 1): 1.0}, workers=2)
    two.job_done(("v", 0), {"final_eval": {"accuracy": 0.2}})
    assert "over 2 seeds" not in capsys.readouterr().out
    two.job_done(("v", 1), {"final_eval": {"accuracy": 0.4}})
    assert "= v: 30.0 ± 14.1% over 2 seeds" in capsys.readouterr().out  # the row, once both seeds are in
