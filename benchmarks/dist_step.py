"""Time our ORPO optimiser step under one distributed engine: the per-rank program of benchmarks/gpu_check.sh.

    torchrun --standalone --nproc_per_node N benchmarks/dist_step.py --mode {ddp,fsdp2,zero2,zero3} [--size small]

Builds a random-weight Llama locally (no hub, no internet; random token ids of its vocabulary stand in for
tokenised text, which changes nothing about a step's cost), wraps `loss.ORPOStudent` the way the trainer does
(DDP, FSDP2 `fully_shard` on the decoder layers and root, or DeepSpeed ZeRO with torch AdamW), and runs
`--steps` optimiser steps of `--batch` pairs (the global batch, split over ranks and `--grad-accum` micro-batches
with `distributed.split_step`, each loss normalised by the global step's totals). Rank 0 prints ONE JSON line:
mode, world, median step time after `--warmup` steps, tokens/s (all ranks' real tokens), peak memory
(torch.cuda.max_memory_allocated, max over ranks; on CPU the peak RSS) and the step losses.
NCCL on GPUs (bf16 autocast / mixed precision, fp32 master weights), gloo on CPU (fp32) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from orpo_distill.distributed import (  # noqa: E402
    apply_fsdp2,
    deepspeed_config,
    init_process_group,
    reduce_step_totals,
    split_step,
)
from orpo_distill.loss import ORPOLoss, ORPOStudent, StepTotals, step_totals  # noqa: E402
from orpo_distill.pairs import Encoded, collate  # noqa: E402

# hidden, layers, heads, kv heads, intermediate, vocab
SIZES = {
    "tiny": (64, 2, 4, 2, 128, 512),          # CPU smoke test
    "small": (1024, 12, 16, 4, 2816, 32000),  # ~0.2 B parameters
    "medium": (1536, 16, 16, 4, 4096, 32000),  # ~0.5 B parameters
}


def build_model(size: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def make_pairs(n: int, vocab: int, prompt_len: int, completion_len: int, seed: int) -> list[Encoded]:
    """Pairs of random ids with ragged lengths (70-100% of the maxima), the same on every rank."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        def ids(m: int) -> list[int]:
            return [rng.randrange(4, vocab) for _ in range(rng.randint(max(1, int(0.7 * m)), m))]
        out.append(Encoded(f"q{i}", ids(prompt_len), ids(completion_len), ids(completion_len), f"c{i}", f"r{i}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["ddp", "fsdp2", "zero2", "zero3"], required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed (allocator, NCCL and kernel warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per optimiser step, over all ranks")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, help="also write the JSON here (rank 0)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = init_process_group()
    if not dist.is_initialized():  # one process: the wrappers still need a (one-rank) process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        if cuda:
            torch.cuda.set_device(0)
        info = init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    half = torch.bfloat16 if cuda else None

    if args.mode.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())
    model = build_model(args.size, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    student = ORPOStudent(model, ORPOLoss(lam=1.0, chunk_size=args.chunk_size),
                          uniform_chunks=args.mode == "zero3")
    micro = max(1, math.ceil(args.batch / (info.world * args.grad_accum)))

    engine = None
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        student.to(device)
        wrapped = DDP(student, device_ids=[device.index] if cuda else None)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr)
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        student.to(device)
        mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else None
        wrapped = apply_fsdp2(student, mp_policy=mp)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr)
    else:
        import deepspeed

        cfg = deepspeed_config(int(args.mode[-1]), micro_batch=micro, grad_accum=args.grad_accum, lr=args.lr,
                               max_grad_norm=1.0,  # as the DDP/FSDP2 paths clip
                               precision="bf16" if half else "fp32", world=info.world)
        engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=cfg)
        wrapped, opt = engine, None

    vocab = SIZES[args.size][5]
    losses: list[float] = []
    times: list[float] = []
    tokens_per_step: list[int] = []
    for step in range(args.steps):
        xs = make_pairs(args.batch, vocab, args.prompt_len, args.completion_len, seed=1000 + step)
        parts = split_step(range(len(xs)), info.world, info.rank, args.grad_accum)
        batches = [(collate([xs[i] for i in mb], 0), 1.0) if mb else (collate([xs[0]], 0), 0.0) for mb in parts]
        local = step_totals([b for b, w in batches if w], "completion") if any(w for _, w in batches) \
            else StepTotals(0, 0)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        totals = reduce_step_totals(local)
        share_sum, tokens = 0.0, 0
        for k, (cpu_batch, w) in enumerate(batches):
            b = {key: v.to(device) for key, v in cpu_batch.items()}
            last = k == len(batches) - 1
            with torch.autocast(device.type, dtype=half, enabled=half is not None and engine is None
                                and args.mode == "ddp"):
                if engine is not None:
                    loss, _ = engine(b, totals, weight=w)
                else:
                    loss, _ = wrapped(b, totals, weight=w)
            if engine is not None:
                engine.backward(loss, scale_wrt_gas=False)  # the shares already sum to the step's loss
                engine.step()
            elif args.mode == "ddp" and not last:
                with wrapped.no_sync():
                    loss.backward()
            else:
                if args.mode == "fsdp2":  # reduce-scatter once per optimiser step
                    wrapped.set_requires_gradient_sync(last)
                loss.backward()
            share_sum += float(loss.detach())
            tokens += int(b["attention_mask"].sum()) if w else 0
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats = torch.tensor([share_sum, float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        losses.append(float(stats[0]) / info.world)  # the mean of the world-scaled shares: the global loss
        tokens_per_step.append(int(stats[1]))
        if step >= args.warmup:
            times.append(dt)

    if cuda:
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2 ** 30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        mem = {"peak_mem_gib": round(float(peak), 3), "peak_mem_kind": "torch.cuda.max_memory_allocated"}
    else:
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20])  # KiB -> GiB
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        mem = {"peak_mem_gib": round(float(rss), 3), "peak_mem_kind": "peak RSS of a rank (CPU)"}
    step_s = statistics.median(times) if times else None
    timed_tokens = sum(tokens_per_step[args.warmup:])
    res = {"mode": args.mode, "world": info.world, "backend": dist.get_backend(), "size": args.size,
           "params_m": round(n_params / 1e6, 1), "global_batch_pairs": args.batch, "grad_accum": args.grad_accum,
           "micro_batch_pairs": micro, "steps": args.steps, "timed_steps": len(times),
           "step_time_s": round(step_s, 4) if step_s else None,
           "tokens_per_s": round(timed_tokens / sum(times), 1) if times else None,
           **mem, "losses": [round(v, 6) for v in losses],
           "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    if info.is_main:
        line = json.dumps(res, allow_nan=False)
        print(line, flush=True)
        if args.out:
            args.out.write_text(line + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
