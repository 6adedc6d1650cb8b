"""The ORPO objective and the completion log-probabilities it is built on.

Mental model: a causal LM scores a completion y after a prompt x by the mean log-probability of y's tokens,
log q(y|x) (length-normalised, <= 0). ORPO (Hong et al. 2024) adds to the usual NLL of the chosen completion a
term that pushes the *odds* q/(1-q) of the chosen completion above those of the rejected one:

    L = NLL(chosen) + lam * -log sigmoid( log odds(chosen) - log odds(rejected) ),
    log odds(y) = log q - log(1 - q) = l - log1mexp(l),  l = log q.

Everything that touches log-probabilities is done in float32 whatever the model's dtype, and log(1 - e^l) uses
the stable log1mexp (log(-expm1(l)) near 0), exact down to the tiniest |l| a float32 mean log-prob reaches
(a memorised trace gives l = -1e-9); only l = 0 itself (a certain model) and positive rounding noise are moved
to the smallest normal negative number, behind a `where`/`clamp` whose gradient is zero, so values and gradients
stay finite instead of the NaN of the naive `log1p(-exp(l))`.

Memory: the LM head is applied only to the positions that are scored, in chunks of `chunk_size` rows, each chunk
under activation checkpointing, so no float32 [batch, seq, vocab] tensor ever exists (peak memory grows with
`chunk_size x vocab`, not `batch x seq x vocab`). The chunked path applies the known transforms between the head
and the logits (Granite's `logits_scaling`, Cohere's `logit_scale`, Gemma-2/3's `final_logit_softcapping`), and
the first time a model is scored it is checked once against the model's own forward (`verify_chunked_head`); a
model whose logits it does not reproduce is scored through the full-logits forward instead, with a warning
about memory. `sequence_logps_naive` is that full-logits path, also the reference for tests and benchmarks.

Speed: a training forward does not recompute the head in backward. The loss is a sum of independent terms over
pairs (or SFT sequences), so `fused_sequence_loss` takes whole pairs, `chunk_size` rows at a time, computes their
logits once, their log-prob sums and loss term, and from the same logits the gradients with respect to the
hidden states and the head's weight (d term / d token log-prob is d term / d its sequence's sum: a tiny autograd
call on the sums); backward only scales the stored gradients (`_FusedHeadLoss`, the idea of Liger's fused linear
preference losses). It needs a plain linear head (an adapter or hook on the head, ZeRO-3's uniform head calls and
no-grad scoring use the chunked path). `packing` (`trainer.packing`) runs the backbone padding-free: the real
tokens of a padded batch packed into rows as long as its longest sequence, positions restarting per sequence,
so the model's masking builds a block-diagonal causal mask (flash-attention: varlen); checked once per model
against the padded path (`verify_packing`).

Gradient accumulation: with `StepTotals` (from `step_totals` over all micro-batches of an optimiser step) the
losses return each micro-batch's share of the step's loss, so the summed backward passes of a step equal one
backward over the step as a single batch, whatever the micro-batch sizes (a short last micro-batch weighs what
its examples weigh; `nll_reduction: token` pools over the whole step's tokens).

Under a distributed wrapper (DDP, FSDP2, DeepSpeed, accelerate) the loss must run inside the module the wrapper
prepared, or the wrapper's hooks never see it (DDP's reducer, FSDP's and ZeRO-3's parameter gathering):
`ORPOStudent` holds the HF model and both objectives and its `forward(batch, totals)` returns (loss, metrics);
wrap and call that module. Data parallel: `StepTotals.world` is the number of ranks whose gradients the wrapper
averages; with the step's totals summed over ranks (`distributed.reduce_step_totals`) each rank's share is
`world x` its part of the global step's loss, so the averaged gradient equals one process's over the global step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)
# The attribute under which a model records the result of its one-time chunked-head check (True: chunked path
# reproduces the model's logits). Kept on the model itself, so the check runs once per model, not once per call.
_HEAD_CHECK_ATTR = "_orpo_distill_chunked_head_ok"
# Rows and tokens of the one-time check: enough to see a wrong head transform, small enough to cost nothing.
_CHECK_ROWS, _CHECK_TOKENS = 2, 64


def _at_least_f32(x: Tensor) -> Tensor:
    """Half-precision inputs are upcast to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable everywhere (Maechler 2012), in float32 or wider.

    Uses log1p(-exp(x)) for x < -ln 2 and log(-expm1(x)) otherwise, which is accurate for every negative x down
    to the dtype's smallest normal number (-1.2e-38 in float32). Only x = 0, positive x (rounding noise of a
    certain model) and subnormal x are moved to that smallest normal (a clamp: zero gradient there), so the
    result and its gradient are finite for every input, and each `where` branch only ever sees safe inputs.
    """
    x = _at_least_f32(x)
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    small = x < -_LN2
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, -1.0))))
    near = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, -0.1), x)))
    return torch.where(small, far, near)


def log_odds_ratio(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """log( odds(chosen) / odds(rejected) ) per example, from mean token log-probs (each <= 0), in float32 or wider.

    odds(y) = q / (1 - q) with log q the length-normalised log-probability. Positive when the chosen completion
    is the more likely one. Positive inputs (rounding noise) count as 0.
    """
    c = _at_least_f32(chosen_logps).clamp(max=0.0)
    r = _at_least_f32(rejected_logps).clamp(max=0.0)
    return (c - r) - (log1mexp(c) - log1mexp(r))


@dataclass
class SequenceLogps:
    """Per-sequence sums and token counts of scored log-probs (float32)."""

    sum: Tensor  # [B]
    count: Tensor  # [B] (float, >= 1 where anything is scored)

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1.0)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions 0..n-1 over the real tokens of each row, whatever side the padding is on."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _target_mask(attention_mask: Tensor, completion_mask: Tensor, scope: str) -> Tensor:
    """Which tokens t (t >= 1) are scored as targets of position t-1: completion tokens, or all real tokens."""
    m = completion_mask if scope == "completion" else attention_mask
    m = m.bool() & attention_mask.bool()
    return m[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# The LM head and what some models do to its output before it becomes logits
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTransform:
    """logits = softcap(scale * head(h)), softcap(z) = tanh(z / c) * c (skipped when `softcap` is None)."""

    scale: float = 1.0
    softcap: float | None = None


def head_transform(model: nn.Module) -> HeadTransform:
    """The known transforms between a HF causal LM's head and its logits, read from its (text) config.

    Granite-family models divide by `logits_scaling` (HyperCLOVA X multiplies by its field of the same name),
    Cohere-family models multiply by `logit_scale`, Gemma-2/3 (and others) soft-cap with
    `final_logit_softcapping`. Anything else is caught by `verify_chunked_head`.
    """
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kind = str(getattr(text, "model_type", "") or "").lower()
    scale = 1.0
    logits_scaling = getattr(text, "logits_scaling", None)
    if logits_scaling:
        if kind.startswith("granite"):
            scale /= float(logits_scaling)
        elif kind.startswith("hyperclovax"):
            scale *= float(logits_scaling)
    logit_scale = getattr(text, "logit_scale", None)
    if logit_scale is not None and kind.startswith("cohere"):
        scale *= float(logit_scale)
    softcap = getattr(text, "final_logit_softcapping", None)
    return HeadTransform(scale, float(softcap) if softcap else None)


def _lm_head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, HeadTransform]:
    """The decoder backbone, the LM head module and its logit transform of a HF causal LM (PEFT-wrapped or not).

    The head is called as a module (not as its weight matrix), so adapters or quantisation on the head count.
    """
    return model.get_decoder(), model.get_output_embeddings(), head_transform(model)


def _head_logits(h: Tensor, head: nn.Module, tf: HeadTransform) -> Tensor:
    """float32 logits of hidden states `h` through the head and its transform."""
    logits = head(h).float()
    if tf.scale != 1.0:
        logits = logits * tf.scale
    if tf.softcap:
        logits = torch.tanh(logits / tf.softcap) * tf.softcap
    return logits


def _chunk_token_logps(h: Tensor, targets: Tensor, head: nn.Module, tf: HeadTransform) -> Tensor:
    logits = _head_logits(h, head, tf)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (normed) hidden states of the backbone, [B, T, H], with explicit position ids."""
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_chunked_head(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> float:
    """How far the chunked path's logits are from the model's own forward: max |difference| / max |logit|.

    Runs both on at most 2 rows of at most 64 real tokens, in eval mode (no dropout; every submodule's mode is
    restored). Returns inf when the shapes differ. Float noise is ~1e-6 in float32 and ~1e-2 in half precision;
    a skipped transform gives a much larger value.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    decoder, head, tf = _lm_head_parts(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    worst = 0.0
    try:
        for i in range(min(_CHECK_ROWS, input_ids.shape[0])):
            ids = input_ids[i][attention_mask[i].bool()][:_CHECK_TOKENS][None]
            if ids.numel() == 0:
                continue
            am = torch.ones_like(ids)
            pos = position_ids_from_mask(am)
            ref = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits.float()
            out = decoder(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            got = _head_logits(h, head, tf)
            if got.shape != ref.shape:
                return math.inf
            diff = float((got - ref).abs().max())
            worst = max(worst, diff / max(float(ref.abs().max()), 1e-12))
            if not math.isfinite(diff):
                return math.inf
    finally:
        for m, training in modes:
            m.training = training
    return worst


def _check_tolerance(model: nn.Module) -> float:
    """Relative logit tolerance of the check: float32 noise is ~1e-6, one half-precision rounding ~4e-3."""
    dtype = next(model.parameters()).dtype
    half = dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(
        next(model.parameters()).device.type)
    return 2e-2 if half else 1e-4


def verify_chunked_head(model: nn.Module, batch_or_ids: dict[str, Tensor] | Tensor) -> None:
    """Check once per model that the chunked log-prob path reproduces the model's own logits; remember the result.

    `batch_or_ids` is a training batch (its `input_ids`/`attention_mask`) or a [B, T] tensor of token ids. On a
    mismatch (a head transform this module does not know) a warning is logged and from then on every
    `sequence_logps` call on this model uses the model's own full-logits forward: correct, but it holds float32
    [batch, seq, vocab] logits, so memory grows with batch x length x vocabulary. The trainer may call this at
    start-up; otherwise the first `sequence_logps` call on the model does it. Calling it again does nothing.
    """
    if getattr(model, _HEAD_CHECK_ATTR, None) is not None:
        return
    if isinstance(batch_or_ids, dict):
        ids, am = batch_or_ids["input_ids"], batch_or_ids.get("attention_mask")
    else:
        ids, am = batch_or_ids, None
    if ids.dim() == 1:
        ids, am = ids[None], (am[None] if am is not None else None)
    err = check_chunked_head(model, ids, am)
    ok = err <= _check_tolerance(model)
    if not ok:
        name = type(model).__name__
        log.warning("the chunked log-prob path does not reproduce %s's own logits (max relative difference %.3g: "
                    "an LM-head transform it does not know); scoring with the model's full-logits forward instead, "
                    "which holds float32 [batch, seq, vocab] logits: expect much more memory (lower "
                    "trainer.batch_size or pairs.max_length if it runs out)", name, err)
    setattr(model, _HEAD_CHECK_ATTR, ok)


def chunked_head_ok(model: nn.Module) -> bool | None:
    """The recorded result of `verify_chunked_head` for this model (None: not checked yet)."""
    return getattr(model, _HEAD_CHECK_ATTR, None)


def scored_positions(attention_mask: Tensor, completion_mask: Tensor, scopes: tuple[str, ...]) -> int:
    """How many positions `sequence_logps` sends through the LM head (the union of the scopes' targets)."""
    return int(_target_mask(attention_mask, completion_mask, "all" if "all" in scopes else "completion").sum())


def _scored_rows(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                 scopes: tuple[str, ...], packing: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor]:
    """One backbone forward; the hidden states of the positions some scope scores ([N, H], row-major order), their
    target ids, their sequence index, each scope's [B, T-1] target mask and their union.

    `packing`: the backbone runs on the batch's real tokens packed into rows (`pack_batch`) instead of the padded
    rows; the same hidden states up to float rounding, fewer tokens computed. A batch where some scored target
    follows a pad (a left-padded batch scored on all tokens) is run padded.
    """
    masks = {s: _target_mask(attention_mask, completion_mask, s) for s in scopes}
    union = torch.zeros_like(next(iter(masks.values())))
    for m in masks.values():
        union |= m
    targets = input_ids[:, 1:][union]
    seq_of = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(union)[union]
    if packing:
        plan = pack_batch(input_ids, attention_mask)
        src = plan.index[:, :-1][union]
        if not bool((src < 0).any()):
            return packed_hidden_states(model, plan)[src], targets, seq_of, masks, union
    h = hidden_states(model, input_ids, attention_mask)[:, :-1]
    return h[union], targets, seq_of, masks, union


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   scopes: tuple[str, ...] = ("completion",), chunk_size: int = 1024, min_chunks: int = 0,
                   packing: bool = False) -> dict[str, SequenceLogps]:
    """Per-sequence log-prob sums/counts for each scope in `scopes` ("completion" and/or "all"), chunked.

    One backbone forward; only the scored positions go through the LM head, `chunk_size` rows at a time, each
    chunk checkpointed so its float32 logits are recomputed in backward instead of stored. A model that failed
    `verify_chunked_head` (run here on the first call) is scored with `sequence_logps_naive`.

    `min_chunks`: call the head at least this many times (extra calls on zero rows, which change no value).
    ZeRO-3 gathers the head's weight on every call, forward and recompute alike, so every rank must make the
    same number of calls; `ORPOStudent(uniform_chunks=True)` passes the largest count over the ranks.
    `packing`: run the backbone padding-free (see `_scored_rows`).
    """
    verify_chunked_head(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    if not chunked_head_ok(model):
        return sequence_logps_naive(model, input_ids, attention_mask, completion_mask, scopes)
    _, head, tf = _lm_head_parts(model)
    rows, targets, seq_of, masks, union = _scored_rows(model, input_ids, attention_mask, completion_mask, scopes,
                                                       packing)
    pieces = []
    for i in range(0, rows.shape[0], chunk_size):
        hc, tc = rows[i:i + chunk_size], targets[i:i + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, hc, tc, head, tf, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(hc, tc, head, tf))
    for _ in range(len(pieces), min_chunks):  # zero rows: part of the graph, so backward recomputes them too
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, rows[:0], targets[:0], head, tf, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(rows[:0], targets[:0], head, tf))
    tok = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    out = {}
    for s, m in masks.items():
        keep = m[union].float()
        sums = torch.zeros(input_ids.shape[0], device=tok.device, dtype=torch.float32).index_add(0, seq_of, tok * keep)
        out[s] = SequenceLogps(sums, m.sum(-1).float())
    return out


def sequence_logps_naive(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                         scopes: tuple[str, ...] = ("completion",)) -> dict[str, SequenceLogps]:
    """Reference path: the model's own forward, float32 log-softmax over [B, T, V]. Same results as
    `sequence_logps`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = {}
    for s in scopes:
        m = _target_mask(attention_mask, completion_mask, s).float()
        out[s] = SequenceLogps((lp * m).sum(-1), m.sum(-1))
    return out


# --------------------------------------------------------------------------------------------------------------
# Padding-free batches: the real tokens of a padded batch packed into rows, positions restarting per sequence
# --------------------------------------------------------------------------------------------------------------

# The attribute under which a model records whether packed rows reproduce its padded log-probs (checked once).
_PACK_CHECK_ATTR = "_orpo_distill_packing_ok"


@dataclass
class PackPlan:
    """Where each real token of a padded [B, T] batch sits in the packed [R, L] rows.

    `input_ids`/`position_ids`: the packed rows (positions restart at 0 at every sequence start, the unused tail of
    a row is a sequence of its own, so no real token attends to it); `index`: [B, T] flat index into the packed
    rows of each real token, -1 on pads.
    """

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]
    index: Tensor  # [B, T]


def pack_batch(input_ids: Tensor, attention_mask: Tensor) -> PackPlan:
    """Pack the real tokens of each row (left or right padded) into rows as long as the longest sequence.

    First-fit decreasing: each sequence goes whole into the first row it fits, longest first; a row never holds
    more tokens than the batch's longest sequence, so attention never costs more than on the padded batch.
    """
    lengths = attention_mask.sum(-1).tolist()
    cap = max(max(lengths), 1)
    bins: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[b] <= left:
                bins[r].append(b)
                room[r] -= lengths[b]
                break
        else:
            bins.append([b])
            room.append(cap - lengths[b])
    width = cap - min(room)
    dev = input_ids.device
    ids = torch.zeros(len(bins), width, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(len(bins), width, dtype=torch.long, device=dev)
    index = torch.full(input_ids.shape, -1, dtype=torch.long, device=dev)
    real = attention_mask.bool()
    for r, seqs in enumerate(bins):
        at = 0
        for b in sorted(seqs):
            n = lengths[b]
            ids[r, at:at + n] = input_ids[b][real[b]]
            pos[r, at:at + n] = torch.arange(n, device=dev)
            index[b, real[b]] = r * width + at + torch.arange(n, device=dev)
            at += n
        pos[r, at:] = torch.arange(width - at, device=dev)  # the tail: a sequence of its own
    return PackPlan(ids, pos, index)


def packed_hidden_states(model: nn.Module, plan: PackPlan) -> Tensor:
    """Final hidden states of the packed rows, flattened to [R * L, H]; no attention mask, so the model's masking
    builds the block-diagonal causal mask from the restarting position ids (varlen kernels on flash-attention)."""
    out = model.get_decoder()(input_ids=plan.input_ids, position_ids=plan.position_ids, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h.reshape(-1, h.shape[-1])


@torch.no_grad()
def check_packing(model: nn.Module) -> float:
    """Max |log-prob difference| between packed and padded scoring of two short fixed sequences (eval mode)."""
    dev = next(model.parameters()).device
    probe = _probe_ids(model, dev)
    ids = torch.stack([probe[0, :32], probe[1, :32], probe[1, 32:]])
    am = torch.ones_like(ids)
    am[1, 16:] = 0
    am[2, 12:] = 0  # lengths 32, 16, 12: the two short ones share the second packed row
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        h = hidden_states(model, ids, am)
        plan = pack_batch(ids, am)
        if plan.input_ids.shape[0] != 2:
            return math.inf
        hp = packed_hidden_states(model, plan)
        real = am.bool()
        return float((h[real].float() - hp[plan.index[real]].float()).abs().max())
    finally:
        for m, training in modes:
            m.training = training


def verify_packing(model: nn.Module) -> bool:
    """Check once per model that packed rows give the padded batch's hidden states; remember the result.

    A model whose attention does not read packed sequences from the position ids (older architectures, absolute
    positions it ignores) fails the check, is logged once, and is trained on padded batches instead.
    """
    ok = getattr(model, _PACK_CHECK_ATTR, None)
    if ok is None:
        err = check_packing(model)
        ok = err <= (5e-2 if _check_tolerance(model) > 1e-3 else 1e-4)
        if not ok:
            log.warning("padding-free batches do not reproduce %s's padded hidden states (max difference %.3g); "
                        "training on padded batches", type(model).__name__, err)
        setattr(model, _PACK_CHECK_ATTR, ok)
    return ok


# --------------------------------------------------------------------------------------------------------------
# The fused head: logits, loss and gradients of each chunk in one pass, nothing recomputed in backward
# --------------------------------------------------------------------------------------------------------------

def fused_head_usable(head: nn.Module) -> bool:
    """Whether the fused path may read the head's weight directly: a plain `nn.Linear` without hooks (an adapter,
    a quantised layer or a ZeRO-3 gathering hook on the head goes through the module-calling chunked path)."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not getattr(head.weight, "ds_id", None))


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: autocast's, or the weight's own."""
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _fused_logits(h: Tensor, w: Tensor, b: Tensor | None, tf: HeadTransform, targets: Tensor
                  ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One chunk's head: (e, t, s, target log-probs) with e = exp(z - max z) in float32 (in place of the logits z,
    kept for the gradient: softmax = e / s), t the soft-cap's tanh (None without one), s = sum(e) per row.

    One exp pass serves both the log-probs (logsumexp = max + log s) and the gradient (no second softmax)."""
    z = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).float()
    if tf.scale != 1.0:
        z.mul_(tf.scale)
    t = None
    if tf.softcap:
        t = torch.tanh(z / tf.softcap)
        z = t * tf.softcap
    picked = z.gather(-1, targets[:, None]).squeeze(-1)
    top = z.amax(dim=-1)
    e = z.sub_(top[:, None]).exp_()
    s = e.sum(dim=-1)
    return e, t, s, picked - top - s.log()


def _fused_dlogits(e: Tensor, t: Tensor | None, s: Tensor, targets: Tensor, g: Tensor, tf: HeadTransform) -> Tensor:
    """d loss / d head output of one chunk, in place of `e`: g * (onehot(target) - softmax) through the transforms."""
    d = e.mul_((-g / s)[:, None])
    d.scatter_add_(1, targets[:, None], g[:, None])
    if t is not None:
        d.mul_(t.mul_(t).neg_().add_(1.0))
    if tf.scale != 1.0:
        d.mul_(tf.scale)
    return d


class _FusedHeadLoss(torch.autograd.Function):
    """loss(per-sequence sums of token log-probs) through the LM head, forward and gradients in one pass.

    The loss is a sum of independent terms over `groups` (lists of sequence indices: a pair's chosen and rejected
    rows, or one SFT sequence, several units per group up to `chunk_size` rows), so each group's logits are
    computed once, its sums and its loss term follow, the term's gradient with respect to the sums is one tiny
    autograd call, and d loss / d token log-prob = d term / d sum of its sequence. The gradients with respect to
    the hidden rows and the head are formed from the same logits and stored; backward only scales them.
    A group larger than `chunk_size` rows is scored in pieces first and its pieces' logits recomputed once for
    their gradients (memory stays chunk_size x vocab).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, seq_of: Tensor,
                keep: Tensor, n_seq: int, groups: list[list[int]], loss_fn, tf: HeadTransform, chunk_size: int,
                need_rows: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
        cd = _compute_dtype(weight)
        w = weight.detach().to(cd)
        b = bias.detach().to(cd) if bias is not None else None
        hd = rows.detach()
        grad_rows = torch.zeros_like(hd) if need_rows else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_weight and bias is not None else None
        n_scopes = keep.shape[0]
        sums = torch.zeros(n_scopes, n_seq, dtype=torch.float32, device=rows.device)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        starts = torch.zeros(n_seq + 1, dtype=torch.long)
        starts[1:] = torch.bincount(seq_of.cpu(), minlength=n_seq).cumsum(0)
        for seqs in groups:
            idx = torch.cat([torch.arange(int(starts[s]), int(starts[s + 1])) for s in seqs]).to(rows.device)
            local = torch.cat([torch.full((int(starts[s + 1] - starts[s]),), i, dtype=torch.long)
                               for i, s in enumerate(seqs)]).to(rows.device)
            pieces = idx.split(chunk_size) if idx.numel() else ()
            kept, lps = [], []
            for p in pieces:
                z, t, lse, lp = _fused_logits(hd[p].to(cd), w, b, tf, targets[p])
                lps.append(lp)
                kept.append((z, t, lse) if len(pieces) == 1 else None)  # one piece: keep its logits, no recompute
            lp = torch.cat(lps) if lps else sums.new_zeros(0)
            kg = keep[:, idx]
            gsum = torch.zeros(n_scopes, len(seqs), dtype=torch.float32, device=rows.device)
            gsum.index_add_(1, local, kg * lp)
            with torch.enable_grad(), torch.autocast(rows.device.type, enabled=False):
                s = gsum.detach().requires_grad_(True)
                term = loss_fn(seqs, s)
                (ds,) = torch.autograd.grad(term, s)
            total += term.detach()
            sums[:, seqs] = gsum
            if not (need_rows or need_weight):
                continue
            g = (ds[:, local] * kg).sum(0)
            at = 0
            for p, st in zip(pieces, kept):
                if st is None:
                    st = _fused_logits(hd[p].to(cd), w, b, tf, targets[p])[:3]
                d = _fused_dlogits(*st, targets[p], g[at:at + p.numel()], tf)
                at += p.numel()
                dc = d.to(cd)
                if need_rows:
                    grad_rows[p] = (dc @ w).to(grad_rows.dtype)
                if need_weight:
                    if cd == torch.float32:
                        grad_w.addmm_(dc.t(), hd[p].float())
                    else:
                        grad_w += (dc.t() @ hd[p].to(cd)).float()
                    if grad_b is not None:
                        grad_b += d.sum(0)
        ctx.grads = (grad_rows, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_sums: Tensor):
        grad_rows, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scale = grad_loss.float()
        # in place: the stored buffers are not needed again, and a head-sized copy is a lot of memory
        out_rows = grad_rows.mul_(scale.to(grad_rows.dtype)) if grad_rows is not None else None
        out_w = grad_w.mul_(scale).to(ctx.dtypes[0]) if grad_w is not None else None
        out_b = grad_b.mul_(scale).to(ctx.dtypes[1]) if grad_b is not None else None
        return out_rows, out_w, out_b, None, None, None, None, None, None, None, None, None, None


def _groups(units: list[list[int]], rows_per_seq: list[int], chunk_size: int) -> list[list[int]]:
    """Consecutive units (a pair's two sequences, or one sequence) gathered into groups of at most `chunk_size`
    scored rows (a unit larger than that is a group of its own); each group lists its units' first sequences,
    then their second ones (chosen ids, then rejected ids)."""
    out: list[list[list[int]]] = []
    rows = chunk_size + 1
    for u in units:
        n = sum(rows_per_seq[s] for s in u)
        if out and rows + n <= chunk_size:
            out[-1].append(u)
            rows += n
        else:
            out.append([u])
            rows = n
    return [[u[k] for k in range(len(g[0])) for u in g] for g in out]


def fused_path_ok(model: nn.Module) -> bool:
    """Whether `fused_sequence_loss` can score this model: the chunked head reproduces its logits (checked once)
    and its head is a plain linear layer."""
    return bool(chunked_head_ok(model)) and fused_head_usable(model.get_output_embeddings())


def fused_sequence_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                        scopes: tuple[str, ...], units: list[list[int]], term, chunk_size: int = 1024,
                        packing: bool = False) -> tuple[Tensor, dict[str, SequenceLogps]]:
    """A loss that is a sum of terms over `units` (lists of sequences), each a function of its sequences'
    per-scope log-prob sums, through the fused head: (loss, detached per-scope `SequenceLogps` for metrics).

    `term(seqs, sums)` gets the sequence indices of a group of units (the units' first sequences, then their
    second ones) and their float32 sums [len(scopes), len(seqs)], and returns the group's share of the loss.
    Equal to building the loss from `sequence_logps` (values and gradients, up to float rounding), without the
    chunked path's recomputation of the head in backward. Needs `fused_path_ok(model)`.
    """
    _, head, tf = _lm_head_parts(model)
    rows, targets, seq_of, masks, union = _scored_rows(model, input_ids, attention_mask, completion_mask, scopes,
                                                       packing)
    n_seq = input_ids.shape[0]
    keep = torch.stack([masks[s][union] for s in scopes]).float()
    per_seq = union.sum(-1).tolist()
    groups = _groups(units, per_seq, chunk_size)
    need_rows = torch.is_grad_enabled() and rows.requires_grad
    need_weight = torch.is_grad_enabled() and head.weight.requires_grad
    loss, sums = _FusedHeadLoss.apply(rows, head.weight, head.bias, targets, seq_of, keep, n_seq, groups, term, tf,
                                      chunk_size, need_rows, need_weight)
    return loss, {s: SequenceLogps(sums[i], masks[s].sum(-1).float()) for i, s in enumerate(scopes)}


# --------------------------------------------------------------------------------------------------------------
# Gradient accumulation: what one optimiser step holds
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTotals:
    """What the whole optimiser step holds, over all its micro-batches (see `step_totals`)."""

    items: int  # examples in the whole optimiser step over all its micro-batches (a pair 1, an SFT example 1)
    tokens: int  # NLL-scored target tokens (chosen / SFT sequences only, per nll_scope) in the whole step
    # Data-parallel ranks whose gradients the wrapper averages (DDP, FSDP and ZeRO all divide the summed gradient
    # by the world size): each share is multiplied by it, so the average is the one-process gradient of the
    # global step. 1 in one process; `distributed.reduce_step_totals` sets it with the global items/tokens.
    world: int = 1

    def per_item(self) -> float:
        """The divisor of a per-item (sequence-mean) sum: items / world."""
        return self.items / self.world

    def per_token(self) -> float:
        """The divisor of a token-pooled sum: max(tokens, 1) / world."""
        return float(max(self.tokens, 1)) / self.world


def batch_is_pair(batch: dict[str, Tensor]) -> bool:
    """Whether `batch` (from `pairs.collate`) holds pairs ([2B, T], chosen rows first) or SFT examples ([B, T])."""
    if "is_pair" not in batch:
        raise ValueError("the batch has no `is_pair` marker: build training batches with pairs.collate")
    return bool(batch["is_pair"])


def _nll_rows(batch: dict[str, Tensor], is_pair: bool) -> int:
    """The number of leading rows whose NLL is scored: the chosen half of a pair batch, every row of an SFT batch."""
    n = batch["input_ids"].shape[0]
    return n // 2 if is_pair else n


def step_totals(batches: Sequence[dict[str, Tensor]], nll_scope: str) -> StepTotals:
    """Items and NLL-scored tokens over the micro-batches of one optimiser step (batches from `pairs.collate`)."""
    items = tokens = 0
    for b in batches:
        rows = _nll_rows(b, batch_is_pair(b))
        items += rows
        tokens += int(_target_mask(b["attention_mask"], b["completion_mask"], nll_scope)[:rows].sum())
    return StepTotals(items, tokens)


def nll(logps: SequenceLogps, reduction: str = "sequence", totals: StepTotals | None = None) -> Tensor:
    """Negative log-likelihood: mean of per-sequence means (`sequence`) or pooled over all tokens (`token`).

    With `totals`, this batch's share of the step's NLL: the sum over its sequences (or tokens) divided by the
    step's item (or token) count (times `totals.world` under data parallelism).
    """
    if reduction == "sequence":
        return -logps.mean.sum() / totals.per_item() if totals is not None else -logps.mean.mean()
    denom = totals.per_token() if totals is not None else logps.count.sum().clamp(min=1.0)
    return -logps.sum.sum() / denom


def orpo_objective(chosen_logps: Tensor, rejected_logps: Tensor, nll_loss: Tensor, lam: float
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """L = nll_loss + lam * mean(-log sigmoid(log odds ratio)); mean log-probs in, loss and metrics out."""
    lor = log_odds_ratio(chosen_logps, rejected_logps)
    l_or = -F.logsigmoid(lor).mean()
    loss = _at_least_f32(nll_loss) + lam * l_or
    c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
    metrics = {
        "loss": loss.detach(),
        "nll": nll_loss.detach().float(),
        "l_or": l_or.detach(),
        "log_odds": lor.detach().mean(),
        "chosen_logp": c.mean(),
        "rejected_logp": r.mean(),
        "margin": (c - r).mean(),
        "pref_acc": (lor.detach() > 0).float().mean(),
    }
    return loss, metrics


def _use_fused(objective: ORPOLoss | SFTLoss, model: nn.Module, fused: bool | None, min_chunks: int) -> bool:
    """The fused head for a training forward of a verified plain head, unless the caller or ZeRO-3's uniform head
    calls (`min_chunks`) rule it out."""
    if not (objective.fused if fused is None else fused) or min_chunks > 0 or not torch.is_grad_enabled():
        return False
    verify_chunked_head(model, _probe_ids(model, next(model.parameters()).device))
    return fused_path_ok(model)


class ORPOLoss(nn.Module):
    """ORPO on a batch of pairs: rows [0, B) are chosen, rows [B, 2B) their rejected partners, one forward.

    `batch` holds `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens), all [2B, T],
    right- or left-padded. Returns (loss, metrics): the batch's mean loss, or with `totals` its share of the
    optimiser step's loss (sum over its pairs / totals.items; token-pooled NLL over totals.tokens). Metrics are
    always this batch's means.

    `fused` (default): when gradients are needed and the head is a plain linear layer, the loss and its gradients
    come from the fused head (`fused_sequence_loss`: each pair's logits computed once, nothing recomputed in
    backward); otherwise from the checkpointed chunked path. Same values and gradients either way.
    `packing`: run the backbone padding-free (`pack_batch`; see `verify_packing` for the models it suits).
    """

    def __init__(self, lam: float = 1.0, nll_scope: str = "completion", nll_reduction: str = "sequence",
                 chunk_size: int = 1024, naive: bool = False, fused: bool = True, packing: bool = False) -> None:
        super().__init__()
        self.lam, self.nll_scope, self.nll_reduction = lam, nll_scope, nll_reduction
        self.chunk_size, self.naive, self.fused, self.packing = chunk_size, naive, fused, packing

    @property
    def scopes(self) -> tuple[str, ...]:
        """The log-prob scopes one forward computes."""
        return ("completion",) if self.nll_scope == "completion" else ("completion", "all")

    def _term(self, counts: Tensor, b: int, totals: StepTotals | None):
        """The loss share of a group of pairs from its sums (chosen ids, then rejected ids): the fused path's term."""
        ni = self.scopes.index(self.nll_scope)
        d_item = totals.per_item() if totals is not None else float(b)
        d_tok = totals.per_token() if totals is not None else float(counts[ni, :b].sum().clamp(min=1.0))

        def term(seqs: list[int], sums: Tensor) -> Tensor:
            k = len(seqs) // 2
            cnt = counts[:, seqs].clamp(min=1.0)
            mean = sums[0] / cnt[0]
            l_or = -F.logsigmoid(log_odds_ratio(mean[:k], mean[k:])).sum() / d_item
            if self.nll_reduction == "sequence":
                nll_part = -(sums[ni, :k] / cnt[ni, :k]).sum() / d_item
            else:
                nll_part = -sums[ni, :k].sum() / d_tok
            return nll_part + self.lam * l_or

        return term

    def forward(self, model: nn.Module, batch: dict[str, Tensor], totals: StepTotals | None = None,
                min_chunks: int = 0, fused: bool | None = None, packing: bool | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        scopes = self.scopes
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        packing = self.packing if packing is None else packing
        b = ids.shape[0] // 2
        fused_loss = None
        if self.naive:
            lps = sequence_logps_naive(model, ids, am, cm, scopes)
        elif _use_fused(self, model, fused, min_chunks):
            counts = torch.stack([_target_mask(am, cm, s).sum(-1).float() for s in scopes])
            fused_loss, lps = fused_sequence_loss(model, ids, am, cm, scopes, [[j, j + b] for j in range(b)],
                                                  self._term(counts, b, totals), self.chunk_size, packing)
        else:
            lps = sequence_logps(model, ids, am, cm, scopes, self.chunk_size, min_chunks, packing)
        comp = lps["completion"]
        scored = lps[self.nll_scope]
        chosen_scored = SequenceLogps(scored.sum[:b], scored.count[:b])
        loss, metrics = orpo_objective(comp.mean[:b], comp.mean[b:], nll(chosen_scored, self.nll_reduction),
                                       self.lam)
        if fused_loss is not None:
            return fused_loss, metrics
        if totals is None:
            return loss, metrics
        l_or_sum = -F.logsigmoid(log_odds_ratio(comp.mean[:b], comp.mean[b:])).sum()
        share = nll(chosen_scored, self.nll_reduction, totals) + self.lam * l_or_sum / totals.per_item()
        return share, metrics


class SFTLoss(nn.Module):
    """NLL of the completions in `batch` (the SFT baselines), through the same chunked (or fused) log-prob path.

    Returns the batch's mean NLL, or with `totals` its share of the optimiser step's NLL; metrics are this
    batch's means. `fused` and `packing` as in `ORPOLoss`.
    """

    def __init__(self, nll_scope: str = "completion", nll_reduction: str = "sequence", chunk_size: int = 1024,
                 fused: bool = True, packing: bool = False) -> None:
        super().__init__()
        self.nll_scope, self.nll_reduction, self.chunk_size = nll_scope, nll_reduction, chunk_size
        self.fused, self.packing = fused, packing

    @property
    def scopes(self) -> tuple[str, ...]:
        """The log-prob scopes one forward computes."""
        return (self.nll_scope,)

    def _term(self, counts: Tensor, b: int, totals: StepTotals | None):
        d_item = totals.per_item() if totals is not None else float(b)
        d_tok = totals.per_token() if totals is not None else float(counts[0].sum().clamp(min=1.0))

        def term(seqs: list[int], sums: Tensor) -> Tensor:
            if self.nll_reduction == "sequence":
                return -(sums[0] / counts[0, seqs].clamp(min=1.0)).sum() / d_item
            return -sums[0].sum() / d_tok

        return term

    def forward(self, model: nn.Module, batch: dict[str, Tensor], totals: StepTotals | None = None,
                min_chunks: int = 0, fused: bool | None = None, packing: bool | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        packing = self.packing if packing is None else packing
        fused_loss = None
        if _use_fused(self, model, fused, min_chunks):
            counts = _target_mask(am, cm, self.nll_scope).sum(-1).float()[None]
            fused_loss, lps = fused_sequence_loss(model, ids, am, cm, self.scopes,
                                                  [[j] for j in range(ids.shape[0])],
                                                  self._term(counts, ids.shape[0], totals), self.chunk_size, packing)
            lps = lps[self.nll_scope]
        else:
            lps = sequence_logps(model, ids, am, cm, (self.nll_scope,), self.chunk_size, min_chunks,
                                 packing)[self.nll_scope]
        mean_loss = nll(lps, self.nll_reduction)
        metrics = {"loss": mean_loss.detach(), "nll": mean_loss.detach(), "chosen_logp": lps.mean.detach().mean()}
        if fused_loss is not None:
            return fused_loss, metrics
        return (mean_loss if totals is None else nll(lps, self.nll_reduction, totals)), metrics


# --------------------------------------------------------------------------------------------------------------
# The student and its objective as one module, for distributed wrappers
# --------------------------------------------------------------------------------------------------------------

def _probe_ids(model: nn.Module, device: torch.device) -> Tensor:
    """Fixed token ids for the one-time head check: the same on every rank, so every rank takes the same path."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    if vocab <= 0:  # a model without a config: ask the head (a full weight outside ZeRO-3)
        vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = (torch.arange(_CHECK_ROWS * _CHECK_TOKENS, device=device) * 7919 + 17) % vocab
    return ids.view(_CHECK_ROWS, _CHECK_TOKENS)


def objective_packing(student: ORPOStudent) -> bool:
    """Whether either objective of `student` was built with `packing=True`."""
    return bool(getattr(student.orpo, "packing", False) or getattr(student.sft, "packing", False))


class ORPOStudent(nn.Module):
    """A HF causal LM and its training objectives as one module: `forward(batch, totals)` -> (loss, metrics).

    Distributed wrappers only see what runs inside the forward of the module they wrap: DDP prepares its gradient
    reducer there, FSDP2 gathers the root's parameters (embeddings, final norm, LM head) there, ZeRO-3 gathers
    each submodule's there. The chunked head reaches the backbone and the head directly, so the loss has to run
    inside that forward: wrap THIS module (`DDP(ORPOStudent(model, ...))`, `fully_shard`,
    `accelerator.prepare`, `deepspeed.initialize(model=...)`) and call it with the batch. The values are those of
    `ORPOLoss` / `SFTLoss` called on the bare model: a pair batch (`batch["is_pair"]`) goes to `orpo`, an
    SFT-only batch to `sft`.

    `weight` multiplies the returned loss (0.0: a padding micro-batch that a rank with nothing left in this step
    runs only so that every rank makes the same forward/backward calls; drop its metrics).
    The one-time chunked-head check (`verify_chunked_head`) runs on the first call, inside the forward so that
    sharded weights are gathered, on fixed token ids, so every rank takes the same path.
    `uniform_chunks=True` (needed under DeepSpeed ZeRO-3, where every call of the head gathers its weight, so
    every rank must make the same number of calls): the ranks agree on the largest number of head chunks of this
    micro-batch (one small all-reduce) and the others add calls on zero rows. Values are unchanged.
    It also rules out the fused head (which reads the head's weight directly), whatever the objectives say.
    `packing=True` (`trainer.packing`): each batch's real tokens are packed into rows without pads before the
    backbone runs (`pack_batch`), once `verify_packing` has seen that the model reads packed rows correctly (else
    padded, with a warning); same log-probs, losses and gradients up to float rounding.
    The HF model stays reachable as `.model` (generation, export); under FSDP2 see `distributed.unsharded`.
    """

    def __init__(self, model: nn.Module, orpo: ORPOLoss | None = None, sft: SFTLoss | None = None,
                 uniform_chunks: bool = False, packing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.orpo = orpo if orpo is not None else ORPOLoss()
        self.sft = sft if sft is not None else SFTLoss(self.orpo.nll_scope, self.orpo.nll_reduction,
                                                       self.orpo.chunk_size, self.orpo.fused)
        self.uniform_chunks = uniform_chunks
        self.packing = packing
        # accelerate's FSDP auto-wrap reads the shard units' class names from the module it prepares
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def _chunks_over_ranks(self, objective: ORPOLoss | SFTLoss, batch: dict[str, Tensor]) -> int:
        """The largest number of head chunks of this micro-batch over the ranks (0 without a process group)."""
        import torch.distributed as dist

        if not (self.uniform_chunks and dist.is_available() and dist.is_initialized()):
            return 0
        n = scored_positions(batch["attention_mask"], batch["completion_mask"], objective.scopes)
        dev = batch["input_ids"].device if dist.get_backend() == "nccl" else torch.device("cpu")
        k = torch.tensor([-(-n // objective.chunk_size)], dtype=torch.int64, device=dev)
        dist.all_reduce(k, op=dist.ReduceOp.MAX)
        return int(k)

    def forward(self, batch: dict[str, Tensor] | None = None, totals: StepTotals | None = None,
                weight: float = 1.0, **tensors: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's loss (or its share of the step, with `totals`) and its metrics; `batch` may also come as
        keyword tensors (`module(**batch, totals=...)`)."""
        if batch is None:
            batch = tensors
        if chunked_head_ok(self.model) is None and not getattr(self.orpo, "naive", False):
            verify_chunked_head(self.model, _probe_ids(self.model, batch["input_ids"].device))
        packing = self.packing or objective_packing(self)
        if packing and not getattr(self.orpo, "naive", False):
            packing = verify_packing(self.model)
        objective = self.orpo if batch_is_pair(batch) else self.sft
        loss, metrics = objective(self.model, batch, totals, self._chunks_over_ranks(objective, batch),
                                  fused=False if self.uniform_chunks else None, packing=packing)
        if weight != 1.0:
            loss = loss * weight
        return loss, metrics
