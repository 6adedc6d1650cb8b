"""Peak memory and time of one ORPO loss step (forward + backward): the fused head, the checkpointed chunked LM-head
path and the naive full logits.

Side by side in one process, on the CPU: 8 pairs = 16 sequences x 512 tokens (128 prompt + 384 completion), a
Llama-shaped model with a 32k vocabulary. Peak memory is the peak of live tensor bytes on the CPU during the step,
read from PyTorch's memory profiler timeline (allocations and frees of every op), so it counts exactly what the
loss path allocates and not the allocator's or Python's overhead. Run: `python benchmarks/bench_loss_memory.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_distill.loss import ORPOLoss


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    return max(sum(s) for s in sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=a.prompt + a.completion)
    model = LlamaForCausalLM(cfg)
    t = a.prompt + a.completion
    ids = torch.randint(0, a.vocab, (2 * a.pairs, t))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.zeros_like(ids)}
    batch["completion_mask"][:, a.prompt:] = 1
    rows = []
    for name, loss_fn in [("naive", ORPOLoss(lam=1.0, naive=True)),
                          ("chunked", ORPOLoss(lam=1.0, chunk_size=a.chunk, fused=False)),
                          ("fused", ORPOLoss(lam=1.0, chunk_size=a.chunk))]:
        def step(loss_fn: ORPOLoss = loss_fn) -> float:
            model.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model, batch)
            loss.backward()
            return loss.item()
        value = step()  # warm-up (and the loss value, which both paths must agree on)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        peak = peak_bytes(step)
        rows.append({"path": name, "loss": round(value, 6), "peak_MiB": round(peak / 2**20, 1),
                     "s_per_step": round(statistics.median(times), 3)})
        print(rows[-1], flush=True)
    naive, chunked, fused = rows
    result = {"shape": {"pairs": a.pairs, "seq": t, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers,
                        "chunk": a.chunk}, "rows": rows,
              "peak_ratio_naive_over_chunked": round(naive["peak_MiB"] / chunked["peak_MiB"], 2),
              "time_ratio_chunked_over_naive": round(chunked["s_per_step"] / naive["s_per_step"], 2),
              "peak_ratio_naive_over_fused": round(naive["peak_MiB"] / fused["peak_MiB"], 2),
              "time_ratio_fused_over_naive": round(fused["s_per_step"] / naive["s_per_step"], 2),
              "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
