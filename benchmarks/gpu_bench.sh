#!/usr/bin/env bash
# One ORPO optimiser step on a GPU: ours (loss.ORPOStudent: fused chunked head, optionally padding-free) against
# TRL's experimental ORPOTrainer (with and without its default gradient checkpointing) and a plain SFT step (the
# floor any ORPO step pays), at the 1.5B anchor shape: a Qwen2-1.5B-shaped student with random weights built
# locally (no hub, no internet), fp32 master weights under bf16 autocast, AdamW, 8 pairs x 512 tokens (128 prompt +
# 384 completion). Each configuration runs in its own process, so peak memory does not mix.
# Prints one JSON line per configuration as it finishes, then ONE JSON object with all rows: s/step (median after
# warm-up), peak GiB (torch.cuda.max_memory_allocated over the timed steps), MFU (6 x parameters x tokens per step
# against PEAK_TFLOPS, default 790: the bf16 matrix rate measured on the anchor's H100s) and tokens/s.
#
#   bash benchmarks/gpu_bench.sh                       # every configuration at the 1.5B shape
#   CONFIGS="ours trl" STEPS=10 bash benchmarks/gpu_bench.sh
#   SMOKE=1 bash benchmarks/gpu_bench.sh               # the same flow on the CPU at a tiny shape, fp32 (a check
#                                                      # of the script, not a measurement)
# Environment: PYTHON (default: .venv/bin/python if present, else python3; needs torch with CUDA, transformers,
# and for the TRL rows trl + datasets), SHAPE (1.5b | 0.5b | tiny), CONFIGS (sft ours ours_gc ours_pack trl
# trl_nogc; ours_gc: with gradient checkpointing, TRL's default, for the memory comparison),
# STEPS (timed steps, default 8), WARMUP (default 3), PAIRS, PROMPT, COMPLETION, PEAK_TFLOPS, TIMEOUT (s per
# configuration), ATTN (attention implementation, default sdpa; flash_attention_2 where installed).
# ours_pack draws completion lengths between COMPLETION/2 and COMPLETION (real traces vary) and packs them; its
# tokens/s counts real tokens and is the one to compare; the other rows use equal lengths (no padding at all).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "${SMOKE:-0}" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  SHAPE=${SHAPE:-tiny} STEPS=${STEPS:-2} WARMUP=${WARMUP:-1} PAIRS=${PAIRS:-2} PROMPT=${PROMPT:-8}
  COMPLETION=${COMPLETION:-16}
fi
SHAPE=${SHAPE:-1.5b}
CONFIGS=${CONFIGS:-sft ours ours_gc ours_pack trl trl_nogc}
export SHAPE STEPS=${STEPS:-8} WARMUP=${WARMUP:-3} PAIRS=${PAIRS:-8} PROMPT=${PROMPT:-128}
export COMPLETION=${COMPLETION:-384} PEAK_TFLOPS=${PEAK_TFLOPS:-790} ATTN=${ATTN:-sdpa} SMOKE=${SMOKE:-0}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TIMEOUT=${TIMEOUT:-900}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cat > "$OUT/step.py" <<'PY'
"""One configuration of benchmarks/gpu_bench.sh (argv[1]); prints `ROW {json}`."""
import json, os, statistics, sys, time

import torch

cfg_name = sys.argv[1]
smoke = os.environ["SMOKE"] == "1"
dev = "cpu" if smoke else "cuda"
cuda = dev == "cuda"
if smoke:
    torch.set_num_threads(1)
sync = torch.cuda.synchronize if cuda else (lambda: None)
SHAPES = {  # vocab, hidden, layers, intermediate, heads, kv heads
    "1.5b": (151936, 1536, 28, 8960, 12, 2), "0.5b": (151936, 896, 24, 4864, 14, 2), "tiny": (1000, 64, 2, 128, 4, 2)}
V, H, L, I, NH, KV = SHAPES[os.environ["SHAPE"]]
P, C, PAIRS = int(os.environ["PROMPT"]), int(os.environ["COMPLETION"]), int(os.environ["PAIRS"])
STEPS, WARMUP = int(os.environ["STEPS"]), int(os.environ["WARMUP"])
T = P + C
amp = dict(device_type=dev, dtype=torch.bfloat16, enabled=cuda)


def new_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=KV, max_position_embeddings=4096, tie_word_embeddings=True,
                      attn_implementation=os.environ["ATTN"])
    m = Qwen2ForCausalLM(cfg).to(dev)  # fp32 master weights; autocast supplies bf16
    m.config.use_cache = False
    return m


def batch(var_lengths: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V - 3, (2 * PAIRS, T), generator=g)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, P:] = 1
    if var_lengths:  # completions of C/2 .. C tokens, right-padded
        for i, n in enumerate(torch.randint(C // 2, C + 1, (2 * PAIRS,), generator=g).tolist()):
            am[i, P + n:] = 0
            cm[i, P + n:] = 0
    return {"input_ids": ids.to(dev), "attention_mask": am.to(dev), "completion_mask": cm.to(dev),
            "is_pair": torch.tensor(True)}


def timed(step, tokens):
    for _ in range(WARMUP):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def row(t, peak, n_params, tokens, extra=None):
    out = {"config": cfg_name, "s_per_step": round(t, 4), "peak_GiB": round(peak, 2),
           "MFU": round(6 * n_params * tokens / t / (float(os.environ["PEAK_TFLOPS"]) * 1e12), 4),
           "tokens_per_s": round(tokens / t), "tokens_per_step": tokens, "params_M": round(n_params / 1e6, 1)}
    out.update(extra or {})
    return out


def run_ours(packing: bool, gc: bool = False):
    from orpo_distill.loss import ORPOLoss, ORPOStudent, SFTLoss

    model = new_model()
    if gc:  # as trainer.gradient_checkpointing does (non-reentrant)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = ORPOStudent(model, ORPOLoss(lam=1.0), SFTLoss(), packing=packing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    b = batch(var_lengths=packing)
    tokens = int(b["attention_mask"].sum())

    def step():
        with torch.autocast(**amp):
            loss, _ = student(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, peak = timed(step, tokens)
    from orpo_distill.loss import chunked_head_ok, fused_path_ok

    return row(t, peak, sum(p.numel() for p in model.parameters()), tokens,
               {"fused_head": bool(chunked_head_ok(model)) and fused_path_ok(model), "packing": packing,
                "gradient_checkpointing": gc})


def run_sft():
    model = new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    ids = batch(False)["input_ids"]

    def step():
        with torch.autocast(**amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, peak = timed(step, ids.numel())
    return row(t, peak, sum(p.numel() for p in model.parameters()), ids.numel())


def run_trl(gc: bool):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<pad>": V - 3, "<eos>": V - 2, "<unk>": V - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    g = torch.Generator().manual_seed(1)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(0, V - 3, (n,), generator=g).tolist())
    n_steps = WARMUP + STEPS + 1
    ds = Dataset.from_list([{"prompt": words(P) + " ", "chosen": words(C - 1), "rejected": words(C - 1)}
                            for _ in range(PAIRS * n_steps)])
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            sync()
            ends.append(time.perf_counter())

    model = new_model()
    args = ORPOConfig(output_dir=os.path.join(os.environ["OUT"], f"trl_{cfg_name}"), per_device_train_batch_size=PAIRS,
                      max_length=T + 8, beta=1.0, bf16=cuda, use_cpu=not cuda, learning_rate=1e-6,
                      max_steps=n_steps, logging_steps=10_000, save_strategy="no", report_to=[],
                      dataloader_num_workers=0, remove_unused_columns=False, gradient_checkpointing=gc,
                      max_grad_norm=1.0, warmup_steps=0, seed=0)
    tr = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])

    class Reset(TrainerCallback):
        def on_step_end(self, *a, **k):
            if len(ends) == WARMUP and cuda:
                torch.cuda.reset_peak_memory_stats()

    tr.add_callback(Reset())
    tr.train()
    d = [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1:])]
    t = statistics.median(d)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return row(t, peak, sum(p.numel() for p in model.parameters()), 2 * PAIRS * T,
               {"gradient_checkpointing": gc})


runs = {"sft": run_sft, "ours": lambda: run_ours(False), "ours_pack": lambda: run_ours(True),
        "ours_gc": lambda: run_ours(False, gc=True),
        "trl": lambda: run_trl(True), "trl_nogc": lambda: run_trl(False)}
try:
    out = runs[cfg_name]()
except Exception as e:  # one failing configuration must not hide the others
    import traceback

    traceback.print_exc()
    out = {"config": cfg_name, "error": repr(e)[:400]}
print("ROW " + json.dumps(out), flush=True)
PY

export OUT
ROWS=()
for c in $CONFIGS; do
  line=$(timeout "$TIMEOUT" "$PYTHON" "$OUT/step.py" "$c" 2>"$OUT/$c.err" | grep '^ROW ' | tail -1)
  if [ -z "$line" ]; then
    line="ROW $("$PYTHON" -c 'import json,sys; print(json.dumps({"config": sys.argv[1], "error": open(sys.argv[2]).read()[-600:]}))' "$c" "$OUT/$c.err")"
  fi
  echo "${line#ROW }"
  ROWS+=("${line#ROW }")
done
printf '%s\n' "${ROWS[@]}" | "$PYTHON" -c '
import json, os, sys
import torch
rows = [json.loads(l) for l in sys.stdin if l.strip()]
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
print(json.dumps({"device": dev, "torch": torch.__version__, "shape": os.environ["SHAPE"],
                  "pairs": int(os.environ["PAIRS"]), "tokens": int(os.environ["PROMPT"]) + int(os.environ["COMPLETION"]),
                  "rows": rows}, indent=1))'
