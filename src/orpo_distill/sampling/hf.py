"""The transformers backend: batched sampling from an in-memory model (the teacher, or the student while it trains).

One hand-written decoding loop instead of `model.generate`, for two guarantees `generate` does not give:
1. **Each sample has its own random stream.** Sample i of a prompt draws its tokens by inverse-CDF sampling from
   uniforms of a Philox stream keyed by `sample_seed(seed, message, i)`, so the sample does not depend on which
   other prompts or samples share its batch, on the batch size, or on whether the run was interrupted and
   resumed (the global torch RNG is never touched).
2. **Exactly the requested sample indices** (`sample_indices`), so a resumed run samples only what is missing.
Otherwise it is the usual recipe: left padding with an attention mask and position ids counted from each
prompt's first real token; one prefill per prompt whose KV cache is then copied to that prompt's samples; a KV
cache; finished rows dropped from the batch; EOS, the chat template's end-of-turn token (`tasks.prompts`;
never part of the returned text) and stop strings; temperature, top-p; the batch size halves on out-of-memory and
stays halved. Prompts are tokenised with `tasks.prompts.encode_prompt`, the function training uses. The model is
put back in the train/eval mode it was in. On CPU, decoding runs under `invariant_attention`, so what a model writes
does not depend on the number of torch threads (that is, on how busy the machine is).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# encode_prompt: the one prompt encoder, shared with training (pairs) and the vLLM backend
from ..tasks.prompts import encode_prompt, end_of_turn_ids, render_prompt  # noqa: F401
from .base import Completion, SamplingParams, resolve_sample_indices, sample_seed

log = logging.getLogger(__name__)


def invariant_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which attention gives the same bits whatever the number of CPU threads.

    PyTorch's CPU scaled-dot-product attention splits the key/value length across threads for a single query
    token (every KV-cache decoding step), so its sums, and the logits, change in the last bits with
    `torch.set_num_threads` (1 vs 2 threads: ~1e-7). Inverse-CDF sampling turns such a difference into another
    token now and then, so traces (and everything trained on them) would depend on how loaded the machine is. The
    math backend (matmul + softmax) sums in a fixed order. GPU kernels do not depend on CPU threads: no change there.
    """
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _uniforms(seed: int, steps: int) -> np.ndarray:
    """`steps` uniforms in [0, 1) from a Philox stream keyed by `seed`; raw 64-bit draws (stable across NumPy
    versions, unlike distribution methods) turned into 53-bit doubles."""
    raw = np.random.Philox(key=seed).random_raw(steps)
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: argmax when temperature is 0, else inverse-CDF sampling with the row's uniform `u`
    from softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        # Drop a token when the mass of the tokens before it already exceeds top_p (the first is always kept).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    # A float32 CDF: rounding moves at most ~1e-7 of mass between neighbouring tokens, the target is scaled by the
    # CDF's own total, and a zero-probability token adds exactly nothing, so it can never be chosen.
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.device, torch.float32) * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first index whose CDF exceeds the target, so a zero-probability token is never chosen.
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    bad = probs.gather(-1, idx) == 0  # only when rounding put the target at the very end of the CDF
    if bool(bad.any()):
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        idx = torch.where(bad, last, idx)
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)


class HFGenerator:
    """Sample from an in-memory transformers causal LM (see the module docstring for the guarantees)."""

    def __init__(self, model, tokenizer, *, model_id: str, revision: str, template: str = "auto",
                 system_prompt: str | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.template = template
        self.system_prompt = system_prompt
        self.batch_size = batch_size  # prompts per forward batch; halves on out-of-memory
        self.chunk_prompts = batch_size  # the stage's commit unit: fixed, so resumed chunks equal fresh ones
        self.error_count = 0  # out-of-memory retries
        self._eos = self._eos_ids()
        fwd = getattr(model, "get_base_model", lambda: model)().forward
        fwd_params = inspect.signature(fwd).parameters
        self._logits_to_keep = "logits_to_keep" in fwd_params
        # transformers >= 5.2x names the KV cache argument `cache`; older releases `past_key_values`.
        self._cache_kw = "cache" if "cache" in fwd_params else "past_key_values"
        cfg = getattr(model, "config", None)
        self._max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @classmethod
    def from_config(cls, cfg, *, checkpoint: str | None = None, revision: str | None = None,
                    device: torch.device | None = None) -> HFGenerator:
        """Load `cfg.model` (or a student `checkpoint` folder) with `orpo_distill.models`."""
        from ..models import load_model, load_tokenizer
        from .stage import model_identity

        tok = load_tokenizer(cfg, checkpoint)
        model = load_model(cfg, checkpoint, device=device)
        model_id, rev = model_identity(cfg, checkpoint=checkpoint, model=model)
        return cls(model, tok, model_id=model_id, revision=revision or rev, template=cfg.template,
                   system_prompt=cfg.system_prompt, batch_size=cfg.batch_size)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        """Every token that ends a completion: the model's EOS ids and the format's end of turn (a chat model's
        `<|im_end|>` or `<end_of_turn>`, which is what training ends completions with)."""
        ids: set[int] = set(end_of_turn_ids(self.tokenizer, self.template, self.system_prompt))
        gen_cfg = getattr(self.model, "generation_config", None)
        for src in (getattr(gen_cfg, "eos_token_id", None), getattr(getattr(self.model, "config", None),
                                                                    "eos_token_id", None),
                    getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids

    def render(self, message: str) -> str:
        return render_prompt(self.tokenizer, message, self.template, self.system_prompt)

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the interface -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 sample_indices: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        sample_indices = resolve_sample_indices(len(prompts), params, sample_indices)
        results: list[list[Completion]] = [[] for _ in prompts]
        jobs = [p for p in range(len(prompts)) if len(sample_indices[p])]
        # Every submodule's own flag, not just the top one: a training model may keep some parts in eval mode.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with invariant_attention(self.device):
                start = 0
                while start < len(jobs):
                    group = jobs[start:start + self.batch_size]
                    try:
                        out = self._generate_group([prompts[p] for p in group],
                                                   [list(sample_indices[p]) for p in group], params)
                    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                        if not _is_oom(e) or self.batch_size == 1:
                            raise
                        self.error_count += 1
                        self.batch_size = max(1, self.batch_size // 2)
                        log.warning("out of memory with %d prompts per batch; retrying with %d", len(group),
                                    self.batch_size)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    for p, comps in zip(group, out):
                        results[p] = comps
                    start += len(group)
        finally:
            for m, training in modes:
                m.training = training
        return results

    @torch.no_grad()
    def _generate_group(self, messages: list[str], indices: list[list[int]],
                        params: SamplingParams) -> list[list[Completion]]:
        t0 = time.perf_counter()
        dev = self.device
        tok = self.tokenizer
        prompt_ids = [encode_prompt(tok, self.render(m)) for m in messages]
        if any(not ids for ids in prompt_ids):
            raise ValueError("a prompt encoded to zero tokens")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(self._eos) if self._eos else 0)
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):  # left padding: every prompt ends at the same column
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attn[r, width - len(ids):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)  # positions count from each prompt's first real token

        # Rows = (prompt, sample index); each row's uniforms come from its own seed.
        row_prompt = [p for p, idxs in enumerate(indices) for _ in idxs]
        row_index = [i for idxs in indices for i in idxs]
        n_rows = len(row_prompt)
        steps = params.max_new_tokens
        if self._max_positions:
            longest = max(len(ids) for ids in prompt_ids)
            if longest >= self._max_positions:
                raise ValueError(f"a prompt has {longest} tokens; {self.model_id} takes at most "
                                 f"{self._max_positions} positions")
        # A row also stops ("length") when the model runs out of positions.
        row_cap = [min(steps, self._max_positions - len(prompt_ids[p])) if self._max_positions else steps
                   for p in row_prompt]
        uni = torch.from_numpy(np.stack([_uniforms(sample_seed(params.seed, messages[p], i), steps)
                                         for p, i in zip(row_prompt, row_index)])).to(dev)

        kwargs: dict[str, Any] = {"use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, **kwargs)
        cache = self._cache_of(out)
        expand = torch.tensor(row_prompt, device=dev)
        cache.reorder_cache(expand)  # one prefill per prompt, its cache copied to each of its samples
        logits = out.logits[:, -1, :][expand]
        attn = attn[expand]
        next_pos = pos[expand, -1] + 1
        del out

        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        finish: list[str | None] = [None] * n_rows
        active = list(range(n_rows))  # batch row -> original row
        stop = tuple(s for s in params.stop if s)
        window = max((len(s.encode("utf-8")) for s in stop), default=0) + 2
        for step in range(steps):
            nxt = sample_tokens(logits, uni[:, step], params.temperature, params.top_p).tolist()
            still: list[int] = []
            for b, row in enumerate(active):
                t = nxt[b]
                tokens[row].append(t)
                if t in self._eos:
                    finish[row] = "stop"
                elif stop and any(s in tok.decode(tokens[row][-window:]) for s in stop):
                    finish[row] = "stop"
                elif len(tokens[row]) >= row_cap[row]:
                    finish[row] = "length"
                else:
                    still.append(b)
            if not still:
                break
            sel = None
            if len(still) < len(active):  # drop finished rows so they cost nothing from here on
                sel = torch.tensor(still, device=dev)
                cache.reorder_cache(sel)
                attn, next_pos, uni = attn[sel], next_pos[sel], uni[sel]
                active = [active[b] for b in still]
            last = torch.tensor([tokens[row][-1] for row in active], device=dev).unsqueeze(-1)
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=-1)
            out = self.model(input_ids=last, attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                             **{self._cache_kw: cache}, **kwargs)
            cache = self._cache_of(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
            del out
        del cache

        elapsed = time.perf_counter() - t0
        results: list[list[Completion]] = [[] for _ in messages]
        for row in range(n_rows):
            ids = tokens[row]
            body = ids[:-1] if ids and ids[-1] in self._eos else ids
            text = tok.decode(body, skip_special_tokens=True)
            reason = finish[row] or "length"
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:  # stop strings are not part of the completion (as in the OpenAI API)
                text, reason = text[:cut], "stop"
            p = row_prompt[row]
            results[p].append(Completion(text=text, n_tokens=len(ids), finish_reason=reason, latency_s=elapsed,
                                         prompt_tokens=len(prompt_ids[p])))
        return results
