"""Training checkpoints that survive `kill -9`: written to a temporary folder, then renamed into place.

The one job of this module is to save and restore everything a training run needs to continue exactly where it
stopped: the trainable weights (safetensors; only the adapter for LoRA), the optimiser (and fp16 grad-scaler)
state, the python / numpy / torch RNG states, and a JSON `state` that the trainer fills with its position (epoch,
step inside the epoch, global step), learning-rate schedule, this epoch's pool and batch plan, and the metric
history. A checkpoint folder is complete or absent: it is written under a hidden temporary name, every file is
fsynced, and one `rename` publishes it; the folder name `ckpt-<global step>-<0|1 epoch end>` orders them in time,
and older ones are removed only after the new one is in place.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


def checkpoint_name(global_step: int, epoch_end: bool) -> str:
    return f"{PREFIX}{global_step:09d}-{int(epoch_end)}"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders of a killed save are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def strict_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes strict JSON: a NaN/inf float (a metric of a diverging step) becomes null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states as JSON-able values."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tupled(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


class rng_fork:
    """Run a block (sampling, evaluation) without moving the training RNG streams: states restored on exit."""

    def __enter__(self) -> rng_fork:
        self._state = rng_state()
        return self

    def __exit__(self, *exc: object) -> None:
        set_rng_state(self._state)


# ---------------------------------------------------------------------------------------------------- weights

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them for full fine-tuning, the adapter for LoRA)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "") -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was it written with another config?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))


# ---------------------------------------------------------------------------------------------------- save / load

def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike[str], name: str, *, model: torch.nn.Module | None, optimizer: Any,
                    state: dict[str, Any], scaler: Any = None, keep: int = 1,
                    tensors: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; keep the newest `keep` checkpoints. Returns its folder.

    `tensors` / `optimizer_state` replace `trainable_state(model)` / `optimizer.state_dict()` (sharded training:
    the full state dicts gathered on rank 0)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors if tensors is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    full = dict(state)
    full["rng"] = rng_state()
    (tmp / "state.json").write_text(strict_json(full, ensure_ascii=False), encoding="utf-8")
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    final = root / name
    if final.exists():  # the same position saved again after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left behind by a killed save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike[str], *, model: torch.nn.Module, optimizer: Any,
                    scaler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimiser, scaler and (by default) RNG states; returns the trainer's `state`."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")), str(path))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state, trainable tensors, optimiser state dict) of a checkpoint, without loading them anywhere (sharded
    training loads them into its shards itself)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return (state, load_file(str(path / "trainable.safetensors")),
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
