"""Small, pure helpers for training on several processes: who am I, the process group, the global step's totals,
how a step's examples split over ranks, FSDP2 sharding of a HF causal LM, full state dicts, a DeepSpeed config.

Nothing here starts processes or holds state: the launcher (torchrun, `accelerate launch`) sets RANK/WORLD_SIZE/
LOCAL_RANK, the trainer calls these functions. The loss runs inside `loss.ORPOStudent`, the module every wrapper
prepares. Data parallel arithmetic, whatever the wrapper: every engine here (DDP, FSDP2, DeepSpeed ZeRO) averages
gradients over the ranks, so each rank backpropagates `world x` its part of the global step's loss
(`reduce_step_totals` returns totals with `world` set; the losses apply it), and the average is the one-process
gradient of the global step. DeepSpeed additionally divides each backward by its `gradient_accumulation_steps`:
call `engine.backward(loss, scale_wrt_gas=False)` (our shares already sum to the step's loss).

One optimiser step, per engine (each verified on 2 CPU processes against one process, tests/test_distributed_*):

    student = ORPOStudent(model, ORPOLoss(...), SFTLoss(...), uniform_chunks=<ZeRO-3>)
    parts = split_step(step_items, world, rank, grad_accum)          # empty part: stand-in batch, weight=0.0
    totals = reduce_step_totals(step_totals(this rank's batches, nll_scope))
    loss, metrics = wrapped(batch, totals, weight=w)                  # never the bare model

- DDP: `wrapped = DDP(student)` or `accelerator.prepare(student)` with `Accelerator(gradient_accumulation_steps=1)`
  (above 1, accelerate's `backward` divides the loss again); every micro-batch but the last under
  `wrapped.no_sync()` / `accelerator.no_sync(wrapped)`.
- FSDP2: `apply_fsdp2(student)`, then the optimiser; `wrapped.set_requires_gradient_sync(last)` reduces once per
  step; `torch.nn.utils.clip_grad_norm_` clips on the global norm; checkpoints with `save_sharded`/`load_sharded`
  (a file per rank) or `full_state_dicts` (gathered on rank 0)/`load_full_state_dicts`; generation and scoring on `student.model` inside `unsharded(wrapped)`, same calls on every rank.
- DeepSpeed through accelerate: `apply_trainer_settings(accelerator.state.deepspeed_plugin.deepspeed_config, ...)`
  before `prepare` (an `Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])` on CPU); each
  micro-batch inside `accelerator.accumulate(wrapped)` (it marks DeepSpeed's boundary),
  `accelerator.backward(loss, scale_wrt_gas=False)`; `optimizer.step()` is then a no-op and DeepSpeed clips.
  The trainer (recipe.py) marks the boundary itself (`engine.set_gradient_accumulation_boundary(last)`,
  `engine.backward(loss, scale_wrt_gas=False)`) and calls `engine.step()` after its divergence check, which
  accelerate's backward would not leave room for (it steps inside the last backward).
- Sharded checkpoints (FSDP2 `save_sharded`, DeepSpeed `engine.save_checkpoint`): every rank writes into one
  temporary folder, then rank 0 adds its state and `publish_checkpoint` renames it into place.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .loss import ORPOStudent, StepTotals


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (world 1, rank 0 without a launcher)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_info() -> DistInfo:
    """From the initialised process group if there is one, else from the launcher's environment variables."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
    return DistInfo(int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1), local)


def default_backend() -> str:
    """NCCL where CUDA is, gloo otherwise (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the launcher's process group (idempotent); a plain single process gets world 1 and no group.

    With NCCL the CUDA device is set to LOCAL_RANK first, so each rank owns one GPU.
    """
    info = dist_info()
    if info.world <= 1 or dist.is_initialized():
        return info
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist_info()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_step_totals(local: StepTotals, group: Any = None) -> StepTotals:
    """The global step's totals from each rank's (`loss.step_totals` over its own micro-batches): items and tokens
    summed over the ranks, `world` set to the group's size, so that the gradient the wrapper averages equals the
    one-process gradient of the global step. Without a process group: `local` unchanged.

    The global step's loss (for logs) is the MEAN over ranks of each rank's summed shares (each is world x its
    part); a rank whose micro-batches are all stand-ins passes `StepTotals(0, 0)`."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    t = torch.tensor([local.items, local.tokens], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return StepTotals(int(t[0]), int(t[1]), dist.get_world_size(group))


def split_step(items: Sequence[int], world: int, rank: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one optimiser step's examples (in the global order).

    The step's items are cut into `world` contiguous shards as even as possible (the first ranks take one more),
    each shard into `grad_accum` micro-batches the same way. Every rank gets exactly `grad_accum` lists, some of
    them empty on a short last step: run such a micro-batch on a stand-in example with `weight=0.0`
    (`ORPOStudent`), so that every rank makes the same forward/backward calls, and leave it out of
    `loss.step_totals` and of the logged metrics.
    """
    if world < 1 or not 0 <= rank < world or grad_accum < 1:
        raise ValueError(f"split_step: need world >= 1, 0 <= rank < world, grad_accum >= 1 "
                         f"(got world={world}, rank={rank}, grad_accum={grad_accum})")

    def cut(xs: Sequence[int], n: int) -> list[list[int]]:
        q, r = divmod(len(xs), n)
        out, s = [], 0
        for k in range(n):
            e = s + q + (1 if k < r else 0)
            out.append(list(xs[s:e]))
            s = e
        return out

    return cut(cut(list(items), world)[rank], grad_accum)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF model (the classes in its `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    inner = model.model if isinstance(model, ORPOStudent) else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(inner).__name__} does not name its decoder layers (_no_split_modules); "
                         "shard it by hand with torch.distributed.fsdp.fully_shard")
    return [m for m in inner.modules() if type(m).__name__ in names]


def apply_fsdp2(module: nn.Module, mesh: Any = None, reshard_after_forward: bool = True,
                mp_policy: Any = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (`module`, normally an `loss.ORPOStudent`, whose
    forward gathers the embeddings, final norm and LM head that stay in the root's group). Returns `module`.

    `mesh`: a 1-D device mesh (default: every rank, on CUDA or CPU). The optimiser must be built AFTER this (the
    parameters become DTensors). Gradient clipping: `torch.nn.utils.clip_grad_norm_` works on the DTensor
    gradients (its norm is the global one).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        kind = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for layer in decoder_layers(module):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(module, **kw)
    return module


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Use the HF model outside the root's forward (generation, scoring) under FSDP2: the root's own parameters
    (embeddings, norm, head) are gathered for the duration; the layers gather themselves in their forward.
    A module that is not FSDP2-sharded passes through. Every rank must enter it (it is a collective)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load HF models as plain (unpartitioned) modules inside a ZeRO-3 job: transformers partitions every model it
    loads while a ZeRO-3 DeepSpeed config is registered with it (accelerate registers one for `zero3_init_flag`;
    its own `zero3_init_context_manager(enable=False)` registers the same stage-3 config again, so it does not
    help). The registration is lifted for the block and put back afterwards."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref  # the one place transformers keeps it (a module-level weakref)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Unsharded model (and optimiser) state dicts on CPU, for DDP, FSDP2 or a plain module alike (a collective
    under FSDP2: every rank calls it). Under a process group only rank 0 receives them (the others get empty
    dicts, so a large model is held once per node, not once per rank); rank 0 writes. Keys are those of `module`
    (`model.` + the HF keys for an `ORPOStudent`; `hf_state_dict` strips that)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(module, options=opts), None
    model_sd, optim_sd = get_state_dict(module, optimizer, options=opts)
    return model_sd, optim_sd


def load_full_state_dicts(module: nn.Module, model_sd: dict[str, Any],
                          optimizer: torch.optim.Optimizer | None = None,
                          optim_sd: dict[str, Any] | None = None) -> None:
    """Load what `full_state_dicts` returned into a (sharded or plain) module and optimiser: every rank calls it
    with the full dicts (read from rank 0's file) and keeps its own shard. (torch's `broadcast_from_rank0` option,
    which would spare the other ranks the read, failed here under FSDP2 on gloo with torch 2.13: "c10d.broadcast_
    does not have a sharding strategy"; for large models use `save_sharded`/`load_sharded`.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(module, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd or {}, options=opts)


def save_sharded(path: str | os.PathLike[str], module: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Each rank writes its own shard of the model (and optimiser) with torch.distributed.checkpoint into the
    folder `path` (shared by the ranks); nobody holds a full copy. Write into a temporary folder and rename it on
    rank 0 after a barrier to make it atomic. `load_sharded` reads it back, also at another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(module)}
    else:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_sharded(path: str | os.PathLike[str], module: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read a `save_sharded` folder into a module (and optimiser) sharded like the one that wrote it or not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(module)}
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_model_state_dict(module, state["model"])
        return
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def publish_checkpoint(tmp: str | os.PathLike[str], final: str | os.PathLike[str], keep: int = 1) -> Path:
    """Make a checkpoint folder that every rank wrote into (`tmp`, complete: call after a barrier) visible with
    one rename (rank 0 only): every file and folder fsynced, then `tmp` -> `final`; afterwards the older
    `ckpt-*` folders beyond `keep` and the temporary folders of killed saves go. A kill -9 before the rename
    leaves only a temporary folder, which readers (`checkpoint.list_checkpoints`) ignore."""
    from .checkpoint import fsync_path, list_checkpoints

    tmp, final = Path(tmp), Path(final)
    for dirpath, _, files in os.walk(tmp, topdown=False):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))
    if final.exists():  # the same position saved again after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def hf_state_dict(model_sd: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """An `ORPOStudent`'s state dict with the HF model's own keys (for `save_pretrained(state_dict=...)`)."""
    return {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}


def deepspeed_config(stage: int, *, micro_batch: int, grad_accum: int, lr: float, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     max_grad_norm: float | None = None, precision: str = "fp32", world: int | None = None,
                     torch_adam: bool = True, offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed config dict from our trainer's settings (ZeRO stage 2 or 3).

    Gradient clipping is written explicitly (0.0 when `max_grad_norm` is None): accelerate otherwise defaults it
    to 1.0. The LR is the peak; the trainer's scheduler sets each step's. `torch_adam`: torch's AdamW (no
    compiled op, same arithmetic as the one-process trainer). `world` fills `train_batch_size`
    (= micro_batch x grad_accum x world) when given; DeepSpeed derives it otherwise.
    """
    if stage not in (2, 3):
        raise ValueError(f"deepspeed_config: ZeRO stage must be 2 or 3 (got {stage})")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm is not None else 0.0,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                   "weight_decay": weight_decay, "torch_adam": torch_adam}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if world is not None:
        cfg["train_batch_size"] = micro_batch * grad_accum * world
    return cfg


def apply_trainer_settings(ds_config: dict[str, Any], *, micro_batch: int, grad_accum: int,
                           max_grad_norm: float | None, world: int | None = None) -> dict[str, Any]:
    """Write our trainer's settings into the DeepSpeed config that accelerate built from a launch config
    (`AcceleratorState().deepspeed_plugin.deepspeed_config`, or `accelerator.state.deepspeed_plugin...`), in
    place, before `accelerator.prepare`: the per-rank micro-batch (accelerate cannot infer it without a prepared
    dataloader), `gradient_accumulation_steps`, and `gradient_clipping` (0.0 = off when `max_grad_norm` is None;
    left "auto", accelerate fills 1.0). Returns the same dict."""
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch
    ds_config["gradient_accumulation_steps"] = grad_accum
    ds_config["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    if world is not None:
        ds_config["train_batch_size"] = micro_batch * grad_accum * world
    elif ds_config.get("train_batch_size") == "auto":
        del ds_config["train_batch_size"]  # DeepSpeed derives it from the micro-batch, accumulation and world
    return ds_config
