"""Generation split over data-parallel ranks: rank 0 leads, every rank generates a shard of each call.

The one job of this module is to let the unchanged single-process code that samples and evaluates the live
student (`sampling.stage.sample_to_store`, `evaluate.evaluate`) run on several processes without knowing it.
Rank 0 runs that code with a `ShardedGenerator`: each `generate(prompts, params, sample_indices)` call is
broadcast to the other ranks, which wait in `follow(generator)`; the prompts are cut into `world` contiguous
shards of equal length (the last ones padded with a copy of the first prompt, dropped afterwards), every rank
generates its shard with its own replica of the student, and rank 0 gathers the completions in prompt order
(`gather_object`). So only rank 0 reads and writes the trace store, predictions and logs, every rank makes the
same number of generate calls of the same size (sharded weights, FSDP/ZeRO-3, need that), and the completions
equal one process's: every backend draws each sample from a stream keyed by (seed, prompt, sample index), so
where a prompt is generated does not change what is drawn. `lead(...)` wraps the leader's block and always
releases the followers, also when the block raises (they then raise too, instead of waiting for a timeout).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist

_GENERATE, _DONE, _FAILED = "generate", "done", "failed"


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded length) of this rank's contiguous shard of `n` prompts: every rank gets
    ceil(n / world) slots, the real prompts first."""
    size = math.ceil(n / world) if n else 0
    start = min(n, rank * size)
    return start, min(n, start + size), size


def _run_shard(generator: Any, prompts: Sequence[str], params: Any, indices: Sequence[Sequence[int]] | None,
               world: int, rank: int) -> list[Any]:
    start, stop, size = shard_bounds(len(prompts), world, rank)
    if size == 0:
        return []
    mine = list(prompts[start:stop])
    idx = [list(x) for x in indices[start:stop]] if indices is not None else None
    pad = size - len(mine)  # a copy of prompt 0, so every rank generates the same number of prompts
    mine += [prompts[0]] * pad
    if idx is not None:
        idx += [list(indices[0])] * pad
        got = generator.generate(mine, params, sample_indices=idx)
    else:
        got = generator.generate(mine, params)
    return list(got[:len(mine) - pad])


class ShardedGenerator:
    """Rank 0's view of a generator whose calls every rank shares (see the module docstring); any other attribute
    is the wrapped generator's, except token usage, which rank 0 alone cannot see (the caller then counts the
    returned completions)."""

    usage = None

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def generate(self, prompts: Sequence[str], params: Any,
                 sample_indices: Sequence[Sequence[int]] | None = None) -> list[list[Any]]:
        world, rank = _world_rank()
        if world == 1:
            return _run_shard(self.generator, prompts, params, sample_indices, 1, 0)
        prompts = list(prompts)
        indices = [list(x) for x in sample_indices] if sample_indices is not None else None
        dist.broadcast_object_list([(_GENERATE, prompts, params, indices)], src=0)
        mine = _run_shard(self.generator, prompts, params, indices, world, rank)
        shards: list[Any] = [None] * world
        dist.gather_object(mine, shards, dst=0)
        return [c for shard in shards for c in shard]


def follow(generator: Any) -> None:
    """A follower rank: generate the shards of rank 0's calls until it says it is done (raises if it failed)."""
    world, rank = _world_rank()
    while True:
        msg: list[Any] = [None]
        dist.broadcast_object_list(msg, src=0)
        kind = msg[0][0]
        if kind == _DONE:
            return
        if kind == _FAILED:
            raise RuntimeError(f"rank {rank}: rank 0 failed while sampling ({msg[0][1]}); see its error")
        _, prompts, params, indices = msg[0]
        dist.gather_object(_run_shard(generator, prompts, params, indices, world, rank), None, dst=0)


@contextlib.contextmanager
def lead() -> Iterator[None]:
    """Rank 0's block of sharded generation; on exit (or error) the followers are released."""
    world, _ = _world_rank()
    try:
        yield
    except BaseException as e:
        if world > 1:
            dist.broadcast_object_list([(_FAILED, f"{type(e).__name__}: {e}"[:500])], src=0)
        raise
    if world > 1:
        dist.broadcast_object_list([(_DONE,)], src=0)


__all__ = ["ShardedGenerator", "follow", "lead", "shard_bounds"]
