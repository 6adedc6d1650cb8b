"""Loading teacher and student models and tokenizers from the hub, a local folder or a GGUF file.

One place decides device, dtype, `trust_remote_code` (off unless the config asks) and the safetensors-only
rule, so that sampling, training and evaluation load a model the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _source(cfg: ModelConfig, path: str | None = None) -> tuple[str, dict]:
    src = path or cfg.model
    if not src:
        raise ValueError("no model given: set `model:` (a hub id or a local path) in the teacher/student section")
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and not Path(src).exists():
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file and path is None:
        kwargs["gguf_file"] = cfg.gguf_file
    return src, kwargs


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    src, kwargs = _source(cfg, path)
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, device: torch.device | None = None,
               dtype: torch.dtype | None = None):
    """A causal LM in eval mode on `device`; `path` overrides `cfg.model` (a checkpoint of the student)."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    src, kwargs = _source(cfg, path)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = None if not Path(src).exists() else _has_safetensors(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    return model.to(device).eval()


def _has_safetensors(path: str) -> bool | None:
    """Local folders must hold safetensors weights (we never unpickle a local .bin)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise ValueError(f"{p}: only pickle (.bin) weights found; orpo-distill loads safetensors only "
                         "(convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    return True if p.is_dir() else None
