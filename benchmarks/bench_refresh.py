"""Benchmark: seconds per student refresh, and greedy evaluation of 200 questions, vLLM vs transformers.

On one tiny random-weights Llama shaped like the demo student (3 layers, hidden 128, 4 heads of 32: vLLM CPU
needs head size >= 32; the demo student's own tokenizer) it times:
- refresh by **weight push** into one live engine (`sampling/vllm_live.LiveStudent.refresh`, full fine-tune);
- refresh by **LoRARequest** (LoRA r=8 on q/v: save the adapter, serve it under a new request);
- today's **save and new engine** (`vllm_engine.py` path of `train.default_sampler`): save the student folder in
  fp32, build a new `vllm.LLM` from it, free it; timed with vLLM's default multiprocess engine (what the
  trainer gets today) and in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), interpreter start excluded;
- greedy evaluation of 200 synthetic-task questions (80 new tokens) through the live engine vs the
  transformers backend (`HFGenerator`), and whether their predictions are equal.
vLLM runs in the vLLM environment (`make vllm-venv`; --vllm-python or ORPO_DISTILL_VLLM_PYTHON), this script in the
main one; both on `--threads` CPU threads (default 1; vLLM's threads unbound, see `vllm_live.LiveStudent`). Prints a table and writes JSON (default runs/bench_refresh.json).

    python benchmarks/bench_refresh.py --vllm-python .venv-vllm/bin/python     # ~3 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "src" / "orpo_distill" / "demo" / "assets" / "student"
ENGINE_ARGS = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 256}

NEW_ENGINE_WORKER = r'''
import gc, json, sys, time
if __name__ == "__main__":
    from orpo_distill.config import ModelConfig
    from orpo_distill.sampling.vllm_engine import VLLMGenerator
    times = []
    for d in sys.argv[2:]:
        cfg = ModelConfig(model=d, backend="vllm", template="plain", dtype="float32", vllm_args=json.loads(sys.argv[1]))
        t0 = time.perf_counter()
        g = VLLMGenerator.from_config(cfg, checkpoint=d, enforce_eager=True)
        t1 = time.perf_counter()
        g.llm.llm_engine.engine_core.shutdown()
        del g
        gc.collect()
        times.append({"build_s": t1 - t0, "free_s": time.perf_counter() - t1})
    print("RESULT " + json.dumps(times), flush=True)
'''


def build_model(hidden: int, layers: int, heads: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def stats(xs: list[float]) -> dict:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or ".venv-vllm/bin/python")
    ap.add_argument("--refreshes", type=int, default=5, help="timed refreshes per live-engine mode")
    ap.add_argument("--new-engine-refreshes", type=int, default=2, help="timed engine rebuilds per mode (slow)")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of vLLM (unbound) and of torch here")
    ap.add_argument("--json", default=str(REPO / "runs" / "bench_refresh.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from orpo_distill.config import ModelConfig
    from orpo_distill.evaluate import evaluate
    from orpo_distill.files import atomic_write_text
    from orpo_distill.sampling.hf import HFGenerator
    from orpo_distill.sampling.vllm_live import LiveStudent
    from orpo_distill.tasks.synthetic import SyntheticTask

    model, tok = build_model(args.hidden, args.layers, args.heads)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        cfg = ModelConfig(model=str(base), backend="vllm", template="plain", dtype="float32")
        task = SyntheticTask()
        qs = task.load_questions("test", limit=args.questions)

        # 1. Weight push into one live engine, then greedy evaluation: live engine vs transformers.
        t0 = time.perf_counter()
        with LiveStudent(cfg, tok, python=args.vllm_python, vllm_args=ENGINE_ARGS, threads=args.threads) as st:
            start_s = time.perf_counter() - t0
            times = []
            for r in range(args.refreshes):
                perturb(model, r)
                times.append(st.refresh(model, r + 1))
            rows.append({"what": "refresh: weight push (live engine)", **stats(times), "engine_start_s": start_s})
            gen = st.generator(model_id="bench", revision="r")
            ours = evaluate(gen, task, qs, max_new_tokens=args.max_new_tokens, batch_size=32, progress=False)
            # vLLM schedules its own batches: one call with every question
            ours_all = evaluate(gen, task, qs, max_new_tokens=args.max_new_tokens, batch_size=len(qs),
                                progress=False)
        theirs = evaluate(HFGenerator(model, tok, model_id="bench", revision="r", template="plain", batch_size=32),
                          task, qs, max_new_tokens=args.max_new_tokens, batch_size=32, progress=False)
        for name, res in (("vllm live engine, 32 per call", ours), (f"vllm live engine, {len(qs)} per call", ours_all),
                          ("transformers (HFGenerator), batch 32", theirs)):
            # Greedy equality with the transformers backend; a random model has near-ties (top-2 logits within
            # ~1e-7) where vLLM's CPU kernels and torch may round to different tokens.
            same = sum(a == b for a, b in zip(res.predictions, theirs.predictions))
            rows.append({"what": f"eval {len(qs)} q greedy: {name}", "median_s": res.seconds, "n": 1,
                         "generated_tokens": res.generated_tokens, "accuracy": res.accuracy,
                         "predictions_equal_to_transformers": f"{same}/{len(qs)}"})

        # 2. LoRA: save the adapter, serve it with a new LoRARequest.
        lora_model = get_peft_model(build_model(args.hidden, args.layers, args.heads)[0],
                                    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
        t0 = time.perf_counter()
        with LiveStudent(cfg, tok, lora_rank=8, python=args.vllm_python, vllm_args=ENGINE_ARGS,
                         threads=args.threads) as st:
            start_s = time.perf_counter() - t0
            times = []
            for r in range(args.refreshes):
                perturb(lora_model, r)
                times.append(st.refresh(lora_model, r + 1))
                st.generator(model_id="b", revision="r").generate(["1 + 1"], _greedy(4))  # loads the adapter
            rows.append({"what": "refresh: LoRARequest (live engine)", **stats(times), "engine_start_s": start_s})

        # 3. Today's path: save the student folder, build a new engine from it, free it.
        for mode, mp in (("default multiprocess", "1"), ("in-process", "0")):
            dirs, saves = [], []
            for r in range(args.new_engine_refreshes):
                d = Path(tmp) / f"sampling_model_{mode[:2]}{r}"
                t0 = time.perf_counter()
                model.save_pretrained(d)
                tok.save_pretrained(d)
                saves.append(time.perf_counter() - t0)
                dirs.append(str(d))
            script = Path(tmp) / "new_engine.py"
            script.write_text(NEW_ENGINE_WORKER)
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING=mp, VLLM_LOGGING_LEVEL="ERROR",
                       PYTHONPATH=str(REPO / "src"), VLLM_CPU_OMP_THREADS_BIND="nobind",
                       OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run([args.vllm_python, str(script), json.dumps(ENGINE_ARGS), *dirs],
                                  capture_output=True, text=True, env=env, timeout=1800)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if not line:
                raise SystemExit(f"new-engine worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            got = json.loads(line[7:])
            per = [s + g["build_s"] + g["free_s"] for s, g in zip(saves, got)]
            rows.append({"what": f"refresh: save + new engine ({mode})", **stats(per),
                         "save_s": statistics.median(saves), "build_s": statistics.median(g["build_s"] for g in got)})

    out = {"model": {"params_M": round(params_m, 2), "hidden": args.hidden, "layers": args.layers,
                     "heads": args.heads, "dtype": "float32"},
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                       "python": sys.version.split()[0]},
           "rows": rows}
    print(f"\nmodel: {params_m:.2f}M params, fp32, CPU ({os.cpu_count()} cores, {args.threads} thread(s) each)\n")
    print(f"| {'what':<56} | {'median s':>9} | {'min s':>8} | {'max s':>8} | n |")
    print(f"|{'-' * 58}|{'-' * 11}|{'-' * 10}|{'-' * 10}|---|")
    for r in rows:
        print(f"| {r['what']:<56} | {r['median_s']:>9.3f} | {r.get('min_s', r['median_s']):>8.3f} | "
              f"{r.get('max_s', r['median_s']):>8.3f} | {r['n']} |")
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("what", "median_s", "min_s", "max_s", "n")}
        if extra:
            print(f"  {r['what']}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in extra.items()))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {path}")


def _greedy(n_tokens: int):
    from orpo_distill.sampling.base import SamplingParams

    return SamplingParams(n=1, temperature=0, max_new_tokens=n_tokens)


if __name__ == "__main__":
    main()
