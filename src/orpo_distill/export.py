"""The trained student as a Hugging Face folder: weights (safetensors, LoRA merged or as an adapter), tokenizer and
a model card recording how it was distilled.

The one job of this module is writing a model that `models.load_model` (or any transformers user) loads back:
`save_hf_model` writes atomically (a hidden temporary folder, then one rename), `model_card` renders the
README.md from the run's config and a variant's result.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from .config import Config, is_multi_teacher, teachers_of


def save_hf_model(model: Any, tokenizer: Any, path: str | os.PathLike[str], *, merge_lora: bool = True,
                  card: str | None = None, inplace: bool = False) -> Path:
    """Save the student in Hugging Face format (safetensors) + tokenizer (+ model card), atomically.

    A LoRA model is merged into its base weights when `merge_lora` (into a copy, unless `inplace`: the final save,
    after which the model is not trained further), else its adapter is saved."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if hasattr(model, "peft_config") and merge_lora:
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
    from .sampling.stage import teacher_params
    from .train import config_hash, variant_spec  # the variants and their identity live with the trainer

    spec = variant_spec(variant)
    phi = spec.phi if spec.phi is not None else cfg.policy.phi
    lora = f"LoRA r={cfg.trainer.lora.r}" if cfg.trainer.lora.enabled else "full fine-tuning"
    # each teacher's K and temperature as its traces were sampled (a list's entries may set their own)
    teacher_sampling = "; ".join(
        (f"{t.label}: " if is_multi_teacher(cfg) else "") + f"k={p.n} at T={p.temperature}"
        for t, p in ((t, teacher_params(cfg, t)) for t in teachers_of(cfg)))
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
        f"| teacher traces | {teacher_sampling}, ROUGE-L < {cfg.sampling.rouge_threshold} |",
        f"| training | {cfg.trainer.epochs} epochs, lr {cfg.trainer.lr}, global batch {cfg.trainer.batch_size} "
        f"(accum {cfg.trainer.grad_accum}), {lora} |",
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


__all__ = ["model_card", "save_hf_model"]
