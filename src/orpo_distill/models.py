"""Loading teacher and student models and tokenizers from the hub, a local folder or a GGUF file.

One place decides device, dtype, `trust_remote_code` (off unless the config asks) and the safetensors-only
rule, so that sampling, training and evaluation load a model the same way. It also turns every loading failure a
user can fix (a folder that does not exist, a broken or unknown `config.json`, a missing tokenizer, `device: cuda`
without CUDA) into a `UserError` naming the path and what to do; `check_model` runs those checks in a second,
before anything expensive starts. A path that looks local (absolute, `./`, `../`, `~`, more than one `/`, or whose
first folder exists here) is never sent to the hub as a repo id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError

# Files any one of which makes a folder loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def looks_local(src: str) -> bool:
    """Whether `src` names a local path rather than a hub repo id ("name" or "org/name")."""
    if src.startswith((".", "/", "~", "\\")) or "\\" in src or src.endswith("/") or src.count("/") > 1:
        return True
    return "/" in src and Path(src.split("/", 1)[0]).is_dir()


def resolve_device(device: str = "auto", *, key: str = "device") -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit device must exist (`key` names the config key)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}: {device!r} requested, but this torch ({torch.__version__}) sees no CUDA GPU; "
                            "set it to auto or cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{key}: {device!r} requested, but only {torch.cuda.device_count()} CUDA device(s) "
                            "are visible")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{key}: 'mps' requested, but MPS is not available here; set it to auto or cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _source(cfg: ModelConfig, path: str | None = None) -> tuple[str, dict]:
    src = path or cfg.model
    if not src:
        raise UserError("no model given: set `model:` (a hub id or a local path) in the teacher/student section")
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and not Path(src).exists():
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file and path is None:
        kwargs["gguf_file"] = cfg.gguf_file
    return src, kwargs


def check_model(cfg: ModelConfig, path: str | None = None, *, key: str = "model", tokenizer: bool = True) -> None:
    """Fast checks of a model before anything expensive: a local folder exists, its `config.json` parses and
    names a `model_type` this transformers knows, it has tokenizer files and (unless GGUF) safetensors weights.
    Hub ids are not looked up (that needs the network); their failures are reported when they load."""
    src = path or cfg.model
    if not src:
        raise UserError(f"{key} is not set: give a hub id or a local model folder")
    if not looks_local(src) and not Path(src).exists():
        return
    p = Path(src).expanduser()
    if not p.exists():
        raise UserError(f"{key}: {src}: no such model folder; check the path (it looks local, so it is not looked "
                        "up on the hub)")
    if not p.is_dir():
        raise UserError(f"{key}: {src} is a file; give the folder that holds config.json and the weights "
                        "(for a GGUF file: the folder as `model` and the file name as `gguf_file`)")
    if cfg.gguf_file and path is None:
        if not (p / cfg.gguf_file).is_file():
            raise UserError(f"{key}: {p / cfg.gguf_file}: GGUF file not found (gguf_file: {cfg.gguf_file!r})")
        return
    conf = p / "config.json"
    if not conf.is_file():
        raise UserError(f"{key}: {p} has no config.json; it is not a saved transformers model "
                        "(save one with `model.save_pretrained(dir)`)")
    try:
        data = json.loads(conf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{key}: {conf}: not valid JSON ({e}); restore the file or re-save the model") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise UserError(f"{key}: {conf}: has no `model_type`; re-save the model with transformers")
    from transformers import CONFIG_MAPPING

    # with trust_remote_code the folder's own code (auto_map) defines the architecture
    remote = cfg.trust_remote_code and isinstance(data.get("auto_map"), dict)
    if data["model_type"] not in CONFIG_MAPPING and not remote:
        import transformers

        raise UserError(f"{key}: {conf}: model_type {data['model_type']!r} is not known to transformers "
                        f"{transformers.__version__}; fix model_type or upgrade transformers "
                        "(remote code is never run unless trust_remote_code: true)")
    if tokenizer and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{key}: {p} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer "
                        "into the folder too (`tokenizer.save_pretrained(dir)`)")
    try:
        _has_safetensors(str(p))
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def _load_error(what: str, src: str, e: BaseException) -> UserError:
    """A transformers loading failure as a message naming the path (local) or the hub id."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if looks_local(src) or Path(src).exists():
        return UserError(f"could not load the {what} from {src}: {reason}")
    return UserError(f"could not load the {what} {src!r} from the hub: {reason} (check the id and revision, "
                     "the network, or give a local folder)")


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The model's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    src, kwargs = _source(cfg, path)
    if looks_local(src) and not Path(src).expanduser().exists():
        raise UserError(f"{src}: no such model folder (it looks local, so it is not looked up on the hub)")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("tokenizer", src, e) from e
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
    if looks_local(src) and not Path(src).expanduser().exists():
        raise UserError(f"{src}: no such model folder (it looks local, so it is not looked up on the hub)")
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = None if not Path(src).exists() else _has_safetensors(src)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model", src, e) from e
    return model.to(device).eval()


def _has_safetensors(path: str) -> bool | None:
    """Local folders must hold safetensors weights (we never unpickle a local .bin)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise UserError(f"{p}: only pickle (.bin) weights found; orpo-distill loads safetensors only "
                        "(convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    return True if p.is_dir() else None
