"""Build the offline demo's two tiny models from scratch, deterministically from a seed, on a CPU.

The teacher is GPT-2-style with a byte-level BPE tokenizer; the student is Llama-style with a Metaspace BPE that
splits every digit into its own token (so a tiny model can learn column arithmetic), so the demo distils across
architectures and vocabularies. Both tokenizers are trained with the `tokenizers` library and both models with
plain PyTorch on gold rationales of the synthetic task's "pretrain" split (disjoint by construction from
train/validation/test), each under its own task options: the teacher on chains of 2-4 steps with numbers up to 40,
long enough to be competent; the student only on chains of 1-2 steps with numbers up to 20. The demo asks for 3-4
steps up to 20, so the student can do each step but has never carried a chain that far: a skill the teacher's
traces can transfer. The script then measures both on the demo task's validation split (greedy accuracy; share of
correct traces among K samples at T=0.8), saves each as a Hugging Face folder (safetensors) and writes BUILD.json
with the seed, command, step counts, measurements and the sha256 of every file. Same seed, same thread count, same
software: same bytes. `--roles student` retrains only the student and keeps the teacher when BUILD.json records
it built with the same spec (how the shipped student was rebuilt; the full command rebuilds both).

    python -m orpo_distill.demo.build --out src/orpo_distill/demo/assets --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# The tokenizers trainers run on a thread pool; one thread keeps their output independent of scheduling.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402

from ..tasks.base import Question  # noqa: E402
from ..tasks.prompts import render_prompt  # noqa: E402
from ..tasks.synthetic import SyntheticTask, rationale_variant  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """One tiny model: architecture sizes, tokenizer, and how long it is trained."""

    arch: str  # "gpt2" | "llama"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    n_questions: int  # distinct pretrain problems it sees (each in a fresh wording every time)
    kv_heads: int = 0  # llama only; 0 = heads
    intermediate: int = 0  # llama only; 0 = 4 * hidden
    max_positions: int = 256
    tokenizer: str = "byte_bpe"  # "byte_bpe" (GPT-2 style) | "unigram" | "digit_bpe" (Metaspace BPE, one token a digit)
    # Overrides of BuildSpec.task_options for this model's pretraining problems (and, for a model whose tokenizer
    # differs from the teacher's, its tokenizer texts): e.g. a student that only ever sees chains of 1-2 steps.
    task_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 0
    threads: int = 1
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(
        arch="gpt2", vocab_size=512, hidden=128, layers=4, heads=4, steps=2000, batch_size=32, lr=3e-3,
        n_questions=64000))
    # The student has only ever seen chains of 1-2 steps with numbers up to 20; the demo asks for 3-4 steps.
    student: ModelSpec = field(default_factory=lambda: ModelSpec(
        arch="llama", vocab_size=337, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, steps=2000,
        batch_size=32, lr=3e-3, n_questions=3000, tokenizer="digit_bpe",
        task_overrides={"min_steps": 1, "max_steps": 2, "max_number": 20}))
    tokenizer_texts: int = 4000  # question+rationale texts each tokenizer is trained on
    eval_questions: int = 200  # validation questions for greedy accuracy
    sample_questions: int = 100  # validation questions for K samples at T
    k: int = 8
    temperature: float = 0.8
    max_new_tokens: int = 96
    eval_batch: int = 100
    task_options: dict[str, Any] = field(default_factory=lambda: {"seed": 0, "n_pretrain": 64000})
    # The demo task the measurements are taken on (validation split): longer chains than the student has seen.
    eval_task_options: dict[str, Any] = field(default_factory=lambda: {"min_steps": 3, "max_steps": 4,
                                                                        "max_number": 20})


# ---------------------------------------------------------------------------------------------------- tokenizers
def _train_texts(task: SyntheticTask, questions: list[Question], n: int, seed: int) -> list[str]:
    rng = random.Random(f"tokenizer-texts|{seed}")
    return [render_prompt(None, task.user_message(q), "plain") + rationale_variant(q, rng) for q in questions[:n]]


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """GPT-2 style: byte-level BPE, no BOS, <|endoftext|> as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=256)


def train_unigram_tokenizer(texts: list[str], vocab_size: int):
    """Llama/SentencePiece style: unigram over Metaspace words, <s> prepended, </s> EOS, <pad> pad.

    Newlines are split off before Metaspace so that a plain prompt ending in "\\n" tokenizes the same alone
    as in front of its completion (prompt + completion tokenized together == prompt, then completion).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    # The trainer seeds its pieces with substrings repeated across *distinct* words, so a word that only ever
    # occurs in one form ("Question:", "He") would never become a piece and is spelled out letter by letter.
    # One extra variant of each distinct word ("He.") makes every whole word a seed candidate; EM still decides.
    words = sorted({w.lstrip("\u2581") for t in texts for w, _ in tk.pre_tokenizer.pre_tokenize_str(t)} - {"", "\n"})
    tk.train_from_iterator(list(texts) + [w + "." for w in words], trainer)
    tk.model = models.Unigram(_canonical_unigram_vocab(json.loads(tk.to_str())["model"]["vocab"], 4), unk_id=3,
                              byte_fallback=False)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256)


def train_digit_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Llama style with digits split: BPE over Metaspace words, every digit its own token, <s> prepended.

    One token per digit lets a tiny model do column arithmetic on numbers it has never seen as a whole (a BPE
    that merges "37" into one piece has to memorise every sum). Newlines are split off before Metaspace, as in
    the unigram tokenizer, so a plain prompt ending in "\\n" tokenizes the same alone and in front of its
    completion.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256)


def _canonical_unigram_vocab(vocab: list[list[Any]], n_special: int) -> list[tuple[str, float]]:
    """The trained unigram vocabulary in an order and with scores that do not depend on hash-map order.

    The trainer's EM sums over hash maps (scores differ between runs in the last bits), and it appends the
    characters that EM dropped, taken from a hash set in arbitrary order, with scores stepping down by 1e-4.
    Scores are rounded, that run of characters is re-dealt in character order, and the pieces before and after
    it are sorted by (score, piece).
    """
    body = [(str(p), round(float(sc), 8)) for p, sc in vocab[n_special:]]
    in_run = [k for k in range(len(body) - 1)
              if len(body[k][0]) == 1 and len(body[k + 1][0]) == 1
              and abs((body[k][1] - body[k + 1][1]) - 1e-4) < 1e-6]
    if in_run:
        lo, hi = min(in_run), max(in_run) + 2
        run = list(zip(sorted(p for p, _ in body[lo:hi]), [sc for _, sc in body[lo:hi]]))
    else:
        lo = hi = len(body)
        run = []
    def order(part: list[tuple[str, float]]) -> list[tuple[str, float]]:
        return sorted(part, key=lambda ps: (-ps[1], ps[0]))

    head = [(str(p), round(float(sc), 8)) for p, sc in vocab[:n_special]]
    return head + order(body[:lo]) + run + order(body[hi:])


# ModelSpec.tokenizer -> the function that trains it on texts to a vocabulary size.
TOKENIZERS: dict[str, Callable[[list[str], int], Any]] = {
    "byte_bpe": train_bpe_tokenizer, "unigram": train_unigram_tokenizer, "digit_bpe": train_digit_bpe_tokenizer}


# -------------------------------------------------------------------------------------------------------- models
def make_model(spec: ModelSpec, tokenizer, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if spec.arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=spec.max_positions, n_embd=spec.hidden,
                         n_layer=spec.layers, n_head=spec.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         **common)
        model = GPT2LMHeadModel(cfg)
    elif spec.arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden,
                          intermediate_size=spec.intermediate or 4 * spec.hidden, num_hidden_layers=spec.layers,
                          num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads or spec.heads,
                          max_position_embeddings=spec.max_positions, tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {spec.arch!r} (gpt2 or llama)")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ training
def encode_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the tokenizer's own special tokens, e.g. <s>) and completion ids + EOS.

    The same split the project's pair tokeniser uses: prompt and completion tokenized separately.
    """
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, c


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    t = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), t), dtype=torch.long)
    labels = torch.full((len(examples), t), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine down to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(model, tokenizer, spec: ModelSpec, task: SyntheticTask, pool: list[Question], seed: int,
                log_every: int = 100, name: str = "", callback: Callable[[int], None] | None = None) -> list[float]:
    """Completion-only NLL on gold rationales; the data order and wordings are fixed by `seed`."""
    pool = pool[:spec.n_questions]
    order_rng = random.Random(f"order|{name}|{seed}")
    word_rng = random.Random(f"wording|{name}|{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses: list[float] = []
    perm: list[int] = []
    t0 = time.time()
    for step in range(spec.steps):
        batch = []
        for _ in range(spec.batch_size):
            if not perm:
                perm = list(range(len(pool)))
                order_rng.shuffle(perm)
            q = pool[perm.pop()]
            prompt = render_prompt(tokenizer, task.user_message(q), "plain")
            batch.append(encode_example(tokenizer, prompt, rationale_variant(q, word_rng)))
        enc = collate(batch, tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec.steps, spec.lr)
        out = model(**enc)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[{name}] step {step + 1}/{spec.steps} loss {recent:.4f} ({time.time() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
        if callback is not None:
            model.eval()
            callback(step + 1)  # e.g. a validation probe while exploring sizes; must not touch the RNGs above
            model.train()
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(model, tokenizer, task: SyntheticTask, questions: list[Question], *, n: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 96, batch_size: int = 100,
             seed: int = 0) -> list[list[str]]:
    """`n` completions per question (greedy when temperature is 0), plain prompts, left-padded batches."""
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    torch.manual_seed(seed)
    prompts = [render_prompt(tokenizer, task.user_message(q), "plain") for q in questions]
    per_batch = max(1, batch_size // n)
    for i in range(0, len(prompts), per_batch):
        chunk = prompts[i:i + per_batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        kwargs: dict[str, Any] = {"do_sample": False} if temperature == 0 else {
            "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": n}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j in range(len(chunk)):
            out.append([t.strip() for t in texts[j * (n if temperature else 1):(j + 1) * (n if temperature else 1)]])
    tokenizer.padding_side = "right"
    return out


def measure(model, tokenizer, task: SyntheticTask, val: list[Question], spec: BuildSpec) -> dict[str, Any]:
    t0 = time.time()
    greedy_qs = val[:spec.eval_questions]
    greedy = generate(model, tokenizer, task, greedy_qs, max_new_tokens=spec.max_new_tokens,
                      batch_size=spec.eval_batch)
    verdicts = [task.grade(q, c[0]).verdict for q, c in zip(greedy_qs, greedy)]
    t1 = time.time()
    sample_qs = val[:spec.sample_questions]
    samples = generate(model, tokenizer, task, sample_qs, n=spec.k, temperature=spec.temperature,
                       max_new_tokens=spec.max_new_tokens, batch_size=spec.eval_batch, seed=spec.seed)
    sv = [[task.grade(q, c).verdict for c in cs] for q, cs in zip(sample_qs, samples)]
    flat = [v for row in sv for v in row]
    t2 = time.time()
    return {
        "greedy_accuracy": verdicts.count("correct") / len(verdicts),
        "greedy_unparsed": verdicts.count("unparsed") / len(verdicts),
        "greedy_n": len(verdicts),
        "sample_correct_share": flat.count("correct") / len(flat),
        "sample_unparsed_share": flat.count("unparsed") / len(flat),
        "questions_with_a_correct_sample": sum("correct" in r for r in sv) / len(sv),
        "questions_with_a_wrong_sample": sum(any(v != "correct" for v in r) for r in sv) / len(sv),
        "sample_n": len(flat),
        "k": spec.k,
        "temperature": spec.temperature,
        "greedy_seconds": round(t1 - t0, 2),
        "sample_seconds": round(t2 - t1, 2),
        "example_greedy": greedy[0][0],
        "example_samples": samples[0][:3],
    }


# --------------------------------------------------------------------------------------------------------- build
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def set_determinism(threads: int) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def build(out: Path, spec: BuildSpec, *, measure_models: bool = True, command: str = "",
          log_every: int = 100, roles: tuple[str, ...] = ("teacher", "student"),
          callback: Callable[[str, Any, Any, int], None] | None = None) -> dict[str, Any]:
    """Train the models named in `roles`, save them under `out/<role>`, write `out/BUILD.json`.

    A role not in `roles` is kept as it is in `out`, but only when `out/BUILD.json` records it built with exactly
    the spec this build would use (same sizes, steps, data, seed, threads), so BUILD.json still describes what
    the full command produces; its recorded hashes are checked against the files. Torch's global determinism and
    thread settings are restored afterwards (tests call this in-process). `callback(role, model, tokenizer,
    step)` runs after each training step (a validation probe while choosing sizes; it must not touch the RNGs).
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    set_determinism(spec.threads)
    try:
        return _build(out, spec, measure_models=measure_models, command=command, log_every=log_every,
                      roles=roles, callback=callback)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def _pretrain_data(spec: BuildSpec, mspec: ModelSpec) -> tuple[SyntheticTask, list[Question], list[str]]:
    """A model's pretraining problems and its tokenizer's texts, under its own task options."""
    task = SyntheticTask({**spec.task_options, **mspec.task_overrides})
    n_pool = max(spec.teacher.n_questions, spec.student.n_questions, spec.tokenizer_texts) \
        if not mspec.task_overrides else max(mspec.n_questions, spec.tokenizer_texts)
    pool = task.load_questions("pretrain", limit=n_pool)
    if len(pool) < n_pool:
        raise ValueError(f"only {len(pool)} pretrain questions; raise task_options n_pretrain to {n_pool}")
    return task, pool, _train_texts(task, pool, spec.tokenizer_texts, spec.seed)


def _kept_role(out: Path, role: str, mspec: ModelSpec, spec: BuildSpec) -> dict[str, Any]:
    """The recorded build info of a role this build keeps (refused unless it was built with the same spec)."""
    path = out / "BUILD.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    recorded = dict(old.get("spec", {}).get(role) or {})
    recorded.setdefault("tokenizer", "byte_bpe")  # fields added since: their defaults are what that build did
    recorded.setdefault("task_overrides", {})
    same = (recorded == json.loads(json.dumps(asdict(mspec)))
            and old.get("seed") == spec.seed and old.get("threads") == spec.threads
            and old.get("spec", {}).get("tokenizer_texts") == spec.tokenizer_texts
            and old.get("spec", {}).get("task_options") == spec.task_options)
    if not same:
        raise ValueError(f"{path}: the {role} there was not built with this spec; rebuild it (--roles {role})")
    info = dict(old["models"][role])
    on_disk = {f.name: sha256_file(f) for f in sorted((out / role).iterdir()) if f.is_file()}
    if on_disk != info["files"]:
        raise ValueError(f"{out / role}: files differ from the hashes in {path}; rebuild it (--roles {role})")
    info.pop("validation", None)
    info["kept_from_previous_build"] = True
    return info


def _build(out: Path, spec: BuildSpec, *, measure_models: bool, command: str, log_every: int,
           roles: tuple[str, ...], callback: Callable[[str, Any, Any, int], None] | None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    cpu0 = time.process_time()
    eval_task = SyntheticTask({**spec.task_options, **spec.eval_task_options})
    val = eval_task.load_questions("validation", limit=max(spec.eval_questions, spec.sample_questions))

    report: dict[str, Any] = {"seed": spec.seed, "command": command, "threads": spec.threads,
                              "spec": asdict(spec), "models": {}}
    out.mkdir(parents=True, exist_ok=True)
    for role, mspec, seed_offset in (("teacher", spec.teacher, 1), ("student", spec.student, 2)):
        d = out / role
        if role not in roles:
            info = _kept_role(out, role, mspec, spec)
            if measure_models:
                model = AutoModelForCausalLM.from_pretrained(d).eval()
                info["validation"] = measure(model, AutoTokenizer.from_pretrained(d), eval_task, val, spec)
            report["models"][role] = info
            continue
        t0 = time.time()
        task, pool, texts = _pretrain_data(spec, mspec)
        tok = TOKENIZERS[mspec.tokenizer](texts, mspec.vocab_size)
        model = make_model(mspec, tok, spec.seed * 1000 + seed_offset)
        probe = None if callback is None else (lambda step, m=model, t=tok, r=role: callback(r, m, t, step))
        losses = train_model(model, tok, mspec, task, pool, spec.seed * 1000 + seed_offset,
                             log_every=log_every, name=role, callback=probe)
        train_s = time.time() - t0
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.iterdir():
            stale.unlink()
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        info: dict[str, Any] = {
            "arch": mspec.arch, "params": n_params(model), "steps": mspec.steps, "vocab": len(tok),
            "pretrain_steps_per_problem": f"{task.options['min_steps']}-{task.options['max_steps']}",
            "train_seconds": round(train_s, 1), "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "files": {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file()},
        }
        if measure_models:
            info["validation"] = measure(model, tok, eval_task, val, spec)
        report["models"][role] = info
    report["build_seconds"] = round(time.time() - t_start, 1)
    report["process_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    report["total_bytes"] = sum(f.stat().st_size for d in ("teacher", "student") for f in (out / d).iterdir())
    report["software"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "transformers": _version("transformers"), "tokenizers": _version("tokenizers"),
                          "machine": platform.machine(), "processor": platform.processor()}
    (out / "BUILD.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _spec_from_args(args: argparse.Namespace) -> BuildSpec:
    spec = BuildSpec(seed=args.seed, threads=args.threads)
    if args.teacher_steps is not None:
        spec = replace(spec, teacher=replace(spec.teacher, steps=args.teacher_steps))
    if args.student_steps is not None:
        spec = replace(spec, student=replace(spec.student, steps=args.student_steps))
    if args.eval_questions is not None:
        spec = replace(spec, eval_questions=args.eval_questions, sample_questions=min(spec.sample_questions,
                                                                                      args.eval_questions))
    return spec


def _validation_probe(spec: BuildSpec, every: int) -> Callable[[str, Any, Any, int], None]:
    """Greedy accuracy on 100 validation questions of the demo task every `every` steps (to stderr)."""
    task = SyntheticTask({**spec.task_options, **spec.eval_task_options})
    qs = task.load_questions("validation", limit=100)

    def probe(role: str, model, tok, step: int) -> None:
        if step % every:
            return
        outs = generate(model, tok, task, qs, max_new_tokens=spec.max_new_tokens, batch_size=spec.eval_batch)
        acc = sum(task.grade(q, o[0]).verdict == "correct" for q, o in zip(qs, outs)) / len(qs)
        print(f"[{role}] step {step}: validation greedy accuracy {acc:.2f} | {outs[0][0]}", file=sys.stderr,
              flush=True)

    return probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orpo_distill.demo.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for teacher/, student/ and BUILD.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bit-for-bit needs the same number)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="override (tests: a few steps)")
    ap.add_argument("--student-steps", type=int, default=None, help="override (tests: a few steps)")
    ap.add_argument("--eval-questions", type=int, default=None, help="validation questions measured")
    ap.add_argument("--no-measure", action="store_true", help="skip the validation measurements")
    ap.add_argument("--roles", default="teacher,student",
                    help="models to train (comma-separated); the others are kept from --out when its BUILD.json "
                         "records them built with the same spec")
    ap.add_argument("--probe-every", type=int, default=0,
                    help="while choosing sizes: greedy validation accuracy on 100 questions every N steps")
    args = ap.parse_args(argv)
    cmd = "python -m orpo_distill.demo.build " + " ".join(argv if argv is not None else sys.argv[1:])
    spec = _spec_from_args(args)
    probe = _validation_probe(spec, args.probe_every) if args.probe_every else None
    report = build(args.out, spec, measure_models=not args.no_measure, command=cmd,
                   roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()), callback=probe)
    print(json.dumps({r: {k: v for k, v in m.items() if k != "files"} for r, m in report["models"].items()},
                     indent=1))
    print(f"build {report['build_seconds']} s, {report['total_bytes']} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
