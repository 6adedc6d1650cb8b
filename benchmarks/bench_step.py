"""Per-step time and peak memory of one ORPO step: our trainer (`train.train_variant`) vs TRL's experimental
ORPOTrainer, on the same tiny model and the same batch, side by side in one run.

Both sides train the same random-weight Llama-shaped student (the anchor's Qwen2 dimensions; a Qwen2 config in
the folder would make transformers 5 rebuild the word-level tokenizer as a Qwen2 BPE one) (saved once to a temporary folder) on the same
preference pairs: random-word prompts of P tokens and chosen/rejected completions of C tokens (C - 1 words + EOS)
under a word-level tokenizer, so both tokenise every pair to exactly P + C tokens; `PAIRS` pairs per step,
lambda = beta = 1, AdamW, max grad norm 1, fp32 on the CPU (or bf16 autocast on CUDA with --device cuda).

The `gsm8k` shape draws every prompt and every chosen / rejected completion length independently from the
length distribution of GSM8K's test questions and reference answers (deciles of their word-and-punctuation piece
counts, `GSM8K_DECILES`), so a step holds what real traces hold: sequences of different lengths, chosen and
rejected of different lengths, padding in every padded batch. Its tokens/s counts real tokens only (prompt +
completion of every sequence, no pads), the same for every configuration.

Each configuration runs in its own child process (one torch thread on CPU) so that memory numbers do not mix:
- time: the median interval between consecutive optimiser-step ends (AdamW.step is wrapped the same way on both
  sides), skipping the first 3 steps; it therefore includes everything each trainer does per step (collation,
  forward, backward, clipping, logging);
- memory (CPU): the process's peak resident set size (`resource.getrusage(...).ru_maxrss`, kernel-tracked) and that
  peak minus the RSS just before the first training forward (the step's own working set: activations, gradients,
  optimiser state, logits). tracemalloc is NOT used: it does not see tensor memory. On CUDA: max_memory_allocated.
Besides wall seconds per step the children report CPU seconds per step (the process's user + system time between
the same step ends): on a shared machine wall time also counts waiting for a core, CPU time much less so.
Configurations: ours (gradient checkpointing off, our default), ours_pack (`trainer.packing: true`,
padding-free batches), ours_bf16 (`trainer.precision: bf16`, bf16 autocast on the CPU too), ours_gc (gradient
checkpointing on), trl (TRL's defaults: gradient checkpointing on), trl_nogc (off).

    python benchmarks/bench_step.py                  # tiny shape (the anchor's CPU shape)
    python benchmarks/bench_step.py --shape small    # a somewhat larger model and batch
    python benchmarks/bench_step.py --shape gsm8k    # the small model on GSM8K-like lengths (8 pairs a step)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # vocab, hidden, layers, intermediate, heads, prompt tokens, completion tokens, pairs per step
    "tiny": (32000, 64, 2, 256, 4, 16, 32, 2),
    "small": (32000, 256, 4, 1024, 4, 64, 192, 4),
    # the small model; P and C are the caps of the drawn lengths (prompt, completion)
    "gsm8k": (32000, 256, 4, 1024, 4, 181, 304, 8),
}
# Deciles (0%, 10%, ..., 100%) of GSM8K test-set lengths in word-and-punctuation pieces (regex \w+|[^\w\s]) of
# the 1319 questions (prompts) and reference answers (completions); lengths are drawn uniformly between deciles.
GSM8K_DECILES = {"prompt": (19, 32, 36, 41, 46, 51, 55, 61, 68, 81, 181),
                 "completion": (25, 53, 65, 74, 84, 94, 106, 119, 134, 159, 304)}
VARIABLE = {"gsm8k"}
CONFIGS = ("ours", "ours_pack", "ours_bf16", "ours_gc", "trl", "trl_nogc")
WARMUP = 3


def draw_length(rng, deciles: tuple[int, ...]) -> int:
    """A length drawn from a distribution given by its deciles (uniform between neighbouring deciles)."""
    i = rng.randrange(10)
    return rng.randint(deciles[i], deciles[i + 1])


def _words(rng, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n))


def build(shape: str, root: Path, steps: int) -> dict:
    """The shared model folder, tokenizer and pairs (JSON) for every child."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    V, H, L, FF, NH, P, C, PAIRS = SHAPES[shape]
    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<pad>": V - 3, "<eos>": V - 2, "<unk>": V - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # A chat template that renders the user message alone, so our prompt is exactly TRL's prompt text.
    tok.chat_template = "{{ messages[-1]['content'] }}"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=V - 2, pad_token_id=V - 3)
    model_dir = root / "student"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(1)
    n = PAIRS * (steps + 1)
    # TRL tokenises prompt + completion as one string: the trailing space keeps the last prompt word apart.
    if shape in VARIABLE:
        lens = [(draw_length(rng, GSM8K_DECILES["prompt"]), draw_length(rng, GSM8K_DECILES["completion"]),
                 draw_length(rng, GSM8K_DECILES["completion"])) for _ in range(n)]
    else:
        lens = [(P, C, C)] * n
    pairs = [{"prompt": _words(rng, p, V) + " ", "chosen": _words(rng, c - 1, V), "rejected": _words(rng, r - 1, V)}
             for p, c, r in lens]
    (root / "pairs.json").write_text(json.dumps(pairs))
    # real tokens (prompt + completion + EOS, both sequences of a pair), per pair on average
    real = sum(2 * p + c + r for p, c, r in lens) / n
    return {"model_dir": str(model_dir), "P": P, "C": C, "PAIRS": PAIRS, "V": V, "steps": steps,
            "variable": shape in VARIABLE, "max_total": max(p + max(c, r) for p, c, r in lens),
            "real_tokens_per_step": real * PAIRS}


class _Probe:
    """Step-end times (AdamW.step wrapped) and the RSS before the first forward (LlamaModel.forward wrapped)."""

    def __init__(self, device: str) -> None:
        import psutil
        import torch
        from transformers.models.llama import modeling_llama

        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.rss_before = None
        self.cuda = device == "cuda"
        proc = psutil.Process()
        probe = self
        step0 = torch.optim.AdamW.step

        def step(opt, *a, **k):
            out = step0(opt, *a, **k)
            if probe.cuda:
                torch.cuda.synchronize()
            probe.ends.append(time.perf_counter())
            probe.cpu_ends.append(time.process_time())
            return out

        torch.optim.AdamW.step = step
        fwd0 = modeling_llama.LlamaModel.forward

        def fwd(self_, *a, **k):
            if probe.rss_before is None and torch.is_grad_enabled():
                probe.rss_before = proc.memory_info().rss
                if probe.cuda:
                    torch.cuda.reset_peak_memory_stats()
                    probe.cuda_before = torch.cuda.memory_allocated()
            return fwd0(self_, *a, **k)

        modeling_llama.LlamaModel.forward = fwd

    def report(self) -> dict:
        import resource

        import torch

        d = [b - a for a, b in zip(self.ends[WARMUP:], self.ends[WARMUP + 1:])]
        dc = [b - a for a, b in zip(self.cpu_ends[WARMUP:], self.cpu_ends[WARMUP + 1:])]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        out = {"steps_timed": len(d), "s_per_step": statistics.median(d) if d else None,
               "cpu_s_per_step": statistics.median(dc) if dc else None,
               "peak_rss_MiB": round(peak / 2**20, 1),
               "step_peak_over_start_MiB": round((peak - (self.rss_before or peak)) / 2**20, 1)}
        if self.cuda:
            out["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["cuda_step_peak_MiB"] = round((torch.cuda.max_memory_allocated() - self.cuda_before) / 2**20, 1)
        return out


def child_ours(setup: dict, root: Path, gc: bool, device: str, packing: bool = False, bf16: bool = False) -> dict:
    from orpo_distill.config import config_from_dict
    from orpo_distill.sampling.stage import model_identity, params_from_config
    from orpo_distill.store import Trace, TraceStore, trace_key
    from orpo_distill.tasks.base import Grade
    from orpo_distill.train import train_variant

    pairs = json.loads((root / "pairs.json").read_text())
    P, C, PAIRS = setup["P"], setup["C"], setup["PAIRS"]
    out = root / f"ours{'_gc' if gc else ''}{'_pack' if packing else ''}{'_bf16' if bf16 else ''}"
    cfg = config_from_dict({
        "run": {"out_dir": str(out / "run")},
        "teacher": {"model": "bench-teacher", "backend": "openai"},
        "student": {"model": setup["model_dir"], "device": device, "template": "chat"},
        "sampling": {"k": 1, "student_k": 1},
        "pairs": {"max_length": P + C + 8, "max_prompt_length": P + 4},
        "objective": {"lam": 1.0},
        "trainer": {"epochs": 1, "lr": 1e-6, "batch_size": PAIRS, "warmup_ratio": 0.0, "max_grad_norm": 1.0,
                    "gradient_checkpointing": gc, "report_to": [], "precision": "bf16" if bf16 else "auto",
                    "packing": packing},
    })

    class Q:
        def __init__(self, i: int, text: str) -> None:
            self.id, self.text, self.gold, self.rationale = f"q{i}", text, "x", None

    class Task:
        name = "bench"

        def user_message(self, q):
            return q.text

        def grade(self, q, completion):
            return Grade("correct", "x")

    qs = [Q(i, p["prompt"]) for i, p in enumerate(pairs)]
    store = TraceStore(out / "traces.sqlite")
    rows = []
    for role, source, mcfg, field_, verdict in (("teacher", "teacher", cfg.teacher, "chosen", "correct"),
                                                ("student", "initial", cfg.student, "rejected", "wrong")):
        params = params_from_config(cfg, role)
        pd = params.as_dict()
        pd.pop("n")
        mid, rev = model_identity(mcfg)
        for q, p in zip(qs, pairs):
            rows.append(Trace(key=trace_key(role, mid, rev, source, q.text, params, 0), question_id=q.id, role=role,
                              source=source, model_id=mid, revision=rev, checkpoint=None, sample_index=0, seed=0,
                              params=pd, prompt=q.text, completion=p[field_], n_tokens=len(p[field_].split()) + 1,
                              prompt_tokens=len(p["prompt"].split()),
                              finish_reason="stop", latency_s=0.0, answer="x", verdict=verdict, kept=True,
                              created_at=0.0))
    store.add(rows)
    probe = _Probe(device)
    res = train_variant(cfg, "orpo_off", 0, out / "variant", task=Task(), train_questions=qs, eval_questions=None,
                        store=store, progress=False)
    rep = probe.report()
    first = res["per_epoch"][0]
    want_max = setup["max_total"] if setup["variable"] else P + C
    assert first["pairs"]["pairs"] == len(qs) and first["pairs"]["max_length_seen"] == want_max, first["pairs"]
    rep["tokens_per_step"] = setup["real_tokens_per_step"]
    return rep


def child_trl(setup: dict, root: Path, gc: bool, device: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs = json.loads((root / "pairs.json").read_text())
    P, C, PAIRS = setup["P"], setup["C"], setup["PAIRS"]
    tok = AutoTokenizer.from_pretrained(setup["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32)
    cuda = device == "cuda"
    args = ORPOConfig(output_dir=str(root / "trl_out"), per_device_train_batch_size=PAIRS, max_length=P + C + 8,
                      beta=1.0, bf16=cuda, use_cpu=not cuda, learning_rate=1e-6, max_steps=setup["steps"],
                      logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                      remove_unused_columns=False, gradient_checkpointing=gc, max_grad_norm=1.0, warmup_steps=0,
                      seed=0)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    row = trainer.train_dataset[0]
    n_chosen = len(row["chosen_input_ids"])
    want = len(pairs[0]["prompt"].split()) + len(pairs[0]["chosen"].split()) + 1
    assert n_chosen == want, (n_chosen, want)  # the same tokens as ours
    probe = _Probe(device)
    trainer.train()
    rep = probe.report()
    rep["tokens_per_step"] = setup["real_tokens_per_step"]
    rep["trl_chosen_tokens"] = n_chosen
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        import torch

        if args.device == "cpu":
            torch.set_num_threads(1)
        root = Path(args.root)
        setup = json.loads((root / "setup.json").read_text())
        gc = args.child in ("ours_gc", "trl")
        if args.child.startswith("ours"):
            rep = child_ours(setup, root, gc=gc, device=args.device, packing=args.child == "ours_pack",
                             bf16=args.child == "ours_bf16")
        else:
            rep = child_trl(setup, root, gc=gc, device=args.device)
        rep["real_tokens_per_s"] = rep["tokens_per_step"] / rep["s_per_step"] if rep.get("s_per_step") else None
        print("RESULT " + json.dumps(rep), flush=True)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = build(args.shape, root, args.steps)
        (root / "setup.json").write_text(json.dumps(setup))
        rows = {}
        for c in args.configs:
            env = dict(os.environ, OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
            p = subprocess.run([sys.executable, __file__, "--child", c, "--root", str(root), "--device", args.device,
                                "--shape", args.shape, "--steps", str(args.steps)],
                               capture_output=True, text=True, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                rows[c] = {"error": (p.stderr or p.stdout)[-2000:]}
            else:
                rows[c] = json.loads(line[-1][len("RESULT "):])
            print(c, rows[c], flush=True)
    V, H, L, _, _, P, C, PAIRS = SHAPES[args.shape]
    lengths = (f"GSM8K-like lengths (prompt <= {P}, completions <= {C}, {setup['real_tokens_per_step']:.0f} real "
               f"tokens a step on average)" if setup["variable"] else f"({P} prompt + {C} completion) tokens")
    head = (f"shape {args.shape}: Llama-shaped, tied embeddings, V={V} H={H} L={L}, {PAIRS} pairs x {lengths}; "
            f"{args.device}, torch {torch.__version__}, {'1 thread' if args.device == 'cpu' else ''}; "
            f"load average {os.getloadavg()[0]:.2f} at the end")
    print("\n" + head)
    print("| config | s/step (median) | CPU s/step | real tokens/s | peak RSS MiB | step peak over start MiB |" +
          (" CUDA peak MiB |" if args.device == "cuda" else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if args.device == "cuda" else ""))
    for c, r in rows.items():
        if "error" in r:
            print(f"| {c} | error | | | | |")
            continue
        print(f"| {c} | {r['s_per_step']:.4f} | {r['cpu_s_per_step']:.4f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['peak_rss_MiB']} | {r['step_peak_over_start_MiB']} |" +
              (f" {r['cuda_peak_MiB']} |" if args.device == "cuda" else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": head, "load_average": os.getloadavg(), "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
