"""Crash safety with real process kills: `kill -9` of `orpo-distill traces student CONFIG` mid-sampling, then
the same command again; the final store must equal an uninterrupted run's (no trace lost, duplicated or
half-written), and SQLite must report the file intact."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sampling_helpers import comparable

from orpo_distill.store import TraceStore

N_QUESTIONS, K = 24, 3


def write_config(root: Path, model_dir: Path, name: str) -> Path:
    cfg = {"run": {"out_dir": str(root / name)},
           "task": {"name": "synthetic", "train": {"limit": N_QUESTIONS}},
           "student": {"model": str(model_dir), "template": "plain", "batch_size": 2, "device": "cpu"},
           "sampling": {"k": K, "max_new_tokens": 40, "temperature": 1.0, "seed": 3}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "orpo_distill.cli", "traces", "student", str(cfg),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def kill_when(proc: subprocess.Popen, db: Path, at_least: int, timeout: float = 120, delay_s: float = 0.0) -> int:
    """SIGKILL the process `delay_s` after the store holds at least `at_least` traces; returns the count seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = count(db)
        if n >= at_least:
            time.sleep(delay_s)
            if proc.poll() is not None:
                if delay_s:  # it finished during the random delay: a kill that came too late, not a failure
                    return n
                raise AssertionError("finished before it could be killed; make the run longer")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
            return n
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed:\n{proc.stdout.read().decode()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no progress to kill in time")


def reference_store(tmp_path: Path, model_dir: Path) -> list:
    """The same command uninterrupted, in this process (one thread, like the subprocesses)."""
    import torch

    from orpo_distill.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["traces", "student", str(write_config(tmp_path, model_dir, "ref")), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    with TraceStore(tmp_path / "ref" / "traces.sqlite") as s:
        return s.traces()


def run_to_the_end(cfg: Path) -> subprocess.CompletedProcess:
    final = subprocess.run([sys.executable, "-m", "orpo_distill.cli", "traces", "student", str(cfg), "--no-progress"],
                           env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    return final


def check_equal(db: Path, want: list) -> None:
    total = N_QUESTIONS * K
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(DISTINCT question_id || '/' || sample_index) FROM traces").fetchone()[0] \
            == total
    with TraceStore(db) as crashed:
        got = crashed.traces()
    assert len(got) == len(want) == total
    assert comparable(got) == comparable(want)  # no trace lost, duplicated or different
    assert all(t.completion and t.n_tokens > 0 for t in got)  # nothing half-written
    for q in {t.question_id for t in got}:  # a question's samples were committed together
        assert len({t.created_at for t in got if t.question_id == q}) == 1


def test_kill_9_then_the_same_command_equals_an_uninterrupted_run(tmp_path, tiny_gpt2_dir):
    total = N_QUESTIONS * K
    cfg = write_config(tmp_path, tiny_gpt2_dir, "crash")
    db = tmp_path / "crash" / "traces.sqlite"
    proc = start(cfg)
    want = reference_store(tmp_path, tiny_gpt2_dir)  # while the subprocess starts up
    seen = kill_when(proc, db, at_least=1)
    assert 0 < seen < total
    final = run_to_the_end(cfg)
    existing = left_before(final.stdout)
    assert existing >= seen and f"already in the store, {total - existing} sampled" in final.stdout
    check_equal(db, want)


@pytest.mark.slow
def test_repeated_kills_at_random_moments(tmp_path, tiny_gpt2_dir):
    """Four kills, each a random 0-400 ms after the resumed process wrote its first chunk (so it dies in the middle
    of generating or of committing a later one), then the command to the end."""
    total = N_QUESTIONS * K
    cfg = write_config(tmp_path, tiny_gpt2_dir, "crash")
    db = tmp_path / "crash" / "traces.sqlite"
    want = reference_store(tmp_path, tiny_gpt2_dir)
    rng = random.Random(1234)
    counts = [0]
    for _ in range(4):
        if counts[-1] >= total:  # a kill landed after the last commit (fast machine): nothing left to interrupt
            break
        proc = start(cfg)
        kill_when(proc, db, at_least=counts[-1] + 1, delay_s=rng.uniform(0.0, 0.4))
        counts.append(count(db))
    run_to_the_end(cfg)
    assert counts == sorted(counts) and any(0 < c < total for c in counts), counts  # some kill was mid-run
    check_equal(db, want)


def left_before(stdout: str) -> int:
    return int(stdout.split("traces requested: ")[1].split(" already")[0])
