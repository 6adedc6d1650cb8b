"""ORPO-Distill's variants, their identity, and the training stage's entry points.

The one job of this module is to say what each variant of the paper's table trains on and to hand it to the
training recipe (recipe.py: `DistillRecipe`, the loop read top to bottom): `train_variant(cfg, variant, seed,
out_dir, ...)` for one variant and seed, `run_train` for a run's variants x seeds. Every baseline is a
configuration of the same recipe (`SPECS`):

| variant | objective | chosen | rejected |
| --- | --- | --- | --- |
| zero_shot | none (evaluation only) | - | - |
| sft_single | NLL | one kept correct teacher trace per question | - |
| sft_diverse | NLL | all kept correct teacher traces | - |
| orpo_teacher_neg | ORPO | all kept correct teacher traces | the teacher's own wrong traces |
| orpo_off / orpo_on / orpo_mixed | ORPO | all kept correct teacher traces | the student's wrong traces, phi = 0 / 1 / config |
| orpo_mixed_prefix / _firsterr | ORPO, rejected scored after the shared prefix / first error | as orpo_mixed | as orpo_mixed |
| orpo_adaptive | ORPO | as orpo_mixed | the student's wrong traces, phi from `policy.AdaptivePhi` |

Traces are read through run_traces.py: only those of this run's teacher, initial student or this variant/seed's
refreshed student, by full identity (model id and revision, sampling settings, first k sample indices), so a
shared store never mixes in another run's traces (`teacher_chosen`, `make_loader`). The live student is sampled
(`default_sampler`: in-process HF generation, or its saved weights through vLLM) and evaluated
(`default_evaluator`) under `sampling.hf.invariant_attention`, so on CPU what it writes does not depend on the
thread count.
The learning rate is the peak times `lr_factor` (linear warm-up, then cosine or linear decay, or constant).

A variant folder ends with `model/` (Hugging Face format, export.py) and `result.json`, written last: its
presence marks the variant done, and `train_variant` then returns it at once if it was trained and evaluated with
the same settings (`config_hash` over the keys classified in `HASH_CLASSES` plus the models' revisions, and
`eval_fingerprint`), and refuses otherwise. A checkpoint is resumed only under the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ALL_VARIANTS, Config
from .errors import UserError
from .export import model_card, save_hf_model
from .pairs import Text
from .policy import INITIAL, TEACHER
from .run_traces import initial_student_query, other_revisions, pooled_chosen, refresh_query, select, teacher_queries

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
    schedule: str | None = None  # a fixed policy.schedule (orpo_adaptive), or None: the config's
    rejected_scope: str | None = None  # a fixed objective.rejected_scope, or None: the config's


SPECS: dict[str, VariantSpec] = {
    "zero_shot": VariantSpec("zero_shot", "none"),
    "sft_single": VariantSpec("sft_single", "sft", chosen="one"),
    "sft_diverse": VariantSpec("sft_diverse", "sft"),
    "orpo_teacher_neg": VariantSpec("orpo_teacher_neg", "orpo", negatives="teacher"),
    "orpo_off": VariantSpec("orpo_off", "orpo", negatives="student", phi=0.0),
    "orpo_on": VariantSpec("orpo_on", "orpo", negatives="student", phi=1.0),
    "orpo_mixed": VariantSpec("orpo_mixed", "orpo", negatives="student"),
    # beyond the paper (docs/METHOD.md): a penalty only on what is wrong, and phi set by the student's progress
    "orpo_mixed_prefix": VariantSpec("orpo_mixed_prefix", "orpo", negatives="student", rejected_scope="after_prefix"),
    "orpo_mixed_firsterr": VariantSpec("orpo_mixed_firsterr", "orpo", negatives="student",
                                       rejected_scope="after_first_error"),
    "orpo_adaptive": VariantSpec("orpo_adaptive", "orpo", negatives="student", schedule="adaptive"),
}
assert set(SPECS) == set(ALL_VARIANTS)


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
    **dict.fromkeys(["run.out_dir", "run.store", "run.seed", "run.seeds", "run.threads", "run.variants",
                      "run.workers"], "neither"),
    **dict.fromkeys(["task.name", "task.kind", "task.fields", "task.grader", "task.skip_invalid", "task.synthetic",
                     *(f"task.train.{k}" for k in ("path", "split", "subset", "limit", "sample_seed"))], "weights"),
    **dict.fromkeys([f"task.{s}.{k}" for s in ("validation", "test")
                     for k in ("path", "split", "subset", "limit", "sample_seed")], "eval"),
    **dict.fromkeys([f"teacher.{k}" for k in ("model", "revision", "gguf_file", "template", "system_prompt",
                                              "endpoint")], "weights"),
    **dict.fromkeys([f"teacher.{k}" for k in ("backend", "dtype", "device", "trust_remote_code", "batch_size",
                                              "base_url", "api_key_env", "concurrency", "max_retries", "timeout_s",
                                              "requests_per_minute", "tokens_per_minute", "cost_per_1k_input",
                                              "cost_per_1k_output", "vllm_args", "replica_cooldown_s", "name")],
                    "neither"),
    # a list of teachers: each entry's own K and sampling settings decide which traces are trained on
    **dict.fromkeys([f"teacher.{k}" for k in ("k", "temperature", "top_p", "max_new_tokens")], "weights"),
    # the student: its identity, and how the live student is sampled between epochs (backend, engine arguments)
    **dict.fromkeys([f"student.{k}" for k in ("model", "revision", "gguf_file", "template", "system_prompt",
                                              "endpoint", "backend", "vllm_args", "trust_remote_code")], "weights"),
    **dict.fromkeys([f"student.{k}" for k in ("dtype", "device", "batch_size", "base_url", "api_key_env",
                                              "concurrency", "max_retries", "timeout_s", "requests_per_minute",
                                              "tokens_per_minute", "cost_per_1k_input", "cost_per_1k_output",
                                              "replica_cooldown_s", "vllm_memory_fraction")],
                    "neither"),
    **dict.fromkeys([f"sampling.{k}" for k in ("k", "student_k", "temperature", "top_p", "max_new_tokens", "stop",
                                               "seed", "rouge_threshold")], "weights"),
    "sampling.allow_failed_prompts": "neither",  # whether a stage with failed prompts errors; not what is drawn
    **dict.fromkeys([f"pairs.{k}" for k in ("strategy", "max_pairs_per_question", "max_length",
                                            "max_prompt_length")], "weights"),
    **dict.fromkeys([f"policy.{k}" for k in ("phi", "schedule", "phi_start", "phi_end", "teacher_negatives_fallback",
                                             "gold_rationale_fallback", "unparsed_negatives", "adaptive_probe")],
                    "weights"),
    **dict.fromkeys(["objective.lam", "objective.nll_scope", "objective.nll_reduction", "objective.rejected_scope"],
                    "weights"),
    "objective.chunk_size": "neither",  # a memory knob: the chunked log-probs equal the unchunked ones
    **dict.fromkeys([f"trainer.{k}" for k in ("epochs", "lr", "batch_size", "grad_accum", "warmup_ratio",
                                              "lr_scheduler", "weight_decay", "max_grad_norm", "precision",
                                              "group_by_length")], "weights"),
    **dict.fromkeys([f"trainer.lora.{k}" for k in ("enabled", "r", "alpha", "dropout", "target_modules",
                                                   "merge_on_save")], "weights"),
    "trainer.packing": "neither",  # padding-free batches: the padded path's losses and gradients, float rounding aside
    # non-reentrant checkpointing recomputes with the saved RNG state: the same gradients, less memory
    **dict.fromkeys(["trainer.gradient_checkpointing", "trainer.save_every_steps", "trainer.log_every_steps",
                     "trainer.report_to"], "neither"),
    **dict.fromkeys(["eval.split", "eval.max_new_tokens", "eval.majority_k", "eval.every_epoch"], "eval"),
    "eval.batch_size": "neither",
}


def config_leaves(model: Any = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the config schema, dotted (sections are walked, dict-valued keys are leaves)."""
    from pydantic import BaseModel

    from .config import section_model

    out: list[str] = []
    for name, field in model.model_fields.items():
        sub = section_model(field.annotation)  # the teacher (a section or a list of them): its entries' keys
        if sub is not None and issubclass(sub, BaseModel):
            out += config_leaves(sub, f"{prefix}{name}.")
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
                if isinstance(node, list):  # a list of teachers: the key's value in each entry
                    node = [entry.get(part) for entry in node]
                elif part in node:
                    node = node[part]
                else:  # a list-entry key (teacher.k, ...) of a single teacher mapping: absent, so the hash of a
                    break  # single-teacher config is what it was before teacher lists existed
            else:
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
    from .run_traces import model_revision, teacher_identity

    return _short_hash({"config": config_hash(cfg), "teacher": teacher_identity(cfg),
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
    from .run_traces import model_revision, teacher_identity

    teacher, student = teacher_identity(cfg), list(model_revision(cfg.student))
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
    the first k sample indices); several teachers: their traces pooled with the ROUGE-L filter across the pool,
    in pool order (run_traces.pooled_chosen)."""
    return {q: [Text(t.key, t.completion, t.source) for t in ts]
            for q, ts in pooled_chosen(store, cfg, question_ids).items()}


def negative_verdicts(cfg: Config) -> tuple[str, ...]:
    return ("wrong", "unparsed") if cfg.policy.unparsed_negatives else ("wrong",)


def make_loader(cfg: Config, store: Any, variant: str, seed: int) -> Callable[[str, Sequence[str]], dict[str, list[Text]]]:
    """`load(source, question_ids)` for the policy: the stored wrong traces of this run's teacher, of its initial
    student, or of this variant/seed's student after epoch E (each by full identity, run_traces.py)."""
    verdicts = negative_verdicts(cfg)
    fixed = {TEACHER: teacher_queries(cfg), INITIAL: [initial_student_query(cfg)]}  # every teacher's wrong traces

    def load(source: str, question_ids: Sequence[str]) -> dict[str, list[Text]]:
        if not question_ids:
            return {}
        if source in fixed:
            qs = fixed[source]
        else:
            epochs = int(source.split(":", 1)[1])
            qs = [refresh_query(cfg, epochs, student_revision(cfg, variant, seed, epochs))]
        return _by_question([t for q in qs for t in select(store, q, question_ids, verdicts=verdicts)])

    return load


# --------------------------------------------------------------------------------------------------------------
# The schedule, seeds, thread-invariant attention
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Sampling and evaluation of the live student
# --------------------------------------------------------------------------------------------------------------

StudentSampler = Callable[[Any, Any, int, Sequence[Any]], Any]  # (model, tokenizer, epochs trained, questions)
Evaluator = Callable[[Any, Any, int], Any]  # (model, tokenizer, epoch) -> EvalResult


def student_generator(cfg: Config, model: Any, tokenizer: Any, revision: str, batch_size: int) -> Any:
    """The in-process HF generator of the live student (its traces recorded under `revision`)."""
    from .sampling.hf import HFGenerator
    from .sampling.stage import model_identity

    return HFGenerator(model, tokenizer, model_id=model_identity(cfg.student)[0], revision=revision,
                       template=cfg.student.template, system_prompt=cfg.student.system_prompt, batch_size=batch_size)


def default_sampler(cfg: Config, variant: str, seed: int, task: Any, store: Any, out_dir: Path,
                    progress: bool, wrap: Callable[[Any], Any] | None = None) -> StudentSampler:
    """Sample the current student into the store: in-process (backend hf) or from saved weights (vllm).
    `wrap` wraps the in-process generator (the trainer splits its calls over data-parallel ranks)."""
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
            gen = student_generator(cfg, model, tokenizer, rev, cfg.student.batch_size)
            if wrap is not None:
                gen = wrap(gen)
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
                      progress: bool, wrap: Callable[[Any], Any] | None = None) -> Evaluator:
    """Evaluate the current student in-process (greedy or majority vote, the config's settings); `wrap` as in
    `default_sampler`."""
    from .evaluate import evaluate_with_config

    def run(model, tokenizer, epoch: int) -> Any:
        gen = student_generator(cfg, model, tokenizer, student_revision(cfg, variant, seed, epoch),
                                cfg.eval.batch_size)
        return evaluate_with_config(wrap(gen) if wrap is not None else gen, task, questions, cfg,
                                    progress=progress)

    return run


# --------------------------------------------------------------------------------------------------------------
# One variant x seed (the loop itself: recipe.py)
# --------------------------------------------------------------------------------------------------------------

def train_variant(cfg: Config, variant: str, seed: int, out_dir: str | os.PathLike[str], *, task: Any,
                  train_questions: Sequence[Any], eval_questions: Sequence[Any] | None, store: Any,
                  progress: bool = True, sampler: StudentSampler | None = None,
                  evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train (or, for zero_shot, only evaluate) one variant with one seed; return and write `result.json`.

    Skips everything and returns the stored result when `out_dir/result.json` exists and was trained and
    evaluated with the same settings (`UserError` naming the changed keys otherwise); resumes from the newest
    checkpoint in `out_dir/checkpoints` (same settings only) otherwise. `sampler`/`evaluator` replace the default
    student sampling and evaluation (tests). Raises `TrainingDiverged` on a non-finite loss or gradient norm.
    Under a launcher (torchrun, `accelerate launch`) every rank calls it and gets the same result; rank 0 writes.
    Returns a dict: variant, seed, per_epoch (loss, log-odds, pool make-up, pair counts, eval), final_eval, costs
    (seconds, tokens, student samples), model_dir, config_hash, identity_hash, eval_fingerprint, settings.
    """
    from .recipe import DistillRecipe

    return DistillRecipe(cfg, variant, seed, out_dir, task=task, train_questions=train_questions,
                         eval_questions=eval_questions, store=store, progress=progress, sampler=sampler,
                         evaluator=evaluator).run()


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
    for tq in teacher_queries(cfg) if needs_teacher else []:  # every configured teacher has sampled
        if not select(store, tq, qids):
            raise MissingTraces(f"no traces of the teacher {tq.model_id} for this run's train questions in "
                                f"{where}{others(tq)}; run `orpo-distill traces teacher CONFIG` first (with the same "
                                "overrides)")
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
    # under a launcher only rank 0 writes the store (sharded sampling, sharded.py); the others read it
    from .distributed import dist_info

    # student.backend vllm, one process: one live engine per variant x seed for its refreshes and evaluations
    # (weights pushed in place, LoRA adapters per epoch; sampling/vllm_live.py), built at its first use so finished
    # variants cost nothing. Under a launcher the ranks share generation through sharded.py instead.
    live = cfg.student.backend == "vllm" and dist_info().world == 1
    with TraceStore(path, readonly=not dist_info().is_main) as store:
        check_traces(cfg, store, variants, [str(q.id) for q in train_q])
        for v in variants:
            for s in seeds:
                hooks, kw = None, {}
                if live:
                    from .sampling.vllm_live import StudentEngineHooks

                    hooks = StudentEngineHooks(cfg, v, s, task=task, store=store, eval_questions=eval_q,
                                               progress=progress)
                    kw = {"sampler": hooks.sample, "evaluator": hooks.evaluate}
                try:
                    results.append(train_variant(cfg, v, s, variant_dir(cfg, v, s), task=task,
                                                 train_questions=train_q, eval_questions=eval_q, store=store,
                                                 progress=progress, **kw))
                finally:
                    if hooks is not None:
                        hooks.close()
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
