"""The training recipe of one variant x seed, read top to bottom: `DistillRecipe`.

The one job of this module is the training loop itself; what a variant is, its identity and the stage entry points
live in train.py, the store queries in run_traces.py, the HF export in export.py. Its shape follows torchtune's
distributed recipes, so each distributed concern has one place:

    setup()              accelerator (and process group), student (+ LoRA) inside loss.ORPOStudent, AdamW, the LR
                         schedule (a LambdaLR over `train.lr_factor`, so DeepSpeed could drive it), data, restore
    plan_epoch(e)        the policy's pools -> pairs -> the epoch's optimiser steps (the same on every rank)
    loss_step(batch)     the objective only: the prepared module's forward, no I/O
    train_epoch(e)       each step: this rank's micro-batches, accumulate (gradients synchronised once, on the
                         last), the global metrics, divergence stop, clip, step, log, periodic checkpoint
    refresh_student(e)   sample the live student into the store (split over the ranks, rank 0 writes)
    evaluate(e)          the per-epoch evaluation (split over the ranks, rank 0 writes predictions)
    save_checkpoint()    atomic, written by rank 0 with every rank's RNG states
    train()              the loop: for each epoch plan, train, evaluate, checkpoint; then the final model

Data parallel (torchrun / `accelerate launch`, gloo on CPU, NCCL on GPU): `trainer.batch_size` is the global
batch of one optimiser step. Every rank builds the same epoch plan; each step's examples are cut into `world`
contiguous shards and each shard into `grad_accum` micro-batches (`distributed.split_step`); a rank whose
micro-batch is empty (a short last step) runs a stand-in example with weight 0, so every rank makes the same
forward/backward calls. Each micro-batch's loss is its share of the GLOBAL step's loss (`loss.StepTotals` summed
over the ranks, `distributed.reduce_step_totals`), so the averaged gradient, the clipped norm and the update equal
one process's with the same global batch; logged metrics are reduced over the ranks. Only rank 0 writes files
(store, pools, logs, predictions, checkpoints, model, result.json); the others wait at barriers. In one process
every collective is skipped and the arithmetic is exactly the single-process trainer's.

FSDP2 (when the launcher asks for it, `fsdp2_requested`): the ORPOStudent is sharded with `fully_shard` instead
of wrapped in DDP; the step is the same. Checkpoints are sharded (torch.distributed.checkpoint, every rank writes
its own shards of the model and optimiser into one folder that rank 0 publishes with a rename); sampling,
evaluation, hardest-negative scoring and the export use a plain replica loaded with the gathered full weights
(`plain_student`), so they need one full copy of the student per rank while they run.

DeepSpeed ZeRO-2/3 (an accelerate DeepSpeed launch, `deepspeed_stage`): `make_accelerator` writes the trainer's
micro-batch, grad_accum and clipping (trainer.max_grad_norm, on the global norm) into the launch config's DeepSpeed
config; the engine wraps the ORPOStudent (ZeRO-3: `uniform_chunks`, so every rank makes the same head calls) and
our AdamW, and steps our schedule object. Each micro-batch: `set_gradient_accumulation_boundary(last)`,
`backward(loss, scale_wrt_gas=False)` (the shares already sum to the step's loss); after the divergence check
`engine.step()` clips, steps and zeroes. Checkpoints: the engine's own (`save_checkpoint`, a partition per rank),
published atomically like FSDP2's. Under ZeRO-3 sampling, evaluation and the export use a plain replica loaded
with the gathered weights (`deepspeed.zero.GatheredParameters`), as under FSDP2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    rng_fork,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strict_json,
)
from .config import Config, dump_config
from .distributed import reduce_step_totals, split_step
from .errors import TrainingDiverged, UserError
from .export import model_card, save_hf_model
from .files import atomic_write_text
from .loss import ORPOLoss, ORPOStudent, SFTLoss, StepTotals, step_totals
from .pairs import (
    Encoded,
    Encoder,
    Example,
    Text,
    build_examples,
    collate,
    error_locator,
    mean_logps,
    plan_batches,
    text_scorer,
)
from .policy import NegativePolicy, QuestionPool, make_adaptive, phi_for_epoch, restore_pools
from .sampling.hf import invariant_attention
from .train import (
    KILL_ENV,
    Evaluator,
    StudentSampler,
    _changed,
    check_finished,
    default_evaluator,
    default_sampler,
    lr_factor,
    make_loader,
    run_fingerprints,
    seed_everything,
    student_generator,
    student_revision,
    teacher_chosen,
    variant_spec,
)

log = logging.getLogger(__name__)

# Every metric a micro-batch may report (ORPO's and SFT's), in one fixed order, so that the ranks reduce the same
# vector whichever kinds of micro-batches each of them ran.
METRIC_KEYS = ("chosen_logp", "l_or", "log_odds", "loss", "margin", "nll", "pref_acc", "rejected_logp")


# --------------------------------------------------------------------------------------------------------------
# Mechanics: accelerator, student, schedule, logs, divergence
# --------------------------------------------------------------------------------------------------------------

def _mixed_precision(cfg: Config, device_type: str) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def make_accelerator(cfg: Config) -> Any:
    """An `accelerate.Accelerator` for the student's device and the trainer's precision. Under a launcher
    (torchrun, `accelerate launch`) it joins the job's process group: gloo on CPU, NCCL on GPU. Under a DeepSpeed
    launch (`deepspeed_stage()`) the launch config's DeepSpeed plugin gets the trainer's settings first
    (`distributed.apply_trainer_settings`: per-rank micro-batch, grad_accum, clipping = trainer.max_grad_norm)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    unsupported = unsupported_engine()
    if unsupported:
        raise UserError(unsupported)
    dev = cfg.student.device
    cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
    mp = _mixed_precision(cfg, "cpu" if cpu else "cuda")
    kwargs: dict[str, Any] = {"cpu": cpu, "mixed_precision": mp}
    if deepspeed_stage() is not None:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        from .distributed import apply_trainer_settings, dist_info

        world, tc = dist_info().world, cfg.trainer
        plugin = DeepSpeedPlugin()  # from the launch config (ACCELERATE_DEEPSPEED_* variables)
        apply_trainer_settings(plugin.deepspeed_config, micro_batch=max(1, math.ceil(
            tc.batch_size / (world * tc.grad_accum))), grad_accum=tc.grad_accum, max_grad_norm=tc.max_grad_norm,
            world=world)
        # DeepSpeed is disabled under Accelerator(cpu=True); on a CPU (DS_ACCELERATOR=cpu) its ranks talk gloo
        kwargs = {"mixed_precision": mp, "deepspeed_plugin": plugin}
        if cpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    try:
        return Accelerator(**kwargs)
    except (ValueError, NotImplementedError):
        # an earlier variant in this process made an Accelerator with another precision (ValueError) or a
        # DeepSpeed plugin (NotImplementedError): accelerate keeps one state per process; the process group stays
        AcceleratorState._reset_state(True)
        return Accelerator(**kwargs)


def unsupported_engine() -> str | None:
    """Why the launcher's engine cannot train this recipe (None when it can): FSDP version 1 (`accelerate launch
    --use_fsdp --fsdp_version 1`, or a config with `fsdp_version: 1`). DDP, FSDP2 and DeepSpeed ZeRO are driven."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and os.environ.get("FSDP_VERSION", "2") != "2":
        return (f"FSDP version {os.environ.get('FSDP_VERSION')} (FSDP_VERSION, from the accelerate config's "
                "fsdp_config.fsdp_version) is not supported by the trainer: use FSDP2 (fsdp_version: 2, as in "
                "examples/accelerate/fsdp2.yaml), DeepSpeed ZeRO (examples/accelerate/zero3.yaml) or DDP "
                "(torchrun, or examples/accelerate/ddp.yaml)")
    return None


def fsdp2_requested() -> bool:
    """Whether the launcher asked for sharded training: an accelerate FSDP config (`accelerate launch
    --use_fsdp`, or `ACCELERATE_USE_FSDP=true` under torchrun) with FSDP version 2. The recipe shards with
    `torch.distributed.fsdp.fully_shard` itself (`distributed.apply_fsdp2`), on CPU (gloo) as on GPU."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            and os.environ.get("FSDP_VERSION", "2") == "2")


def deepspeed_stage() -> int | None:
    """The ZeRO stage when the launcher asked for DeepSpeed (`accelerate launch` with a DeepSpeed config such as
    examples/accelerate/zero2.yaml / zero3.yaml, or `--use_deepspeed --zero_stage N`), else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)


def build_model(cfg: Config, device: torch.device) -> tuple[Any, Any]:
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


class DistillSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The learning-rate schedule as a scheduler object (`lr = peak x lr_factor(step)`, stepped after each
    optimiser step, so an engine such as DeepSpeed can drive it). Its length is re-estimated at each epoch start
    (fresh negatives change the number of pairs): `set_length` re-applies the current step's rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.kind = kind
        self.total: int | None = None
        self.warmup: int | None = None
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if self.total is None or self.warmup is None:
            return 1.0  # not planned yet: set_length comes before the first optimiser step
        return lr_factor(step, self.total, self.warmup, self.kind)

    def set_length(self, total: int, warmup: int, step: int) -> None:
        """The schedule's total and warm-up steps; the rate of optimiser step `step` (0-based) is applied now."""
        self.total, self.warmup, self.last_epoch = total, warmup, step
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self._factor(step)  # what LambdaLR computes for this step
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


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
            import hashlib
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


def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _diverged(cfg: Config, variant: str, seed: int, step: int, epoch: int, bad: tuple[str, Any],
              out: Path, applied: bool = False) -> TrainingDiverged:
    """`applied`: the engine had already taken the step (DeepSpeed ZeRO-3 in fp32 does not skip a non-finite
    gradient; its norm is known only after its step)."""
    what, value = bad
    step_note = ("DeepSpeed had already applied the step, so the weights in memory are not finite" if applied
                 else "The step was not applied")
    return TrainingDiverged(
        f"{variant} seed {seed} diverged at optimiser step {step} (epoch {epoch}): {what} is {value}. {step_note}; "
        "no non-finite weights, checkpoint, model or result.json were written. Lower trainer.lr "
        f"(now {cfg.trainer.lr:g}) or set trainer.max_grad_norm (now {cfg.trainer.max_grad_norm}), then train "
        f"again into another run.out_dir or after removing {out} (its checkpoints belong to the old settings)")


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
    from .evaluate import write_predictions

    if getattr(res, "predictions", None) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(path, res)


# --------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------

class DistillRecipe:
    """One variant x seed: `run()` returns the stored result when the folder is finished, else trains (or, for
    zero_shot, only evaluates) and writes `result.json` (see `train.train_variant`)."""

    def __init__(self, cfg: Config, variant: str, seed: int, out_dir: str | os.PathLike[str], *, task: Any,
                 train_questions: Sequence[Any], eval_questions: Sequence[Any] | None, store: Any,
                 progress: bool = True, sampler: StudentSampler | None = None,
                 evaluator: Evaluator | None = None) -> None:
        self.cfg, self.variant, self.seed, self.out = cfg, variant, seed, Path(out_dir)
        self.spec = variant_spec(variant)
        self.task, self.train_questions, self.eval_questions = task, list(train_questions), eval_questions
        self.store, self.progress = store, progress
        self.custom_sampler, self.custom_evaluator = sampler, evaluator
        self.fp = run_fingerprints(cfg)
        self.epochs = cfg.trainer.epochs
        self.costs: dict[str, Any] = {
            "train_seconds": 0.0, "sample_seconds": 0.0, "eval_seconds": 0.0, "train_tokens": 0,
            "optimizer_steps": 0, "student_sampled_questions": 0, "student_sampled_traces": 0,
            "student_sampled_tokens": 0}
        self.sample_reports: list[dict[str, Any]] = []
        self.logger: Logger | None = None

    # ---------------------------------------------------------------------------------------------- processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def _live_student(self):
        """Sampling and evaluation: outside the training RNG streams, under autocast, thread-invariant."""
        with rng_fork(), self.accelerator.autocast(), invariant_attention(self.accelerator.device):
            yield

    # ---------------------------------------------------------------------------------------------- entry

    def run(self) -> dict[str, Any]:
        done = self.out / "result.json"
        if done.exists():
            prev = json.loads(done.read_text(encoding="utf-8"))
            check_finished(prev, self.fp, self.variant, self.out)
            return prev
        seed_everything(self.seed)
        self.accelerator = make_accelerator(self.cfg)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
        self.barrier()
        self.setup()
        result = self.evaluate_only() if self.spec.objective == "none" else self.train()
        self.barrier()
        if not self.is_main:  # every rank returns what rank 0 wrote
            result = json.loads(done.read_text(encoding="utf-8"))
        return result

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Student, optimiser, schedule, data, policy, and the newest checkpoint's state if there is one."""
        cfg, tc = self.cfg, self.cfg.trainer
        acc = self.accelerator
        model, self.tokenizer = build_model(cfg, acc.device)
        orpo = ORPOLoss(cfg.objective.lam, cfg.objective.nll_scope, cfg.objective.nll_reduction,
                        cfg.objective.chunk_size, packing=tc.packing)
        sft = SFTLoss(cfg.objective.nll_scope, cfg.objective.nll_reduction, cfg.objective.chunk_size,
                      packing=tc.packing)
        self.fsdp2 = self.world > 1 and fsdp2_requested()
        self.zero = deepspeed_stage() if acc.distributed_type.value == "DEEPSPEED" else None
        self.zero3 = self.zero == 3
        self._replica: Any = None
        if self.zero is not None:
            # DeepSpeed ZeRO through accelerate: the engine wraps the ORPOStudent (the loss runs inside its
            # forward; under ZeRO-3 every rank makes the same number of head calls), our AdamW (ZeRO shards its
            # state) and the schedule object, which the engine steps after each optimiser step
            self.params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
            self.scheduler = DistillSchedule(optimizer, tc.lr_scheduler)
            self.model, self.optimizer = acc.prepare(ORPOStudent(model, orpo, sft, uniform_chunks=self.zero3),
                                                     optimizer)
            # accelerate hands DeepSpeed only its own scheduler classes: the engine steps ours after each of its
            # optimiser steps (and skips it with a skipped step), as it would a client scheduler
            self.model.lr_scheduler = self.scheduler
        elif self.fsdp2:  # shard first: the optimiser is built over the sharded (DTensor) parameters
            from .distributed import apply_fsdp2

            student = apply_fsdp2(ORPOStudent(model, orpo, sft))
            if not any(hasattr(p, "to_local") for p in student.parameters()):  # never train unsharded silently
                raise RuntimeError("FSDP2 was requested (FSDP_VERSION=2) but fully_shard left no parameter sharded")
            self.params = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
            self.scheduler = DistillSchedule(optimizer, tc.lr_scheduler)
            self.model, self.optimizer = student, optimizer
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
            self.scheduler = DistillSchedule(optimizer, tc.lr_scheduler)
            # the loss runs inside the module the wrapper prepares (DDP's gradient hooks see it)
            self.model, self.optimizer = acc.prepare(ORPOStudent(model, orpo, sft), optimizer)
        self.raw_model = model
        self.pad_id = self.tokenizer.pad_token_id
        self.evaluator = self.custom_evaluator or (
            default_evaluator(cfg, self.variant, self.seed, self.task, self.eval_questions,
                              self.progress and self.is_main, wrap=self._wrap_generator)
            if self.eval_questions else None)
        if self.spec.objective == "none":
            return
        self._setup_data()
        self._restore()

    def _wrap_generator(self, gen: Any) -> Any:
        from .sharded import ShardedGenerator

        return ShardedGenerator(gen) if self.world > 1 else gen

    def plain_student(self) -> Any:
        """The HF student with its full current weights, usable by one process (generation, scoring, export).
        DDP: the model itself. FSDP2: every rank gathers the full weights (a collective: every rank calls it)
        into a plain replica built once (outside the training RNG streams)."""
        if not (self.fsdp2 or self.zero3):
            return self.raw_model
        if self.zero3:  # every rank gathers the partitioned parameters (a collective) and copies them
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None):
                full = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from .distributed import hf_state_dict

            full = hf_state_dict(get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True)))
        if self._replica is None:
            with rng_fork(), self._plain_init():
                self._replica = build_model(self.cfg, self.accelerator.device)[0]
        self._replica.load_state_dict(full)
        return self._replica

    def _plain_init(self) -> Any:
        """Build a model outside DeepSpeed's ZeRO-3 partitioned loading (zero3_init_flag), which would shard it."""
        from .distributed import zero3_init_disabled

        return zero3_init_disabled() if self.zero3 else contextlib.nullcontext()

    def _setup_data(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.messages = {str(q.id): self.task.user_message(q) for q in self.train_questions}
        self.qids = list(self.messages)
        chosen = teacher_chosen(cfg, self.store, self.qids)
        self.gold_used: list[str] = []
        if cfg.policy.gold_rationale_fallback:
            for q in self.train_questions:
                if not chosen.get(str(q.id)) and q.rationale:
                    chosen[str(q.id)] = [Text(f"gold:{q.id}", q.rationale, "gold")]
                    self.gold_used.append(str(q.id))
        if spec.chosen == "one":
            chosen = {q: texts[:1] for q, texts in chosen.items()}
        self.chosen = chosen
        self.with_chosen = [q for q in self.qids if chosen.get(q)]
        if not self.with_chosen:
            raise ValueError(f"{self.variant}: none of the {len(self.qids)} training questions has a kept correct "
                             "teacher trace in the store; run `orpo-distill traces teacher CONFIG` first (or "
                             "enable policy.gold_rationale_fallback)")
        self.questions_by_id = {str(q.id): q for q in self.train_questions}
        self.encoder = Encoder(self.tokenizer, template=cfg.student.template, system_prompt=cfg.student.system_prompt,
                               max_length=cfg.pairs.max_length, max_prompt_length=cfg.pairs.max_prompt_length,
                               rejected_scope=spec.rejected_scope or cfg.objective.rejected_scope,
                               chosen_texts=self.chosen, first_error=error_locator(self.task, self.questions_by_id))
        self.sample_fn = self.custom_sampler or default_sampler(
            cfg, self.variant, self.seed, self.task, self.store, self.out, self.progress and self.is_main,
            wrap=self._wrap_generator)
        self.policy = None
        if spec.objective == "orpo":
            self.policy = NegativePolicy(
                self.with_chosen, load=make_loader(cfg, self.store, self.variant, self.seed),
                sample=self.refresh_student, mode=spec.negatives or "student",
                phi_fn=lambda e: phi_for_epoch(cfg.policy, e, self.epochs, spec.phi), seed=self.seed,
                teacher_fallback=cfg.policy.teacher_negatives_fallback,
                adaptive=make_adaptive(cfg.policy, schedule=spec.schedule, phi=spec.phi, chosen=self.chosen,
                                       score=text_scorer(self.encoder, self.messages, self._scorer), seed=self.seed,
                                       history=lambda: self.state["history"]) if spec.negatives == "student" else None)

    def _restore(self) -> None:
        fp = self.fp
        self.state: dict[str, Any] = {
            "epoch": 1, "step_in_epoch": 0, "global_step": 0, "warmup_steps": None, "total_steps": None,
            "history": [], "plan": None, "log_lines": None, "costs": self.costs,
            "sample_reports": self.sample_reports, "epoch_sums": {}, "epoch_counts": {},
            "identity_hash": fp["identity_hash"], "settings": fp["settings"]["weights"]}
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is not None:
            saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
            if saved.get("identity_hash") != fp["identity_hash"]:
                raise UserError(f"{ckpt} was written with another config (hash {saved.get('identity_hash')}, now "
                                f"{fp['identity_hash']}: {_changed(saved.get('settings'), fp['settings']['weights'])}"
                                f"); resume with the same config and overrides, or remove {self.out} to start over")
            fmt = saved.get("checkpoint_format", "full")
            if fmt != self.checkpoint_format and not (self.fsdp2 and fmt == "full"):
                raise UserError(f"{ckpt} was written by a {saved.get('engine', 'ddp')} launch ({fmt} checkpoint) and "
                                f"this launch trains with {self.engine_name} ({self.checkpoint_format}): resume "
                                f"with the launch that wrote it, or remove {ckpt.parent} to restart this variant")
            if fmt == "deepspeed":
                self.state = self._load_engine(ckpt)
            elif fmt == "dcp":
                self.state = self._load_dcp(ckpt)
            elif self.fsdp2:
                self.state = self._load_sharded(ckpt)
            else:
                self.state = load_checkpoint(ckpt, model=self.raw_model, optimizer=self.optimizer,
                                             scaler=self.accelerator.scaler)
            ranks = self.state.get("rng_by_rank")
            if self.world > 1 and ranks and len(ranks) == self.world:
                set_rng_state(ranks[self.rank])
            self.costs.update(self.state["costs"])
            self.sample_reports[:] = self.state.get("sample_reports", [])
            if self.state["total_steps"] is not None:
                self.scheduler.set_length(self.state["total_steps"], self.state["warmup_steps"],
                                          self.state["global_step"])
            log.info("resuming %s seed %d from %s (epoch %d, step %d)", self.variant, self.seed, ckpt,
                     self.state["epoch"], self.state["step_in_epoch"])
        if self.is_main:
            self.logger = Logger(self.cfg, self.out, f"{self.variant}-seed{self.seed}",
                                 self.state["log_lines"] if ckpt else None, self.state["global_step"])
        self.plan = self._restore_plan(self.state["plan"]) if self.state["plan"] else None

    def _load_engine(self, ckpt: Path) -> dict[str, Any]:
        """DeepSpeed: every rank loads its partitions (weights, optimiser) from the engine's checkpoint; the LR is
        re-applied from the saved position by the schedule (`set_length`)."""
        self.model.load_checkpoint(str(ckpt), tag="engine", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        set_rng_state(state["rng"])
        return state

    def _load_dcp(self, ckpt: Path) -> dict[str, Any]:
        """FSDP2: every rank reads its own shards of the model and optimiser (torch.distributed.checkpoint)."""
        from .distributed import load_sharded

        load_sharded(ckpt / "dcp", self.model, self.optimizer)
        if self.accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", map_location="cpu",
                                                               weights_only=True))
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        set_rng_state(state["rng"])
        return state

    def _load_sharded(self, ckpt: Path) -> dict[str, Any]:
        """FSDP2 from a full-state checkpoint (written before checkpoints were sharded): every rank loads the full
        trainable weights and optimiser state into its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state, tensors, optim = read_checkpoint(ckpt)
        set_state_dict(self.model, self.optimizer, model_state_dict={f"model.{k}": v for k, v in tensors.items()},
                       optim_state_dict=optim, options=StateDictOptions(full_state_dict=True, strict=False))
        set_rng_state(state["rng"])
        return state

    # ---------------------------------------------------------------------------------------------- the epoch plan

    def _scorer(self, prompt_ids: list[int], completions: list[list[int]]) -> list[float]:
        model = self.plain_student()
        was = model.training
        model.eval()
        try:
            with self.accelerator.autocast():
                return mean_logps(model, prompt_ids, completions, self.pad_id,
                                  batch_size=self.cfg.trainer.batch_size, chunk_size=self.cfg.objective.chunk_size)
        finally:
            model.train(was)

    def plan_epoch(self, epoch: int) -> dict[str, Any]:
        """This epoch's pool, examples and optimiser steps (each a list of example indices, the global batch),
        the same on every rank; saved in checkpoints as keys, not tensors."""
        cfg, tc = self.cfg, self.cfg.trainer
        pools: dict[str, QuestionPool] = {}
        pool_stats = None
        if self.policy is not None:
            pools, stats = self.policy.pool(epoch)
            pool_stats = stats.as_dict()
        negatives = {q: p.negatives for q, p in pools.items()}
        # (SFT baselines have no negatives: every chosen text becomes one SFT example)
        with rng_fork():
            examples, enc_stats = build_examples(
                [(q, self.messages[q]) for q in self.with_chosen], self.chosen, negatives, self.encoder,
                strategy=cfg.pairs.strategy, max_pairs=cfg.pairs.max_pairs_per_question, seed=self.seed,
                epoch=epoch, scorer=self._scorer if cfg.pairs.strategy == "hardest" else None)
        steps = plan_batches(examples, tc.batch_size, group_by_length=tc.group_by_length,
                             rng=random.Random(f"plan:{self.seed}:{epoch}"))
        if pools and self.is_main:  # the record of where every negative of this epoch came from (kept)
            (self.out / "pools").mkdir(exist_ok=True)
            atomic_write_text(self.out / "pools" / f"epoch{epoch}.json",
                              strict_json({"epoch": epoch, "stats": pool_stats,
                                           "questions": [p.to_json() for p in pools.values()]}, indent=1))
        return {"epoch": epoch, "pools": {q: p.to_json() for q, p in pools.items()}, "pool_stats": pool_stats,
                "encode_stats": enc_stats.as_dict(),
                "examples": [[e.question_id, e.chosen_key, e.rejected_key, e.rejected_source] for e in examples],
                "steps": steps, "_encoded": examples}

    def _restore_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Re-tokenise a saved plan (tokenisation is deterministic) with texts from the store."""
        texts = {t.key: t.text for ts in self.chosen.values() for t in ts}
        # every negative of the saved pool, not only those paired: with pairs.max_pairs_per_question (or the
        # random/hardest strategies) a pool holds negatives that no example uses
        keys = {r[2] for r in plan["examples"] if r[2] is not None}
        keys |= {k for d in plan["pools"].values() for k, _ in d["negatives"]}
        keys -= set(texts)
        for t in self.store.get(sorted(keys)) if keys else []:
            texts[t.key] = t.completion
        examples: list[Encoded] = []
        for qid, ck, rk, rs in plan["examples"]:
            c = Text(ck, texts[ck], "gold" if ck.startswith("gold:") else "teacher")
            r = Text(rk, texts[rk], rs) if rk is not None else None
            examples.append(self.encoder.encode(Example(qid, c, r), self.messages[qid]))
        restore_pools(plan["pools"], texts)  # checks that every negative of the saved pool is still there
        return {**plan, "_encoded": examples}

    # ---------------------------------------------------------------------------------------------- one step

    def loss_step(self, batch: dict[str, torch.Tensor], totals: StepTotals, weight: float = 1.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one micro-batch (its share of the step's loss), through the prepared module."""
        with self.accelerator.autocast():
            return self.model(batch, totals, weight)

    def _step_metrics(self, per_mb: list[dict[str, float]], mb_losses: list[float], tokens: int
                      ) -> tuple[dict[str, float], int, int]:
        """The step's loss (the sum of the shares), the other metrics (the mean over the micro-batches that have
        them, log-odds the pair batches only, weighted by their examples), tokens and the number of non-finite
        losses, over every rank."""
        sums = {k: sum(d[k] * d["_weight"] for d in per_mb if k in d) for k in METRIC_KEYS}
        weights = {k: sum(d["_weight"] for d in per_mb if k in d) for k in METRIC_KEYS}
        loss = sum(mb_losses)
        bad = sum(1 for v in mb_losses if not math.isfinite(v))
        if self.world > 1:
            vec = torch.tensor([loss, float(tokens), float(bad), *(sums[k] for k in METRIC_KEYS),
                                *(weights[k] for k in METRIC_KEYS)], dtype=torch.float64)
            torch.distributed.all_reduce(vec)
            n = len(METRIC_KEYS)
            loss, tokens, bad = float(vec[0]) / self.world, int(vec[1]), int(vec[2])
            sums = {k: float(vec[3 + i]) for i, k in enumerate(METRIC_KEYS)}
            weights = {k: float(vec[3 + n + i]) for i, k in enumerate(METRIC_KEYS)}
        metrics = {k: sums[k] / weights[k] for k in METRIC_KEYS if weights[k] > 0}
        metrics["loss"] = loss
        return metrics, tokens, bad

    # ---------------------------------------------------------------------------------------------- one epoch

    def train_epoch(self, epoch: int) -> None:
        """The optimiser steps of this epoch from the saved position on (accumulate, clip, step, log, save)."""
        cfg, tc, state, acc = self.cfg, self.cfg.trainer, self.state, self.accelerator
        plan = self.plan
        steps: list[list[int]] = plan["steps"]
        examples: list[Encoded] = plan["_encoded"]
        # the schedule's length: fixed warm-up from the first epoch's estimate, total re-estimated per epoch
        if state["warmup_steps"] is None:
            state["warmup_steps"] = math.ceil(tc.warmup_ratio * len(steps) * self.epochs)
        if state["step_in_epoch"] == 0:
            state["total_steps"] = state["global_step"] + len(steps) * (self.epochs - epoch + 1)
            state["epoch_sums"], state["epoch_counts"] = {}, {}
        self.scheduler.set_length(state["total_steps"], state["warmup_steps"], state["global_step"])
        self._replica = None  # FSDP2: no full copy of the student is held while the shards train
        state["epoch"] = epoch
        self.model.train()
        sums: dict[str, float] = state["epoch_sums"]  # this epoch's running metric sums (kept in checkpoints)
        counts: dict[str, int] = state["epoch_counts"]
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(steps), initial=state["step_in_epoch"], dynamic_ncols=True,
                       desc=f"{self.variant} s{self.seed} epoch {epoch}/{self.epochs}")
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        for step_idx in range(state["step_in_epoch"], len(steps)):
            t0 = time.perf_counter()
            step = steps[step_idx]
            # this rank's micro-batches of the step (all of it in one process); every micro-batch's loss is its
            # share of the whole (global) step's loss, so the summed, rank-averaged gradients equal one pass over
            # the step as a single batch, whatever the micro-batch sizes and the number of ranks
            micro = split_step(step, self.world, self.rank, tc.grad_accum)
            batches = [collate([examples[i] for i in mb], self.pad_id) if mb else None for mb in micro]
            totals = reduce_step_totals(step_totals([b for b in batches if b is not None], cfg.objective.nll_scope))
            per_mb: list[dict[str, float]] = []
            mb_losses: list[float] = []
            tokens = 0
            for j, (mb, cpu_batch) in enumerate(zip(micro, batches)):
                weight = 1.0
                if cpu_batch is None:
                    if self.world == 1:
                        continue
                    # nothing left for this rank: a stand-in with weight 0 keeps the ranks' calls equal
                    cpu_batch, weight = collate([examples[step[0]]], self.pad_id), 0.0
                batch = {k: v.to(acc.device) for k, v in cpu_batch.items()}
                last = j == len(micro) - 1  # gradients are synchronised once per step, on its last micro-batch
                if self.fsdp2:
                    self.model.set_requires_gradient_sync(last)
                if self.zero is not None:
                    # DeepSpeed's accumulation boundary is the step's last micro-batch; the engine's own division
                    # by grad_accum is off (the shares already sum to the step's loss). The engine steps below,
                    # after the divergence checks (accelerate's backward would step inside the last backward).
                    self.model.set_gradient_accumulation_boundary(last)
                    loss, m = self.loss_step(batch, totals, weight)
                    self.model.backward(loss, scale_wrt_gas=False)
                else:
                    with contextlib.nullcontext() if last or self.world == 1 or self.fsdp2 else acc.no_sync(self.model):
                        loss, m = self.loss_step(batch, totals, weight)
                        acc.backward(loss)
                if weight == 0.0:
                    continue
                mb_losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                per_mb.append({**{k: float(v) for k, v in m.items()}, "_weight": float(len(mb))})
            metrics, tokens, n_bad = self._step_metrics(per_mb, mb_losses, tokens)
            grad_norm = None
            if self.zero is not None:
                pass  # DeepSpeed clips (gradient_clipping = trainer.max_grad_norm) and reports the norm in its step
            elif self.fsdp2:  # the global norm over the DTensor gradients (clipped, or only measured)
                norm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm or float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            elif tc.max_grad_norm is not None:
                grad_norm = float(acc.clip_grad_norm_(self.params, tc.max_grad_norm))
            elif acc.scaler is None:  # measured (not clipped) so that a divergence is caught
                grad_norm = _grad_norm(self.params)
            # A non-finite loss or gradient stops the variant before the optimiser applies it (fp16: the grad
            # scaler skips inf/NaN gradients itself and lowers its scale, so only the loss is checked there).
            # Every rank sees the same reduced values, so all of them stop together.
            bad = None
            if self.world == 1:
                bad = next(((f"the loss of micro-batch {i + 1}", v) for i, v in enumerate(mb_losses)
                            if not math.isfinite(v)), None)
            elif n_bad:
                bad = (f"the loss of {n_bad} micro-batch(es) over the ranks", metrics["loss"])
            if bad is None and grad_norm is not None and not math.isfinite(grad_norm):
                bad = ("the gradient norm", grad_norm)
            if bad is not None:
                if self.logger is not None:
                    self.logger.write({"kind": "diverged", "global_step": state["global_step"] + 1, "epoch": epoch,
                                       "step_in_epoch": step_idx + 1, "grad_norm": grad_norm, **metrics})
                    self.logger.close()
                raise _diverged(cfg, self.variant, self.seed, state["global_step"] + 1, epoch, bad, self.out)
            lr = self.optimizer.param_groups[0]["lr"]
            if self.zero is not None:
                self.model.step()  # clip on the global norm, AdamW, zero the gradients, step the schedule
                grad_norm = self.model.get_global_grad_norm()
                grad_norm = None if grad_norm is None else float(grad_norm)
                if grad_norm is not None and not math.isfinite(grad_norm):  # ZeRO-2 skipped the step, ZeRO-3 not
                    raise _diverged(cfg, self.variant, self.seed, state["global_step"] + 1, epoch,
                                    ("the gradient norm", grad_norm), self.out, applied=self.zero3)
            else:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] = step_idx + 1
            dt = time.perf_counter() - t0
            self.costs["train_seconds"] += dt
            self.costs["train_tokens"] += tokens
            self.costs["optimizer_steps"] += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if self.logger is not None and state["global_step"] % tc.log_every_steps == 0:
                self.logger.write({"kind": "train", "global_step": state["global_step"], "epoch": epoch,
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
                self.save_checkpoint(epoch_end=False)
            if kill_at and state["global_step"] == kill_at:
                self.barrier()  # rank 0's checkpoint is complete before any rank dies
                os.kill(os.getpid(), 9)
        if bar is not None:
            bar.close()

    # ---------------------------------------------------------------------------------------------- the student

    def refresh_student(self, epochs_trained: int, ids: Sequence[str]) -> None:
        """Sample the live student for the policy (its `sample` callback): rank 0 leads and writes the store, the
        other ranks generate their shard of every call."""
        from .sharded import follow, lead

        t0 = time.perf_counter()
        questions = [self.questions_by_id[q] for q in ids]
        model = self.plain_student()
        with self._live_student():
            if not self.is_main:
                rev = student_revision(self.cfg, self.variant, self.seed, epochs_trained)
                follow(student_generator(self.cfg, model, self.tokenizer, rev, self.cfg.student.batch_size))
                return
            with lead():
                rep = self.sample_fn(model, self.tokenizer, epochs_trained, questions)
        self.costs["sample_seconds"] += time.perf_counter() - t0
        d = rep.as_dict() if hasattr(rep, "as_dict") else {}
        if d.get("sampled", 1):  # a resumed run finds them in the store: not sampled twice, not counted twice
            self.costs["student_sampled_questions"] += len(ids)
        self.costs["student_sampled_traces"] += int(d.get("sampled", 0))
        self.costs["student_sampled_tokens"] += int(d.get("completion_tokens", 0))
        self.sample_reports.append({"epochs_trained": epochs_trained, "questions": len(ids), **d})

    def evaluate(self, epoch: int, name: str) -> dict[str, Any] | None:
        """Evaluate the current student (split over the ranks); rank 0 writes `predictions/<name>.jsonl` and
        gets the summary, the other ranks None."""
        from .sharded import follow, lead

        if self.evaluator is None:
            return None
        t0 = time.perf_counter()
        model = self.plain_student()
        with self._live_student():
            if not self.is_main:
                rev = student_revision(self.cfg, self.variant, self.seed, epoch)
                follow(student_generator(self.cfg, model, self.tokenizer, rev, self.cfg.eval.batch_size))
                return None
            with lead():
                res = self.evaluator(model, self.tokenizer, epoch)
        self.costs["eval_seconds"] += time.perf_counter() - t0
        _write_predictions(res, self.out / "predictions" / f"{name}.jsonl")
        return _eval_summary(res)

    # ---------------------------------------------------------------------------------------------- saving

    def _check_finite_weights(self, step: int, epoch: int) -> None:
        """Refuse to write a checkpoint or model with a NaN/inf weight (a last guard behind the per-step check);
        under DDP every rank holds the same weights, under FSDP2 the ranks share what their shards show."""
        bad = None
        for name, p in self.raw_model.named_parameters():
            local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP2: this rank's shard
            local = getattr(p, "ds_tensor", local)  # ZeRO-3: this rank's partition
            if p.requires_grad and not bool(torch.isfinite(local).all()):
                bad = name
                break
        if self.fsdp2 or self.zero3:  # each rank saw its own shards: all of them decide on the union
            names: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(names, bad)
            bad = next((n for n in names if n), None)
        if bad is not None:
            raise _diverged(self.cfg, self.variant, self.seed, step, epoch, (f"weight {bad}", "non-finite"), self.out)

    @property
    def engine_name(self) -> str:
        """What trained it (result.json, checkpoints): single, ddp, fsdp2, zero2 or zero3."""
        if self.zero is not None:
            return f"zero{self.zero}"
        return "fsdp2" if self.fsdp2 else "ddp" if self.world > 1 else "single"

    @property
    def checkpoint_format(self) -> str:
        """full (rank 0's files, DDP / one process), dcp (torch.distributed.checkpoint, a file per rank: FSDP2)
        or deepspeed (the engine's save_checkpoint: ZeRO partitions per rank)."""
        return "deepspeed" if self.zero is not None else "dcp" if self.fsdp2 else "full"

    def save_checkpoint(self, epoch_end: bool) -> None:
        """An atomic checkpoint with every rank's RNG states. DDP (the state is replicated): rank 0 writes the
        weights and optimiser. FSDP2 / DeepSpeed: every rank writes its own shards into one temporary folder, rank 0
        adds state.json and publishes the folder with one rename (`distributed.publish_checkpoint`), so a kill -9
        at any moment leaves the previous checkpoint as the newest complete one."""
        state = self.state
        plan = None if epoch_end else self.plan
        state["plan"] = {k: v for k, v in plan.items() if not k.startswith("_")} if plan else None
        state["costs"] = self.costs
        state["sample_reports"] = self.sample_reports
        state["engine"], state["checkpoint_format"] = self.engine_name, self.checkpoint_format
        self._check_finite_weights(state["global_step"], state["epoch"])
        if self.world > 1:
            ranks: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(ranks, rng_state())
            state["rng_by_rank"] = ranks
        name = checkpoint_name(state["global_step"], epoch_end)
        root = self.out / "checkpoints"
        if self.checkpoint_format == "full":
            if self.is_main:
                state["log_lines"] = self.logger.lines if self.logger is not None else None
                save_checkpoint(root, name, model=self.raw_model, optimizer=self.optimizer, state=state,
                                scaler=self.accelerator.scaler)
            self.barrier()
            return
        from .distributed import publish_checkpoint, save_sharded

        tmp = root / f".tmp-{name}-shared"  # one name for every rank (the ranks' pids differ)
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        if self.zero is not None:
            self.model.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        else:
            save_sharded(tmp / "dcp", self.model, self.optimizer)
        self.barrier()
        if self.is_main:
            state["log_lines"] = self.logger.lines if self.logger is not None else None
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "state.json").write_text(strict_json({**state, "rng": rng_state()}, ensure_ascii=False),
                                            encoding="utf-8")
            publish_checkpoint(tmp, root / name)
        self.barrier()

    # ---------------------------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Every epoch from the saved position: plan, train, evaluate, checkpoint; then the final model."""
        state = self.state
        for epoch in range(state["epoch"], self.epochs + 1):
            if self.plan is None or self.plan["epoch"] != epoch:
                self.plan = self.plan_epoch(epoch)
                state["step_in_epoch"] = 0
            t_epoch = time.perf_counter()
            self.train_epoch(epoch)
            plan, sums, counts = self.plan, state["epoch_sums"], state["epoch_counts"]
            row: dict[str, Any] = {"kind": "epoch", "global_step": state["global_step"], "epoch": epoch,
                                   "steps": len(plan["steps"]), "seconds": time.perf_counter() - t_epoch,
                                   **{f"train_{k}": sums[k] / counts[k] for k in sums}}
            record: dict[str, Any] = {"epoch": epoch, **{k: v for k, v in row.items() if k not in ("kind", "epoch")},
                                      "pool": plan["pool_stats"], "pairs": plan["encode_stats"]}
            if self.evaluator is not None and (self.cfg.eval.every_epoch or epoch == self.epochs):
                summary = self.evaluate(epoch, f"epoch{epoch}")
                if summary is not None:
                    record["eval"] = summary
                    row["eval_accuracy"] = summary["accuracy"]
            if plan["pool_stats"]:
                row.update({f"pool_{k}": v for k, v in plan["pool_stats"].items() if isinstance(v, (int, float))})
            if self.logger is not None:
                self.logger.write(row)
                line = _epoch_line(self.variant, self.seed, epoch, self.epochs, record)
                log.info(line)
                if self.progress:
                    from tqdm.auto import tqdm

                    tqdm.write(line)
            state["history"].append(record)
            state["epoch"] = epoch + 1
            state["step_in_epoch"] = 0
            self.plan = None
            self.save_checkpoint(epoch_end=True)
        return self._finish()

    def _phi_record(self, history: list[dict[str, Any]]) -> float | list[float | None] | None:
        spec, policy = self.spec, self.cfg.policy
        if spec.negatives != "student":
            return None
        if spec.phi is not None or (spec.schedule or policy.schedule) == "constant":
            return spec.phi if spec.phi is not None else policy.phi
        return [(r.get("pool") or {}).get("phi") for r in history]

    def _finish(self) -> dict[str, Any]:
        """The final student in HF format and result.json (rank 0), then the checkpoints go."""
        cfg, spec, tc = self.cfg, self.spec, self.cfg.trainer
        history = self.state["history"]
        result: dict[str, Any] = {
            "variant": self.variant, "seed": self.seed, **self.fp,
            # a constant phi, or (linear / adaptive schedules) the phi each epoch used
            "phi": self._phi_record(history),
            "phi_schedule": ((spec.schedule or cfg.policy.schedule) if spec.phi is None else "constant")
            if spec.negatives == "student" else None,
            "lam": cfg.objective.lam if spec.objective == "orpo" else None,
            "rejected_scope": (spec.rejected_scope or cfg.objective.rejected_scope)
            if spec.objective == "orpo" else None,
            "train_questions": len(self.qids), "questions_with_chosen": len(self.with_chosen),
            "questions_without_chosen": len(self.qids) - len(self.with_chosen),
            "gold_rationale_questions": len(self.gold_used),
            "per_epoch": history, "final_eval": history[-1].get("eval") if history else None,
            "sampling": self.sample_reports, "costs": self.costs, "model_dir": str(self.out / "model"),
            "processes": self.world,  # data-parallel ranks it was trained on (the numbers do not depend on it)
            "engine": self.engine_name,
        }
        self._check_finite_weights(self.state["global_step"], self.epochs)
        final = self.plain_student()  # FSDP2: the full weights gathered (every rank)
        if self.is_main:
            save_hf_model(final, self.tokenizer, self.out / "model", merge_lora=tc.lora.merge_on_save,
                          card=model_card(cfg, self.variant, self.seed, result), inplace=True)
            if self.logger is not None:
                self.logger.close()
            atomic_write_text(self.out / "result.json", strict_json(result, indent=2))
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out / "sampling_model", ignore_errors=True)
        return result

    def evaluate_only(self) -> dict[str, Any]:
        """zero_shot: the untouched student, evaluated."""
        result = {"variant": self.variant, "seed": self.seed, "per_epoch": [], "final_eval": None,
                  "costs": self.costs, "model_dir": None, **self.fp}
        result["final_eval"] = self.evaluate(0, "final")
        if self.is_main:
            atomic_write_text(self.out / "result.json", strict_json(result, indent=2))
        return result


__all__ = ["DistillRecipe", "DistillSchedule", "Logger", "METRIC_KEYS", "build_model", "make_accelerator"]
