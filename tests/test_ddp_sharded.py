"""sharded.py: rank 0 leads the unchanged sampling/eval code, every rank generates a padded shard of each call.

Checked with a fake generator whose completion is a pure function of (prompt, sample index), as every real
backend's is: the gathered completions equal one process's in prompt order, every rank makes the same number of
generate calls of the same size (what FSDP/ZeRO-3 need), and a failure on rank 0 releases the other rank with an
error instead of leaving it waiting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_distill.sharded import ShardedGenerator, shard_bounds


class Fake:
    """Completions that depend only on (prompt, sample index); records the size of every call."""

    model_id = "fake"
    chunk_prompts = 4

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, prompts, params, sample_indices=None):
        self.calls.append(len(prompts))
        idx = sample_indices or [list(range(params["n"]))] * len(prompts)
        return [[f"{p}#{i}" for i in ix] for p, ix in zip(prompts, idx)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_prompts_in_order_with_equal_padded_sizes(world):
    for n in range(0, 9):
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        assert len({size for _, _, size in bounds}) == 1  # every rank the same number of slots
        covered = [i for start, stop, _ in bounds for i in range(start, stop)]
        assert covered == list(range(n))


def test_one_process_passes_through():
    fake = Fake()
    gen = ShardedGenerator(fake)
    assert gen.model_id == "fake" and gen.chunk_prompts == 4 and gen.usage is None
    got = gen.generate(["a", "b", "c"], {"n": 2}, sample_indices=[[0], [], [1]])
    assert got == [["a#0"], [], ["c#1"]] and fake.calls == [3]


def _worker(out: str) -> None:
    import torch.distributed as dist

    from orpo_distill.sharded import follow, lead

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fake = Fake()
    calls = [(["p0", "p1", "p2", "p3", "p4"], {"n": 2}, None), (["q0"], {"n": 1}, None),
             (["r0", "r1", "r2"], {"n": 3}, [[0, 2], [1], [2]])]
    got = None
    if rank == 0:
        with lead():
            got = [ShardedGenerator(fake).generate(p, par, sample_indices=ix) for p, par, ix in calls]
    else:
        follow(fake)
    failed = None
    try:
        if rank == 0:
            with lead():
                ShardedGenerator(fake).generate(["x0", "x1"], {"n": 1})
                raise ValueError("boom")
        else:
            follow(fake)
    except (ValueError, RuntimeError) as e:
        failed = type(e).__name__
    Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, "calls": fake.calls, "got": got,
                                                         "failed": failed}))
    dist.destroy_process_group()


def test_two_ranks_same_calls_and_completions_as_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    one = Fake()
    expect = [one.generate(p, par, ix) for p, par, ix in (
        (["p0", "p1", "p2", "p3", "p4"], {"n": 2}, None), (["q0"], {"n": 1}, None),
        (["r0", "r1", "r2"], {"n": 3}, [[0, 2], [1], [2]]))]
    assert r0["got"] == expect
    # the same calls of the same (padded) sizes on both ranks: 5 prompts -> 3 + 3, 1 -> 1 + 1, 3 -> 2 + 2, 2 -> 1 + 1
    assert r0["calls"] == r1["calls"] == [3, 1, 2, 1]
    # rank 0 failed inside its block: rank 1 was released with an error, not left waiting
    assert r0["failed"] == "ValueError" and r1["failed"] == "RuntimeError"


if __name__ == "__main__":
    _worker(sys.argv[1])
