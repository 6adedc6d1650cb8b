"""One student refresh cycle on a GPU with the live vLLM engine in sleep mode; prints seconds and peak memory as JSON.

What the trainer does between two epochs with `student.backend: vllm`, on a random-weight Llama (default ~0.2 B
parameters, the demo student's tokenizer, nothing downloaded):
1. the trainer's model (fp32 weights, bf16 autocast) and AdamW state are resident (one warm-up step);
2. the live engine is built in this process (`sampling/vllm_live.LiveStudent`) with `enable_sleep_mode` and a
   memory budget of `--memory-fraction` of what the trainer left free (config `student.vllm_memory_fraction`);
3. the cycle, timed phase by phase: engine `sleep` -> one training step -> `wake` -> push the trained weights into
   the engine (bf16, in place, no file) -> sample `--questions` prompts (`--samples` each).
Device memory is read with `torch.cuda.mem_get_info` after every phase (vLLM's sleep-mode pool is not in torch's
allocator statistics, so the device-wide figure is the honest one); `torch.cuda.max_memory_allocated` is the
trainer side. Output: one JSON object on stdout (and `--out FILE`).

    python benchmarks/gpu_refresh.py                 # a GPU machine with vllm installed (the `vllm` extra)
    python benchmarks/gpu_refresh.py --check         # anywhere: everything but vLLM (model, step, prompts), tiny
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEMO_TOKENIZER = REPO / "src" / "orpo_distill" / "demo" / "assets" / "student"
GIB = 2**30


def build_student(out: Path, hidden: int, layers: int, heads: int, kv_heads: int, seed: int) -> tuple[Any, Any]:
    """A random-weight Llama saved (safetensors) with the demo student's tokenizer; returns (model, tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model, tok


def train_step(model: Any, opt: Any, batch: torch.Tensor, device: str) -> float:
    """One optimiser step on a next-token loss (what a refresh cycle waits for); its loss."""
    model.train()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def device_used() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="training sequences per step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per training sequence")
    ap.add_argument("--questions", type=int, default=256, help="prompts sampled after the push")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--memory-fraction", type=float, default=0.5, help="student.vllm_memory_fraction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--check", action="store_true", help="no GPU/vLLM needed: a tiny model, the trainer step and "
                    "prompt encoding on CPU, and the engine arguments that would be used")
    args = ap.parse_args()
    if not 0 < args.memory_fraction <= 1:
        ap.error("--memory-fraction must be in (0, 1]")

    from orpo_distill.config import StudentConfig
    from orpo_distill.sampling.base import SamplingParams
    from orpo_distill.sampling.vllm_live import EngineSpec, memory_kwargs
    from orpo_distill.tasks.prompts import encode_prompt, render_prompt

    cuda = torch.cuda.is_available()
    if args.check:
        args.hidden, args.layers, args.heads, args.kv_heads, args.batch, args.seq = 128, 2, 4, 2, 2, 32
        args.questions, args.samples, args.max_new_tokens = 4, 2, 8
    device = "cuda" if cuda and not args.check else "cpu"
    result: dict[str, Any] = {"mode": "check" if args.check else "gpu", "device": device,
                              "gpu": torch.cuda.get_device_name() if cuda else None,
                              "torch": torch.__version__, "memory_fraction": args.memory_fraction}
    with tempfile.TemporaryDirectory(prefix="gpu-refresh-") as tmp:
        t0 = time.perf_counter()
        model, tok = build_student(Path(tmp) / "student", args.hidden, args.layers, args.heads, args.kv_heads,
                                   args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        result["model"] = {"parameters_m": round(n_params / 1e6, 1), "hidden": args.hidden, "layers": args.layers,
                           "build_s": round(time.perf_counter() - t0, 3)}
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(args.seed)
        batch = torch.randint(3, len(tok), (args.batch, args.seq), generator=g).to(device)
        train_step(model, opt, batch, device)  # AdamW's state is allocated at the first step
        if device == "cuda":
            torch.cuda.synchronize()
            result["trainer_resident_gib"] = round(device_used(), 3)
        messages = [f"What is {i} + {i % 7}? Think step by step." for i in range(args.questions)]
        prompts = [encode_prompt(tok, render_prompt(tok, m, "plain", None)) for m in messages]
        result["prompt_tokens_mean"] = round(sum(map(len, prompts)) / len(prompts), 1)
        scfg = StudentConfig(model=str(Path(tmp) / "student"), backend="vllm", template="plain", dtype="bfloat16",
                             vllm_memory_fraction=args.memory_fraction, vllm_args={"max_model_len": 1024})
        if args.check or not cuda:
            free, total = (torch.cuda.mem_get_info() if cuda else (80 * GIB, 140 * GIB))
            spec = EngineSpec(model=scfg.model, memory_fraction=scfg.vllm_memory_fraction)
            result["engine_kwargs_if_gpu"] = memory_kwargs(spec, device="cuda", free_bytes=free, total_bytes=total)
            t = time.perf_counter()
            result["loss"] = train_step(model, opt, batch, device)
            result["train_step_s"] = round(time.perf_counter() - t, 3)
            result["vllm"] = "skipped: " + ("--check" if args.check else "no CUDA device")
            return _emit(result, args.out)

        from orpo_distill.sampling.vllm_live import LiveStudent

        phases: dict[str, float] = {}
        mem: dict[str, float] = {"trainer_only": result["trainer_resident_gib"]}
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        student = LiveStudent(scfg, tok, memory_fraction=scfg.vllm_memory_fraction, in_process=True)
        phases["engine_start_s"] = time.perf_counter() - t
        mem["engine_built"] = device_used()
        result["engine"] = student.engine.info()
        try:
            def timed(name: str, fn: Any) -> Any:
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                phases[name] = time.perf_counter() - t
                mem[name.removesuffix("_s")] = device_used()
                return out

            timed("sleep_s", student.sleep)
            loss = timed("train_step_s", lambda: train_step(model, opt, batch, device))
            timed("wake_s", student.wake)
            timed("push_s", lambda: student.refresh(model, 1))
            gen = student.generator(model_id="gpu-refresh", revision="epoch1")
            params = SamplingParams(n=args.samples, temperature=0.8, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                    stop=(), seed=args.seed)
            outs = timed("sample_s", lambda: gen.generate(messages, params))
        finally:
            student.close()
        n_tok = sum(c.n_tokens for cs in outs for c in cs)
        result.update({
            "loss": loss if math.isfinite(loss) else None,
            "seconds": {k: round(v, 4) for k, v in phases.items()},
            "refresh_cycle_s": round(sum(phases[k] for k in ("sleep_s", "wake_s", "push_s", "sample_s")), 4),
            "sampled": {"completions": sum(len(cs) for cs in outs), "tokens": n_tok,
                        "tokens_per_s": round(n_tok / phases["sample_s"], 1)},
            "device_used_gib": {k: round(v, 3) for k, v in mem.items()},
            "peak_device_used_gib": round(max(mem.values()), 3),
            "trainer_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "asleep_frees_gib": round(mem["engine_built"] - mem["sleep"], 3),
        })
    return _emit(result, args.out)


def _emit(result: dict[str, Any], out: str | None) -> int:
    text = json.dumps(result, indent=1, allow_nan=False)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
