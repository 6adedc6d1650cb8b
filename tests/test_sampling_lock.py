"""Two samplers on one store (two processes, started together against the loopback fake server): the store's lock
makes the second wait and then find the first one's traces, so each trace is paid for once and every request
made is accounted for in the runs table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, Faults

from orpo_distill.errors import UserError
from orpo_distill.store import TraceStore

N_QUESTIONS, K = 12, 2

WORKER = """
import json, sys, time
from pathlib import Path
from sampling_helpers import AddTask, add_questions
from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.openai_api import OpenAIGenerator
from orpo_distill.sampling.stage import sample_to_store
from orpo_distill.store import TraceStore

url, store_path, ready, go, n, k = sys.argv[1:7]
gen = OpenAIGenerator(model="fake", base_url=url, concurrency=2, max_retries=0, timeout_s=30)
with TraceStore(store_path) as store:
    Path(ready).touch()
    while not Path(go).exists():  # start sampling together with the other worker
        time.sleep(0.005)
    r = sample_to_store(gen, AddTask(), add_questions(int(n)), SamplingParams(n=int(k), seed=1), store,
                        role="teacher", source="teacher", progress=False)
print(json.dumps({"sampled": r.sampled, "existing": r.existing, "requests": gen.usage["requests"],
                  "completion_tokens": r.completion_tokens}))
"""


def test_two_processes_on_one_store_pay_once_and_every_call_is_recorded(tmp_path):
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    store = tmp_path / "traces.sqlite"
    go = tmp_path / "go"
    # Every response is held back a little ("timeout" fault shorter than the client's timeout), so the first
    # sampler is still at work when the second one asks for the same traces.
    faults = Faults(rate=1.0, kinds=("timeout",), slow_s=0.2)
    with FakeOpenAIServer(faults) as srv:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, srv.base_url, str(store), str(tmp_path / f"r{i}"),
                                   str(go), str(N_QUESTIONS), str(K)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"r{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        requests = srv.stats.requests
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # Each question's K samples are one request: paid once in all, not once per sampler.
    assert requests == N_QUESTIONS
    assert sorted(r["sampled"] for r in reports) == [0, N_QUESTIONS * K]
    assert sorted(r["existing"] for r in reports) == [0, N_QUESTIONS * K]
    assert sum(r["requests"] for r in reports) == requests
    waited = [err for _, err in outs if "is being sampled by pid" in err]
    assert len(waited) == 1 and "waiting for it to finish" in waited[0]
    with TraceStore(store, readonly=True) as s:
        assert len(s) == N_QUESTIONS * K
        runs = s.stats()["runs"]["teacher/teacher"]
    # The runs table accounts for every request made: one recorded call, with all the tokens the server served.
    assert runs["calls"] == 1 and runs["sampled"] == N_QUESTIONS * K
    assert runs["completion_tokens"] == sum(r["completion_tokens"] for r in reports)


def test_the_lock_is_per_store_released_on_exit_and_can_time_out(tmp_path):
    with TraceStore(tmp_path / "a.sqlite") as a, TraceStore(tmp_path / "a.sqlite") as a2, \
            TraceStore(tmp_path / "b.sqlite") as b:
        with a.sampling_lock("teacher teacher m"):
            with b.sampling_lock("student initial s"):  # another store: not blocked
                pass
            with pytest.raises(UserError, match="another sampler still holds"):
                with a2.sampling_lock("teacher teacher m", timeout_s=0.0, poll_s=0.01):
                    pass
            assert "teacher teacher m" in a.lock_path("teacher teacher m").read_text()
            # other traces of the same store (another worker's refresh, another teacher): not blocked
            with a2.sampling_lock("student epoch:1 s variant-b", timeout_s=0.0):
                pass
        with a2.sampling_lock("teacher teacher m", timeout_s=0.0):  # released
            pass
