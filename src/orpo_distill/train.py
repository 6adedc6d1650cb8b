"""The training loop of ORPO-Distill and of its baselines, readable top to bottom.

The one job of this module is to turn a run's stored traces into a trained student for one variant and seed:
`train_variant(cfg, variant, seed, out_dir, ...)`. Every baseline of the paper's table is a configuration of the
same loop (`VARIANTS`):

| variant | objective | chosen | rejected |
| --- | --- | --- | --- |
| zero_shot | none (evaluation only) | - | - |
| sft_single | NLL | one kept correct teacher trace per question | - |
| sft_diverse | NLL | all kept correct teacher traces | - |
| orpo_teacher_neg | ORPO | all kept correct teacher traces | the teacher's own wrong traces |
| orpo_off / orpo_on / orpo_mixed | ORPO | all kept correct teacher traces | the student's wrong traces, phi = 0 / 1 / config |

Traces are read through run_traces.py: only those of this run's teacher, initial student or this variant/seed's
refreshed student, by full identity (model id and revision, sampling settings, first k sample indices), so a
shared store never mixes in another run's traces. One epoch: (1) the negative policy builds this epoch's pool
(policy.py; it samples the live student between epochs through the in-process HF generator, or saves the weights
and samples them with vLLM), (2) pairs.py pairs and tokenises with the student's tokenizer, groups by length and
cuts the epoch into optimiser steps, (3) each step runs its `grad_accum` micro-batches through `loss.ORPOLoss` (or
`SFTLoss` for the SFT variants and for questions that have no negatives this epoch), each backward being that
micro-batch's share of the whole step's loss (`loss.step_totals`, so accumulation equals one big batch), stops
with `errors.TrainingDiverged` on a non-finite loss or gradient norm before anything is applied or written, clips
the gradient, sets the learning rate (linear warm-up, then cosine or linear decay) and steps AdamW, (4) the epoch
ends with an evaluation and a checkpoint.

Mechanics: `accelerate` places the model and runs bf16/fp16 autocast on GPU (fp32 master weights); one process
(multi-GPU data parallelism is not supported here). Checkpoints (checkpoint.py) every `trainer.save_every_steps`
optimiser steps and at each epoch end hold weights, optimiser, schedule, RNG states, the epoch's pool and batch
plan and the position in it, so `kill -9` and the same command continue to the same weights as an uninterrupted
run. Sampling and evaluation run inside `rng_fork`, so they never move the training RNG streams, and with
`invariant_attention`, so on CPU what the live student writes does not depend on the thread count. The number of
pairs can change between epochs (fresh negatives), so the schedule's total length is re-estimated at each epoch
start from the steps done plus this epoch's steps times the epochs left. Logs: `metrics.jsonl` (one row per
logged step and per epoch), TensorBoard, W&B when installed and asked for, and a tqdm bar with loss, log-odds and
tokens/s; every JSON written is strict (a non-finite metric is null). The variant folder ends with `model/`
(Hugging Face format, safetensors, tokenizer, model card) and `result.json`, written last: its presence marks the
variant done, and `train_variant` then returns it at once if it was trained and evaluated with the same settings
(`config_hash` over the keys classified in `HASH_CLASSES` plus the models' revisions, and `eval_fingerprint`), and
refuses otherwise. A checkpoint is resumed only under the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, rng_fork, save_checkpoint, strict_json
from .config import VARIANTS, Config, dump_config
from .errors import TrainingDiverged, UserError
from .files import atomic_write_text
from .loss import ORPOLoss, SFTLoss, step_totals
from .pairs import Encoded, Encoder, Example, Text, build_examples, collate, group_steps, mean_logps, plan_batches
from .policy import INITIAL, TEACHER, NegativePolicy, QuestionPool, phi_for_epoch, restore_pools
from .run_traces import initial_student_query, other_revisions, refresh_query, select, teacher_query

log = logging.getLogger(__name__)

# Test hook: the process kills itself with SIGKILL right after this optimiser step (and its checkpoint, if any),
# so the resume tests exercise a real `kill -9`.
KILL_ENV = "ORPO_DISTILL_TEST_KILL_AT_STEP"


@dataclass(frozen=True)
class VariantSpec:
    """What a variant changes in the loop."""

    name: str
    objective: str  # "none" | "sft" | "orpo"
    chosen: str = "all"  # "one" | "all" kept correct teacher traces per question
    negatives: str | None = None  # None | "student" | "teacher"
    phi: float | None = None  # fixed phi, or None: the config's phi and schedule


SPECS: dict[str, VariantSpec] = {
    "zero_shot": VariantSpec("zero_shot", "none"),
    "sft_single": VariantSpec("sft_single", "sft", chosen="one"),
    "sft_diverse": VariantSpec("sft_diverse", "sft"),
    "orpo_teacher_neg": VariantSpec("orpo_teacher_neg", "orpo", negatives="teacher"),
    "orpo_off": VariantSpec("orpo_off", "orpo", negatives="student", phi=0.0),
    "orpo_on": VariantSpec("orpo_on", "orpo", negatives="student", phi=1.0),
    "orpo_mixed": VariantSpec("orpo_mixed", "orpo", negatives="student"),
}
assert set(SPECS) == set(VARIANTS)


def variant_spec(variant: str) -> VariantSpec:
    if variant not in SPECS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(SPECS)}")
    return SPECS[variant]


def variant_dir(cfg: Config, variant: str, seed: int) -> Path:
    """Where one variant/seed writes: `<run.out_dir>/variants/<variant>/seed<seed>`."""
    return Path(cfg.run.out_dir) / "variants" / variant / f"seed{seed}"


# Every key of the config schema, classified (tests/test_config_hash.py fails on a key missing here, so each new
# key must be decided): "weights" keys shape the trained weights or which traces are trained on (they are hashed
# into `config_hash`, which guards resume, keys the student-refresh traces and is compared when a finished variant
# is found); "eval" keys shape only the evaluation (`eval_fingerprint`); "neither" keys change where outputs go,
# what is logged, speed or memory, never a number of the result (sampling and evaluation draw per-sample streams,
# so batch sizes do not change what is drawn). A teacher's trace-store identity is its model id and revision
# (prompt format included), so its serving settings are "neither": the store already says which traces exist.
HASH_CLASSES: dict[str, str] = {
    **dict.fromkeys(["run.out_dir", "run.store", "run.seed", "run.seeds", "run.threads", "run.variants"], "neither"),
    **dict.fromkeys(["task.name", "task.kind", "task.fields", "task.grader", "task.skip_invalid", "task.synthetic",
                     *(f"task.train.{k}" for k in ("path", "split", "subset", "limit", "sample_seed"))], "weights"),
    **dict.fromkeys([f"task.{s}.{k}" for s in ("validation", "test")
                     for k in ("path", "split", "subset", "limit", "sample_seed")], "eval"),
    **dict.fromkeys([f"teacher.{k}" for k in ("model", "revision", "gguf_file", "template", "system_prompt",
                                              "endpoint")], "weights"),
    **dict.fromkeys([f"teacher.{k}" for k in ("backend", "dtype", "device", "trust_remote_code", "batch_size",
                                              "base_url", "api_key_env", "concurrency", "max_retries", "timeout_s",
                                              "requests_per_minute", "tokens_per_minute", "cost_per_1k_input",
                                              "cost_per_1k_output", "vllm_args")], "neither"),
    # the student: its identity, and how the live student is sampled between epochs (backend, engine arguments)
    **dict.fromkeys([f"student.{k}" for k in ("model", "revision", "gguf_file", "template", "system_prompt",
                                              "endpoint", "backend", "vllm_args", "trust_remote_code")], "weights"),
    **dict.fromkeys([f"student.{k}" for k in ("dtype", "device", "batch_size", "base_url", "api_key_env",
                                              "concurrency", "max_retries", "timeout_s", "requests_per_minute",
                                              "tokens_per_minute", "cost_per_1k_input", "cost_per_1k_output")],
                    "neither"),
    **dict.fromkeys([f"sampling.{k}" for k in ("k", "student_k", "temperature", "top_p", "max_new_tokens", "stop",
                                               "seed", "rouge_threshold")], "weights"),
    "sampling.allow_failed_prompts": "neither",  # whether a stage with failed prompts errors; not what is drawn
    **dict.fromkeys([f"pairs.{k}" for k in ("strategy", "max_pairs_per_question", "max_length",
                                            "max_prompt_length")], "weights"),
    **dict.fromkeys([f"policy.{k}" for k in ("phi", "schedule", "phi_start", "phi_end", "teacher_negatives_fallback",
                                             "gold_rationale_fallback", "unparsed_negatives")], "weights"),
    **dict.fromkeys(["objective.lam", "objective.nll_scope", "objective.nll_reduction"], "weights"),
    "objective.chunk_size": "neither",  # a memory knob: the chunked log-probs equal the unchunked ones
    **dict.fromkeys([f"trainer.{k}" for k in ("epochs", "lr", "batch_size", "grad_accum", "warmup_ratio",
                                              "lr_scheduler", "weight_decay", "max_grad_norm", "precision",
                                              "group_by_length")], "weights"),
    **dict.fromkeys([f"trainer.lora.{k}" for k in ("enabled", "r", "alpha", "dropout", "target_modules",
                                                   "merge_on_save")], "weights"),
    # non-reentrant checkpointing recomputes with the saved RNG state: the same gradients, less memory
    **dict.fromkeys(["trainer.gradient_checkpointing", "trainer.save_every_steps", "trainer.log_every_steps",
                     "trainer.report_to"], "neither"),
    **dict.fromkeys(["eval.split", "eval.max_new_tokens", "eval.majority_k", "eval.every_epoch"], "eval"),
    "eval.batch_size": "neither",
}


def config_leaves(model: Any = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the config schema, dotted (sections are walked, dict-valued keys are leaves)."""
    from pydantic import BaseModel

    out: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_leaves(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _keys_of_class(cfg: Config, cls: str) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    picked: dict[str, Any] = {}
    for key in config_leaves():
        # an unclassified key (a test catches it) is hashed: refusing a resume is safer than a silent mix-up
        if HASH_CLASSES.get(key, "weights") == cls:
            node: Any = data
            for part in key.split("."):
                node = node[part]
            picked[key] = node
    return picked


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def config_hash(cfg: Config) -> str:
    """A short hash of the config keys that shape the trained weights or the traces trained on (`HASH_CLASSES`)."""
    return _short_hash(_keys_of_class(cfg, "weights"))


def identity_hash(cfg: Config) -> str:
    """`config_hash` plus the resolved identities (model id, revision) of the teacher and the initial student, so
    a model folder updated in place makes another run even with the same config."""
    from .run_traces import model_revision

    return _short_hash({"config": config_hash(cfg), "teacher": list(model_revision(cfg.teacher)),
                        "student": list(model_revision(cfg.student))})


# "weights" keys that the evaluation reads too (its defaults for max new tokens / majority vote, the prompt format)
_EVAL_ALSO = ("sampling.temperature", "sampling.top_p", "sampling.max_new_tokens", "sampling.stop", "sampling.seed",
              "student.template", "student.system_prompt", "task.name", "task.kind", "task.fields", "task.grader",
              "task.skip_invalid", "task.synthetic")


def _eval_settings(cfg: Config) -> dict[str, Any]:
    weights = _keys_of_class(cfg, "weights")
    return {**_keys_of_class(cfg, "eval"), **{k: weights[k] for k in _EVAL_ALSO}}


def eval_fingerprint(cfg: Config) -> str:
    """A short hash of what a variant's evaluation depends on besides its weights: the "eval" keys of
    `HASH_CLASSES` (split and its data, max new tokens, majority vote, every epoch) and the sampling, prompt and
    grading settings it reads."""
    return _short_hash(_eval_settings(cfg))


def run_fingerprints(cfg: Config) -> dict[str, Any]:
    """What result.json and checkpoints record to tell whether they belong to this config: the hashes and the
    settings behind them (so a refusal can name the keys that changed)."""
    from .run_traces import model_revision

    teacher, student = list(model_revision(cfg.teacher)), list(model_revision(cfg.student))
    return {"config_hash": config_hash(cfg), "identity_hash": identity_hash(cfg),
            "eval_fingerprint": eval_fingerprint(cfg),
            "settings": {"weights": {**_keys_of_class(cfg, "weights"), "teacher identity": teacher,
                                     "student identity": student},
                         "eval": _eval_settings(cfg)}}


def _changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """The keys whose values differ, as `key old -> new` (at most five)."""
    if not old:
        return "written by an older orpo-distill, which did not record its settings"
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "") if diff else "-"


def check_finished(prev: dict[str, Any], fp: dict[str, Any], variant: str, out: Path) -> None:
    """A finished variant folder (its result.json `prev`) is reused only for the settings it was trained and
    evaluated with (`fp` = `run_fingerprints(cfg)`); `UserError` naming the changed keys otherwise."""
    old = prev.get("settings") or {}
    if variant == "zero_shot":  # the untouched student: only its identity matters besides evaluation
        same = (old.get("weights") or {}).get("student identity") == fp["settings"]["weights"]["student identity"]
    else:
        same = prev.get("identity_hash") == fp["identity_hash"]
    if not same:
        raise UserError(f"{out} holds a finished {variant} trained with other settings (hash "
                        f"{prev.get('identity_hash') or prev.get('config_hash')}, now {fp['identity_hash']}: "
                        f"{_changed(old.get('weights'), fp['settings']['weights'])}); its result would be reported "
                        "for this config. Use another run.out_dir (--out), or remove that folder to train it again")
    if prev.get("eval_fingerprint") != fp["eval_fingerprint"]:
        raise UserError(f"{out} holds a finished {variant} evaluated with other evaluation settings "
                        f"({_changed(old.get('eval'), fp['settings']['eval'])}); its accuracy would be reported "
                        "for this config. Use another run.out_dir (--out) for this evaluation, or remove that "
                        "folder to train and evaluate it again")


def student_revision(cfg: Config, variant: str, seed: int, epochs_trained: int) -> str:
    """The revision recorded with the traces of the student after `epochs_trained` epochs of one variant/seed:
    deterministic, so a resumed run finds the traces it already sampled."""
    return f"{variant}/seed{seed}/epoch{epochs_trained}/{identity_hash(cfg)}"


# --------------------------------------------------------------------------------------------------------------
# Reading traces from the store (every query by full identity: run_traces.py)
# --------------------------------------------------------------------------------------------------------------

def _by_question(traces: Sequence[Any]) -> dict[str, list[Text]]:
    out: dict[str, list[Text]] = {}
    for t in sorted(traces, key=lambda t: (t.question_id, t.source, t.sample_index, t.key)):
        out.setdefault(t.question_id, []).append(Text(t.key, t.completion, t.source))
    return out


def teacher_chosen(cfg: Config, store: Any, question_ids: Sequence[str]) -> dict[str, list[Text]]:
    """The kept correct traces of each question by this run's teacher (model id and revision, sampling settings,
    the first k sample indices)."""
    return _by_question(select(store, teacher_query(cfg), question_ids, verdicts=("correct",), kept=True))


def negative_verdicts(cfg: Config) -> tuple[str, ...]:
    return ("wrong", "unparsed") if cfg.policy.unparsed_negatives else ("wrong",)


def make_loader(cfg: Config, store: Any, variant: str, seed: int) -> Callable[[str, Sequence[str]], dict[str, list[Text]]]:
    """`load(source, question_ids)` for the policy: the stored wrong traces of this run's teacher, of its initial
    student, or of this variant/seed's student after epoch E (each by full identity, run_traces.py)."""
    verdicts = negative_verdicts(cfg)
    fixed = {TEACHER: teacher_query(cfg), INITIAL: initial_student_query(cfg)}

    def load(source: str, question_ids: Sequence[str]) -> dict[str, list[Text]]:
        if not question_ids:
            return {}
        if source in fixed:
            q = fixed[source]
        else:
            epochs = int(source.split(":", 1)[1])
            q = refresh_query(cfg, epochs, student_revision(cfg, variant, seed, epochs))
        return _by_question(select(store, q, question_ids, verdicts=verdicts))

    return load


# --------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# --------------------------------------------------------------------------------------------------------------

def _mixed_precision(cfg: Config, device_type: str) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def make_accelerator(cfg: Config):
    """An `accelerate.Accelerator` for the student's device and the trainer's precision (one process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    dev = cfg.student.device
    cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
    mp = _mixed_precision(cfg, "cpu" if cpu else "cuda")
    try:
        acc = Accelerator(cpu=cpu, mixed_precision=mp)
    except ValueError:  # an earlier variant in this process used another precision: accelerate keeps one state
        AcceleratorState._reset_state(True)
        acc = Accelerator(cpu=cpu, mixed_precision=mp)
    if acc.num_processes > 1:
        raise NotImplementedError("orpo-distill trains on one process (one GPU); run it without `accelerate "
                                  "launch --multi_gpu`, and use several seeds/variants in parallel instead")
    return acc


def build_model(cfg: Config, device: torch.device):
    """The student in float32 master weights (autocast supplies bf16/fp16), with LoRA and gradient checkpointing
    as configured."""
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.student)
    model = load_model(cfg.student, device=device, dtype=torch.float32)
    model.config.use_cache = False
    lcfg = cfg.trainer.lora
    if lcfg.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                                 target_modules=lcfg.target_modules, task_type="CAUSAL_LM"))
    if cfg.trainer.gradient_checkpointing:
        # non-reentrant: works with LoRA (frozen inputs) without forcing input gradients
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based): linear warm-up over `warmup`
    steps, then cosine or linear decay to 0 at `total`, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def invariant_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which attention gives the same bits whatever the number of CPU threads.

    PyTorch's CPU scaled-dot-product attention splits the key/value length across threads for a single query
    token (every KV-cache decoding step), so its sums, and the logits, change in the last bits with
    `torch.set_num_threads` (1 vs 2 threads: ~1e-7). Inverse-CDF sampling turns such a difference into another
    token now and then (in the demo, 1 of 2048 live-student samples after epoch 1), the on-policy pool changes
    and the run drifts. The math backend (matmul + softmax) sums in a fixed order. On GPUs the kernels do not
    depend on CPU threads, so nothing changes there.
    """
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# --------------------------------------------------------------------------------------------------------------
# Sampling and evaluation of the live student
# --------------------------------------------------------------------------------------------------------------

StudentSampler = Callable[[Any, Any, int, Sequence[Any]], Any]  # (model, tokenizer, epochs trained, questions)
Evaluator = Callable[[Any, Any, int], Any]  # (model, tokenizer, epoch) -> EvalResult


def default_sampler(cfg: Config, variant: str, seed: int, task: Any, store: Any, out_dir: Path,
                    progress: bool) -> StudentSampler:
    """Sample the current student into the store: in-process (backend hf) or from saved weights (vllm)."""
    from .sampling.stage import make_generator, model_identity, params_from_config, sample_to_store

    params = params_from_config(cfg, "student")
    model_id = model_identity(cfg.student)[0]

    def sample(model, tokenizer, epochs_trained: int, questions: Sequence[Any]) -> Any:
        rev = student_revision(cfg, variant, seed, epochs_trained)
        if cfg.student.backend == "vllm":
            path = out_dir / "sampling_model"
            save_hf_model(model, tokenizer, path, merge_lora=True)
            gen = make_generator(cfg.student, checkpoint=str(path), revision=rev)
            gen.model_id = model_id
        elif cfg.student.backend == "hf":
            from .sampling.hf import HFGenerator

            gen = HFGenerator(model, tokenizer, model_id=model_id, revision=rev, template=cfg.student.template,
                              system_prompt=cfg.student.system_prompt, batch_size=cfg.student.batch_size)
        else:
            raise ValueError("student.backend must be hf or vllm to sample the student while it trains")
        try:
            return sample_to_store(gen, task, list(questions), params, store, role="student",
                                   source=f"epoch:{epochs_trained}", checkpoint=rev, progress=progress,
                                   desc=f"{variant} s{seed}: student after epoch {epochs_trained}")
        finally:
            del gen
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return sample


def default_evaluator(cfg: Config, variant: str, seed: int, task: Any, questions: Sequence[Any],
                      progress: bool) -> Evaluator:
    from .evaluate import evaluate_with_config
    from .sampling.hf import HFGenerator
    from .sampling.stage import model_identity

    model_id = model_identity(cfg.student)[0]

    def run(model, tokenizer, epoch: int) -> Any:
        gen = HFGenerator(model, tokenizer, model_id=model_id, revision=student_revision(cfg, variant, seed, epoch),
                          template=cfg.student.template, system_prompt=cfg.student.system_prompt,
                          batch_size=cfg.eval.batch_size)
        return evaluate_with_config(gen, task, questions, cfg, progress=progress)

    return run


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------

def save_hf_model(model, tokenizer, path: Path, *, merge_lora: bool = True, card: str | None = None,
                  inplace: bool = False) -> Path:
    """Save the student in Hugging Face format (safetensors) + tokenizer (+ model card), atomically.

    A LoRA model is merged into its base weights when `merge_lora` (into a copy, unless `inplace`: the final save,
    after which the model is not trained further), else its adapter is saved."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if hasattr(model, "peft_config") and merge_lora:
        import copy

        to_save = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    was_cache = getattr(to_save.config, "use_cache", None)
    if was_cache is not None:
        to_save.config.use_cache = True  # the saved model is for generation
    to_save.save_pretrained(tmp, safe_serialization=True)
    if was_cache is not None:
        to_save.config.use_cache = was_cache
    tokenizer.save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    return path


def model_card(cfg: Config, variant: str, seed: int, result: dict[str, Any]) -> str:
    """A README.md recording teacher, data, policy, phi, lambda and the evaluation results."""
    spec = variant_spec(variant)
    phi = spec.phi if spec.phi is not None else cfg.policy.phi
    lines = [
        "---", "library_name: transformers", "tags: [orpo-distill, distillation, orpo]", "---", "",
        f"# {cfg.student.model} distilled with ORPO-Distill ({variant}, seed {seed})", "",
        "Trained with [orpo-distill](https://arxiv.org/abs/2509.25100) (mixed-policy ORPO for cross-architecture "
        "black-box distillation).", "",
        "| setting | value |", "| --- | --- |",
        f"| student (base) | `{cfg.student.model}` {cfg.student.revision or ''} |",
        f"| teacher | `{cfg.teacher.model}` ({cfg.teacher.backend}) |",
        f"| task / data | {cfg.task.name}: train {cfg.task.train.path or 'default'} |",
        f"| variant | {variant} (objective {spec.objective}, rejected from {spec.negatives or '-'}) |",
        f"| policy | phi {phi}" + (f", schedule {cfg.policy.schedule} {cfg.policy.phi_start}->{cfg.policy.phi_end}"
                                   if spec.phi is None and cfg.policy.schedule != "constant" else "")
        + f", teacher fallback {cfg.policy.teacher_negatives_fallback} |",
        f"| lambda | {cfg.objective.lam} (NLL over {cfg.objective.nll_scope}) |",
        f"| teacher traces | k={cfg.sampling.k} at T={cfg.sampling.temperature}, ROUGE-L < {cfg.sampling.rouge_threshold} |",
        f"| training | {cfg.trainer.epochs} epochs, lr {cfg.trainer.lr}, batch {cfg.trainer.batch_size} x "
        f"accum {cfg.trainer.grad_accum}, {'LoRA r=' + str(cfg.trainer.lora.r) if cfg.trainer.lora.enabled else 'full fine-tuning'} |",
        f"| pairing | {cfg.pairs.strategy}, max length {cfg.pairs.max_length} |", "",
        "## Evaluation", "", "| epoch | accuracy | n |", "| --- | --- | --- |",
    ]
    for e in result.get("per_epoch", []):
        ev = e.get("eval")
        if ev:
            lines.append(f"| {e['epoch']} | {ev['accuracy']:.4f} | {ev['n']} |")
    fin = result.get("final_eval")
    if fin:
        lines.append(f"| final | {fin['accuracy']:.4f} | {fin['n']} |")
    lines += ["", f"Config hash `{config_hash(cfg)}`; the full config is in the run folder's `config.yaml`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------

class Logger:
    """metrics.jsonl (+ TensorBoard, + W&B when asked and installed). `lines` counts JSONL rows for resume."""

    def __init__(self, cfg: Config, out_dir: Path, name: str, resume_lines: int | None, global_step: int) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_lines is not None and self.path.exists():  # drop rows written after the checkpoint
            rows = self.path.read_text(encoding="utf-8").splitlines()[:resume_lines]
            atomic_write_text(self.path, "".join(r + "\n" for r in rows))
        elif resume_lines is None and self.path.exists():
            self.path.unlink()
        self.lines = resume_lines or 0
        self.tb = self.wandb = None
        report = cfg.trainer.report_to
        if "tensorboard" in report:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=global_step or None)
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        if "wandb" in report:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                log.warning("report_to has wandb but wandb is not installed; skipping it")
            else:
                import wandb

                self.wandb = wandb.init(project="orpo-distill", name=name, dir=str(out_dir), resume="allow",
                                        id=hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16],
                                        config=json.loads(json.dumps(cfg.model_dump(mode="json"))))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(strict_json(row, ensure_ascii=False) + "\n")
        self.lines += 1
        step = row.get("global_step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("global_step",)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{row.get('kind', 'train')}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------------------------

def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _diverged(cfg: Config, variant: str, seed: int, step: int, epoch: int, bad: tuple[str, Any],
              out: Path) -> TrainingDiverged:
    what, value = bad
    return TrainingDiverged(
        f"{variant} seed {seed} diverged at optimiser step {step} (epoch {epoch}): {what} is {value}. The step was "
        "not applied; no non-finite weights, checkpoint, model or result.json were written. Lower trainer.lr "
        f"(now {cfg.trainer.lr:g}) or set trainer.max_grad_norm (now {cfg.trainer.max_grad_norm}), then train "
        f"again into another run.out_dir or after removing {out} (its checkpoints belong to the old settings)")


def _check_finite_weights(model: torch.nn.Module, cfg: Config, variant: str, seed: int, step: int, epoch: int,
                          out: Path) -> None:
    """Refuse to write a checkpoint or model with a NaN/inf weight (a last guard behind the per-step check)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise _diverged(cfg, variant, seed, step, epoch, (f"weight {name}", "non-finite"), out)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------

def _eval_summary(res: Any) -> dict[str, Any]:
    return {"accuracy": res.accuracy, "n": res.n, "correct": res.correct, "wrong": getattr(res, "wrong", None),
            "unparsed": res.unparsed, "seconds": getattr(res, "seconds", None)}


def _epoch_line(variant: str, seed: int, epoch: int, epochs: int, record: dict[str, Any]) -> str:
    """One human line per epoch: loss, log-odds, the pool's make-up, accuracy."""
    parts = [f"{variant} s{seed} epoch {epoch}/{epochs}: loss {record.get('train_loss', float('nan')):.4f}"]
    if "train_log_odds" in record:
        parts.append(f"log-odds {record['train_log_odds']:.3f}")
    pool = record.get("pool")
    if pool:
        age = "-" if pool["mean_age"] is None else f"{pool['mean_age']:.2f}"
        parts.append(f"negatives {pool['negatives']} (phi {pool['phi']:.2f}: {pool['share_current']:.0%} from the "
                     f"current student, mean age {age} epochs; {pool['fallback_other_source']} other-source, "
                     f"{pool['fallback_teacher']} teacher fallbacks, {pool['no_negatives']} questions SFT-only)")
    pairs = record.get("pairs") or {}
    cut = pairs.get("prompt_truncated", 0) + pairs.get("chosen_truncated", 0) + pairs.get("rejected_truncated", 0)
    if cut:
        parts.append(f"{cut} truncations")
    if record.get("eval"):
        parts.append(f"accuracy {record['eval']['accuracy']:.4f} (n={record['eval']['n']})")
    return "; ".join(parts)


def _write_predictions(res: Any, path: Path) -> None:
    try:
        from .evaluate import write_predictions
    except ImportError:  # pragma: no cover
        return
    if getattr(res, "predictions", None) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(path, res)


def train_variant(cfg: Config, variant: str, seed: int, out_dir: str | os.PathLike[str], *, task: Any,
                  train_questions: Sequence[Any], eval_questions: Sequence[Any] | None, store: Any,
                  progress: bool = True, sampler: StudentSampler | None = None,
                  evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train (or, for zero_shot, only evaluate) one variant with one seed; return and write `result.json`.

    Skips everything and returns the stored result when `out_dir/result.json` exists and was trained and
    evaluated with the same settings (`UserError` naming the changed keys otherwise); resumes from the newest
    checkpoint in `out_dir/checkpoints` (same settings only) otherwise. `sampler`/`evaluator` replace the default
    student sampling and evaluation (tests). Raises `TrainingDiverged` on a non-finite loss or gradient norm.
    Returns a dict: variant, seed, per_epoch (loss, log-odds, pool make-up, pair counts, eval), final_eval, costs
    (seconds, tokens, student samples), model_dir, config_hash, identity_hash, eval_fingerprint, settings.
    """
    spec = variant_spec(variant)
    out = Path(out_dir)
    done = out / "result.json"
    fp = run_fingerprints(cfg)
    if done.exists():
        prev = json.loads(done.read_text(encoding="utf-8"))
        check_finished(prev, fp, variant, out)
        return prev
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    tc = cfg.trainer
    epochs = tc.epochs
    seed_everything(seed)

    # -- 1. accelerator, student, optimiser ---------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    model, tokenizer = build_model(cfg, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    pad_id = tokenizer.pad_token_id
    evaluator = evaluator or (default_evaluator(cfg, variant, seed, task, eval_questions, progress)
                              if eval_questions else None)
    costs = {"train_seconds": 0.0, "sample_seconds": 0.0, "eval_seconds": 0.0, "train_tokens": 0,
             "optimizer_steps": 0, "student_sampled_questions": 0, "student_sampled_traces": 0,
             "student_sampled_tokens": 0}

    if spec.objective == "none":  # zero-shot: the untouched student, evaluated
        result = {"variant": variant, "seed": seed, "per_epoch": [], "final_eval": None, "costs": costs,
                  "model_dir": None, **fp}
        if evaluator is not None:
            t0 = time.perf_counter()
            with rng_fork(), accelerator.autocast(), invariant_attention(accelerator.device):
                res = evaluator(raw_model, tokenizer, 0)
            costs["eval_seconds"] = time.perf_counter() - t0
            _write_predictions(res, out / "predictions" / "final.jsonl")
            result["final_eval"] = _eval_summary(res)
        atomic_write_text(done, strict_json(result, indent=2))
        return result

    # -- 2. data: chosen texts, the negative policy, the tokeniser ----------------------------------------------
    messages = {str(q.id): task.user_message(q) for q in train_questions}
    qids = list(messages)
    chosen = teacher_chosen(cfg, store, qids)
    gold_used: list[str] = []
    if cfg.policy.gold_rationale_fallback:
        for q in train_questions:
            if not chosen.get(str(q.id)) and q.rationale:
                chosen[str(q.id)] = [Text(f"gold:{q.id}", q.rationale, "gold")]
                gold_used.append(str(q.id))
    if spec.chosen == "one":
        chosen = {q: texts[:1] for q, texts in chosen.items()}
    with_chosen = [q for q in qids if chosen.get(q)]
    if not with_chosen:
        raise ValueError(f"{variant}: none of the {len(qids)} training questions has a kept correct teacher trace "
                         "in the store; run `orpo-distill traces teacher CONFIG` first (or enable "
                         "policy.gold_rationale_fallback)")
    questions_by_id = {str(q.id): q for q in train_questions}
    encoder = Encoder(tokenizer, template=cfg.student.template, system_prompt=cfg.student.system_prompt,
                      max_length=cfg.pairs.max_length, max_prompt_length=cfg.pairs.max_prompt_length)
    sample_fn = sampler or default_sampler(cfg, variant, seed, task, store, out, progress)
    sample_reports: list[dict[str, Any]] = []

    def sample_student(epochs_trained: int, ids: Sequence[str]) -> None:
        t0 = time.perf_counter()
        with rng_fork(), accelerator.autocast(), invariant_attention(accelerator.device):
            rep = sample_fn(raw_model, tokenizer, epochs_trained, [questions_by_id[q] for q in ids])
        costs["sample_seconds"] += time.perf_counter() - t0
        d = rep.as_dict() if hasattr(rep, "as_dict") else {}
        if d.get("sampled", 1):  # a resumed run finds them in the store: not sampled twice, not counted twice
            costs["student_sampled_questions"] += len(ids)
        costs["student_sampled_traces"] += int(d.get("sampled", 0))
        costs["student_sampled_tokens"] += int(d.get("completion_tokens", 0))
        sample_reports.append({"epochs_trained": epochs_trained, "questions": len(ids), **d})

    policy = None
    if spec.objective == "orpo":
        policy = NegativePolicy(with_chosen, load=make_loader(cfg, store, variant, seed), sample=sample_student,
                                mode=spec.negatives or "student",
                                phi_fn=lambda e: phi_for_epoch(cfg.policy, e, epochs, spec.phi), seed=seed,
                                teacher_fallback=cfg.policy.teacher_negatives_fallback)
    orpo_loss = ORPOLoss(cfg.objective.lam, cfg.objective.nll_scope, cfg.objective.nll_reduction,
                         cfg.objective.chunk_size)
    sft_loss = SFTLoss(cfg.objective.nll_scope, cfg.objective.nll_reduction, cfg.objective.chunk_size)

    def scorer(prompt_ids: list[int], completions: list[list[int]]) -> list[float]:
        was = raw_model.training
        raw_model.eval()
        try:
            with accelerator.autocast():
                return mean_logps(raw_model, prompt_ids, completions, pad_id, batch_size=tc.batch_size,
                                  chunk_size=cfg.objective.chunk_size)
        finally:
            raw_model.train(was)

    def build_epoch(epoch: int) -> dict[str, Any]:
        """This epoch's pool, examples and optimiser steps (saved in checkpoints as keys, not tensors)."""
        pools: dict[str, QuestionPool] = {}
        pool_stats = None
        if policy is not None:
            pools, stats = policy.pool(epoch)
            pool_stats = stats.as_dict()
        negatives = {q: p.negatives for q, p in pools.items()}
        # (SFT baselines have no negatives: every chosen text becomes one SFT example)
        with rng_fork():
            examples, enc_stats = build_examples([(q, messages[q]) for q in with_chosen], chosen, negatives, encoder,
                                                 strategy=cfg.pairs.strategy,
                                                 max_pairs=cfg.pairs.max_pairs_per_question, seed=seed, epoch=epoch,
                                                 scorer=scorer if cfg.pairs.strategy == "hardest" else None)
        batches = plan_batches(examples, tc.batch_size, group_by_length=tc.group_by_length,
                               rng=random.Random(f"plan:{seed}:{epoch}"))
        if pools:  # the record of where every negative of this epoch came from (kept after training)
            (out / "pools").mkdir(exist_ok=True)
            atomic_write_text(out / "pools" / f"epoch{epoch}.json",
                          strict_json({"epoch": epoch, "stats": pool_stats,
                                      "questions": [p.to_json() for p in pools.values()]}, indent=1))
        return {"epoch": epoch, "pools": {q: p.to_json() for q, p in pools.items()}, "pool_stats": pool_stats,
                "encode_stats": enc_stats.as_dict(),
                "examples": [[e.question_id, e.chosen_key, e.rejected_key, e.rejected_source] for e in examples],
                "steps": group_steps(batches, tc.grad_accum), "_encoded": examples}

    def restore_epoch(plan: dict[str, Any]) -> dict[str, Any]:
        """Re-tokenise a saved plan (tokenisation is deterministic) with texts from the store."""
        texts = {t.key: t.text for ts in chosen.values() for t in ts}
        # every negative of the saved pool, not only those paired: with pairs.max_pairs_per_question (or the
        # random/hardest strategies) a pool holds negatives that no example uses
        keys = {r[2] for r in plan["examples"] if r[2] is not None}
        keys |= {k for d in plan["pools"].values() for k, _ in d["negatives"]}
        keys -= set(texts)
        for t in store.get(sorted(keys)) if keys else []:
            texts[t.key] = t.completion
        examples: list[Encoded] = []
        for qid, ck, rk, rs in plan["examples"]:
            c = Text(ck, texts[ck], "gold" if ck.startswith("gold:") else "teacher")
            r = Text(rk, texts[rk], rs) if rk is not None else None
            examples.append(encoder.encode(Example(qid, c, r), messages[qid]))
        restore_pools(plan["pools"], texts)  # checks that every negative of the saved pool is still there
        return {**plan, "_encoded": examples}

    # -- 3. resume ------------------------------------------------------------------------------------------------
    state: dict[str, Any] = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "warmup_steps": None,
                             "total_steps": None, "history": [], "plan": None, "log_lines": None, "costs": costs,
                             "sample_reports": sample_reports, "epoch_sums": {}, "epoch_counts": {},
                             "identity_hash": fp["identity_hash"],
                             "settings": fp["settings"]["weights"]}
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if saved.get("identity_hash") != fp["identity_hash"]:
            raise UserError(f"{ckpt} was written with another config (hash {saved.get('identity_hash')}, now "
                            f"{fp['identity_hash']}: {_changed(saved.get('settings'), fp['settings']['weights'])}); "
                            f"resume with the same config and overrides, or remove {out} to start over")
        state = load_checkpoint(ckpt, model=raw_model, optimizer=optimizer, scaler=accelerator.scaler)
        costs.update(state["costs"])
        sample_reports[:] = state.get("sample_reports", [])
        log.info("resuming %s seed %d from %s (epoch %d, step %d)", variant, seed, ckpt, state["epoch"],
                 state["step_in_epoch"])
    logger = Logger(cfg, out, f"{variant}-seed{seed}", state["log_lines"] if ckpt else None, state["global_step"])
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)

    def checkpoint(epoch_end: bool, plan: dict[str, Any] | None) -> None:
        state["plan"] = {k: v for k, v in plan.items() if not k.startswith("_")} if plan else None
        state["log_lines"] = logger.lines
        state["costs"] = costs
        state["sample_reports"] = sample_reports
        _check_finite_weights(raw_model, cfg, variant, seed, state["global_step"], state["epoch"], out)
        save_checkpoint(out / "checkpoints", checkpoint_name(state["global_step"], epoch_end), model=raw_model,
                        optimizer=optimizer, state=state, scaler=accelerator.scaler)

    # -- 4. epochs --------------------------------------------------------------------------------------------------
    plan = restore_epoch(state["plan"]) if state["plan"] else None
    for epoch in range(state["epoch"], epochs + 1):
        if plan is None or plan["epoch"] != epoch:
            plan = build_epoch(epoch)
            state["step_in_epoch"] = 0
        steps: list[list[list[int]]] = plan["steps"]
        examples: list[Encoded] = plan["_encoded"]
        # the schedule's length: fixed warm-up from the first epoch's estimate, total re-estimated per epoch
        if state["warmup_steps"] is None:
            state["warmup_steps"] = math.ceil(tc.warmup_ratio * len(steps) * epochs)
        if state["step_in_epoch"] == 0:
            state["total_steps"] = state["global_step"] + len(steps) * (epochs - epoch + 1)
            state["epoch_sums"], state["epoch_counts"] = {}, {}
        state["epoch"] = epoch
        model.train()
        sums: dict[str, float] = state["epoch_sums"]  # this epoch's running metric sums (kept in checkpoints)
        counts: dict[str, int] = state["epoch_counts"]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(steps), initial=state["step_in_epoch"], dynamic_ncols=True,
                       desc=f"{variant} s{seed} epoch {epoch}/{epochs}")
        t_epoch = time.perf_counter()
        for step_idx in range(state["step_in_epoch"], len(steps)):
            t0 = time.perf_counter()
            micro = steps[step_idx]
            per_mb: list[dict[str, float]] = []
            mb_losses: list[float] = []
            tokens = 0
            # Every micro-batch of the step first, so each one's loss is its share of the whole step's loss
            # (loss.step_totals): the summed backward passes equal one pass over the step as a single batch,
            # whatever the micro-batch sizes (a short last micro-batch weighs what its examples weigh).
            batches = [collate([examples[i] for i in mb], pad_id) for mb in micro]
            totals = step_totals(batches, cfg.objective.nll_scope)
            for mb, cpu_batch in zip(micro, batches):
                batch = {k: v.to(accelerator.device) for k, v in cpu_batch.items()}
                loss_fn = orpo_loss if examples[mb[0]].is_pair else sft_loss  # no negatives: NLL only
                with accelerator.autocast():
                    loss, m = loss_fn(model, batch, totals)
                accelerator.backward(loss)
                mb_losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                per_mb.append({**{k: float(v) for k, v in m.items()}, "_weight": float(len(mb))})
            # the step's loss is the sum of the shares; every other metric is the mean over the micro-batches
            # that have it (log-odds: the pair batches only), weighted by their examples
            metrics = {k: sum(d[k] * d["_weight"] for d in per_mb if k in d)
                       / sum(d["_weight"] for d in per_mb if k in d)
                       for k in sorted({k for d in per_mb for k in d} - {"_weight"})}
            metrics["loss"] = sum(mb_losses)
            grad_norm = None
            if tc.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
            elif accelerator.scaler is None:  # measured (not clipped) so that a divergence is caught
                grad_norm = _grad_norm(params)
            # A non-finite loss or gradient stops the variant before the optimiser applies it (fp16: the grad
            # scaler skips inf/NaN gradients itself and lowers its scale, so only the loss is checked there).
            bad = next(((f"the loss of micro-batch {i + 1}", v) for i, v in enumerate(mb_losses)
                        if not math.isfinite(v)), None)
            if bad is None and grad_norm is not None and not math.isfinite(grad_norm):
                bad = ("the gradient norm", grad_norm)
            if bad is not None:
                logger.write({"kind": "diverged", "global_step": state["global_step"] + 1, "epoch": epoch,
                              "step_in_epoch": step_idx + 1, "grad_norm": grad_norm, **metrics})
                logger.close()
                raise _diverged(cfg, variant, seed, state["global_step"] + 1, epoch, bad, out)
            lr = tc.lr * lr_factor(state["global_step"], state["total_steps"], state["warmup_steps"], tc.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] = step_idx + 1
            dt = time.perf_counter() - t0
            costs["train_seconds"] += dt
            costs["train_tokens"] += tokens
            costs["optimizer_steps"] += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if state["global_step"] % tc.log_every_steps == 0:
                logger.write({"kind": "train", "global_step": state["global_step"], "epoch": epoch,
                              "step_in_epoch": state["step_in_epoch"], "lr": lr, "grad_norm": grad_norm,
                              "tokens": tokens, "tokens_per_s": tokens / dt if dt > 0 else None, **metrics})
            if bar is not None:
                post = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
                if "log_odds" in metrics:
                    post["log_odds"] = f"{metrics['log_odds']:.3f}"
                post["tok/s"] = f"{tokens / dt:.0f}" if dt > 0 else "-"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if tc.save_every_steps and state["global_step"] % tc.save_every_steps == 0 \
                    and state["step_in_epoch"] < len(steps):
                checkpoint(False, plan)
            if kill_at and state["global_step"] == kill_at:
                os.kill(os.getpid(), 9)
        if bar is not None:
            bar.close()

        # -- epoch end: evaluation, log, checkpoint -------------------------------------------------------------
        row: dict[str, Any] = {"kind": "epoch", "global_step": state["global_step"], "epoch": epoch,
                               "steps": len(steps), "seconds": time.perf_counter() - t_epoch,
                               **{f"train_{k}": sums[k] / counts[k] for k in sums}}
        record: dict[str, Any] = {"epoch": epoch, **{k: v for k, v in row.items() if k not in ("kind", "epoch")},
                                  "pool": plan["pool_stats"], "pairs": plan["encode_stats"]}
        if evaluator is not None and (cfg.eval.every_epoch or epoch == epochs):
            t0 = time.perf_counter()
            with rng_fork(), accelerator.autocast(), invariant_attention(accelerator.device):
                res = evaluator(raw_model, tokenizer, epoch)
            costs["eval_seconds"] += time.perf_counter() - t0
            _write_predictions(res, out / "predictions" / f"epoch{epoch}.jsonl")
            record["eval"] = _eval_summary(res)
            row["eval_accuracy"] = res.accuracy
        if plan["pool_stats"]:
            row.update({f"pool_{k}": v for k, v in plan["pool_stats"].items() if isinstance(v, (int, float))})
        logger.write(row)
        summary = _epoch_line(variant, seed, epoch, epochs, record)
        log.info(summary)
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(summary)
        state["history"].append(record)
        state["epoch"] = epoch + 1
        state["step_in_epoch"] = 0
        plan = None
        checkpoint(True, None)

    # -- 5. the final student, the result --------------------------------------------------------------------------
    history = state["history"]
    result: dict[str, Any] = {
        "variant": variant, "seed": seed, **fp,
        "phi": (spec.phi if spec.phi is not None else cfg.policy.phi) if spec.negatives == "student" else None,
        "phi_schedule": (cfg.policy.schedule if spec.phi is None else "constant")
        if spec.negatives == "student" else None,
        "lam": cfg.objective.lam if spec.objective == "orpo" else None,
        "train_questions": len(qids), "questions_with_chosen": len(with_chosen),
        "questions_without_chosen": len(qids) - len(with_chosen), "gold_rationale_questions": len(gold_used),
        "per_epoch": history, "final_eval": history[-1].get("eval") if history else None,
        "sampling": sample_reports, "costs": costs, "model_dir": str(out / "model"),
    }
    _check_finite_weights(raw_model, cfg, variant, seed, state["global_step"], epochs, out)
    save_hf_model(raw_model, tokenizer, out / "model", merge_lora=tc.lora.merge_on_save,
                  card=model_card(cfg, variant, seed, result), inplace=True)
    logger.close()
    atomic_write_text(done, strict_json(result, indent=2))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "sampling_model", ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------------------
# The stage: all requested variants and seeds of a run (what `orpo-distill train` calls)
# --------------------------------------------------------------------------------------------------------------

class MissingTraces(UserError):
    """The store lacks the traces training needs; the message names the command that samples them (exit 2)."""


def check_traces(cfg: Config, store: Any, variants: Sequence[str], question_ids: Sequence[str]) -> None:
    """Fail early, naming the command to run, when this run's teacher or initial student traces (by full identity,
    run_traces.py) are missing."""
    from .sampling.stage import store_path

    where = store_path(cfg)
    qids = list(question_ids)

    def others(q: Any) -> str:
        revs = other_revisions(store, q, qids)
        return (f" (the store has {q.model_id} traces of other revisions: {', '.join(revs[:3])}; this run's is "
                f"{q.revision}: the model folder, revision, prompt format or sampling settings changed)"
                if revs else "")

    needs_teacher = any(variant_spec(v).objective != "none" for v in variants)
    tq = teacher_query(cfg)
    if needs_teacher and not select(store, tq, qids):
        raise MissingTraces(f"no teacher traces for this run's train questions in {where}{others(tq)}; run "
                            "`orpo-distill traces teacher CONFIG` first (with the same overrides)")
    if needs_teacher and not cfg.policy.gold_rationale_fallback and not teacher_chosen(cfg, store, qids):
        raise MissingTraces(f"the teacher traces in {where} answer none of this run's train questions correctly "
                            "(with these sampling settings); check the teacher and `orpo-distill traces stats "
                            "CONFIG`, re-run `orpo-distill traces teacher CONFIG` with the same overrides, or set "
                            "policy.gold_rationale_fallback=true")
    if any(variant_spec(v).negatives == "student" for v in variants):
        sq = initial_student_query(cfg)
        if not select(store, sq, qids):
            raise MissingTraces(f"no initial student traces for this run's train questions in {where}{others(sq)}; "
                                "run `orpo-distill traces student CONFIG` first (with the same overrides)")


def run_train(cfg: Config, *, variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Train every requested variant and seed of a run (default: `run.variants` x `run.seed + i`, i < run.seeds),
    each into `variant_dir(cfg, variant, seed)`; variants already done are skipped."""
    from .sampling.stage import store_path
    from .store import TraceStore
    from .tasks import load_questions, load_task

    variants = list(variants or cfg.run.variants)
    for v in variants:
        variant_spec(v)
    seeds = list(seeds) if seeds is not None else [cfg.run.seed + i for i in range(cfg.run.seeds)]
    task = load_task(cfg.task)
    train_q = load_questions(cfg.task, "train")
    eval_q = load_questions(cfg.task, cfg.eval.split)
    path = store_path(cfg)
    if not path.is_file():
        raise MissingTraces(f"no trace store at {path}; run `orpo-distill traces teacher CONFIG` and "
                            "`orpo-distill traces student CONFIG` first")
    results = []
    with TraceStore(path) as store:
        check_traces(cfg, store, variants, [str(q.id) for q in train_q])
        for v in variants:
            for s in seeds:
                results.append(train_variant(cfg, v, s, variant_dir(cfg, v, s), task=task, train_questions=train_q,
                                             eval_questions=eval_q, store=store, progress=progress))
    return results


def summarize(result: dict[str, Any]) -> str:
    """One line per variant result for the command line."""
    fin = result.get("final_eval") or {}
    acc = f"{fin['accuracy']:.4f}" if fin else "-"
    losses = [e.get("train_loss") for e in result.get("per_epoch", []) if e.get("train_loss") is not None]
    loss = f"{losses[-1]:.4f}" if losses else "-"
    return (f"{result['variant']} seed {result['seed']}: accuracy {acc}, last-epoch loss {loss}, "
            f"{result['costs'].get('optimizer_steps', 0)} steps, model {result.get('model_dir')}")


__all__ = ["HASH_CLASSES", "SPECS", "VariantSpec", "MissingTraces", "check_finished", "check_traces", "config_hash",
           "config_leaves", "eval_fingerprint", "identity_hash", "lr_factor", "model_card", "run_fingerprints",
           "run_train", "save_hf_model", "student_revision", "summarize", "train_variant", "variant_dir",
           "variant_spec"]
