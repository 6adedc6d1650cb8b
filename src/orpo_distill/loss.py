"""The ORPO objective and the completion log-probabilities it is built on.

Mental model: a causal LM scores a completion y after a prompt x by the mean log-probability of y's tokens,
log q(y|x) (length-normalised, <= 0). ORPO (Hong et al. 2024) adds to the usual NLL of the chosen completion a
term that pushes the *odds* q/(1-q) of the chosen completion above those of the rejected one:

    L = NLL(chosen) + lam * -log sigmoid( log odds(chosen) - log odds(rejected) ),
    log odds(y) = log q - log(1 - q) = l - log1mexp(l),  l = log q.

Everything that touches log-probabilities is done in float32 whatever the model's dtype, and log(1 - e^l) uses
the stable log1mexp, clamped just below 0 so that a confident model (l rounds to exactly 0) gives finite values
and gradients instead of the NaN of the naive `log1p(-exp(l))`.

Memory: the LM head is applied only to the positions that are scored, in chunks of `chunk_size` rows, each chunk
under activation checkpointing, so no float32 [batch, seq, vocab] tensor ever exists (peak memory grows with
`chunk_size x vocab`, not `batch x seq x vocab`). `sequence_logps_naive` is the plain full-logits path, kept as
the reference for tests and benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# l = log q is clamped to at most this, so that log1mexp(l) stays finite when a model is (or rounds to) certain.
# -1e-7 is about float32's resolution around 1: below it, q and 1 are indistinguishable anyway.
LOGP_MAX = -1e-7
_LN2 = math.log(2.0)


def _at_least_f32(x: Tensor) -> Tensor:
    """Half-precision inputs are upcast to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable everywhere (Maechler 2012), in float32 or wider.

    Uses log1p(-exp(x)) for x < -ln 2 and log(-expm1(x)) otherwise. Inputs are clamped to <= LOGP_MAX so the
    result is finite at x = 0; both `where` branches see safe inputs so no NaN leaks into the gradient.
    """
    x = _at_least_f32(x).clamp(max=LOGP_MAX)
    small = x < -_LN2
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, -1.0))))
    near = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, -0.1), x)))
    return torch.where(small, far, near)


def log_odds_ratio(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """log( odds(chosen) / odds(rejected) ) per example, from mean token log-probs (each <= 0), in float32 or wider.

    odds(y) = q / (1 - q) with log q the length-normalised log-probability. Positive when the chosen completion
    is the more likely one.
    """
    c = _at_least_f32(chosen_logps).clamp(max=LOGP_MAX)
    r = _at_least_f32(rejected_logps).clamp(max=LOGP_MAX)
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


def _lm_head_parts(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor | None, float | None]:
    """The decoder backbone, LM-head weight/bias and final-logit soft-cap of a HF causal LM (PEFT-wrapped or not)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return decoder, head.weight, getattr(head, "bias", None), softcap


def _chunk_token_logps(h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    logits = F.linear(h, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (normed) hidden states of the backbone, [B, T, H], with explicit position ids."""
    decoder, _, _, _ = _lm_head_parts(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   scopes: tuple[str, ...] = ("completion",), chunk_size: int = 1024) -> dict[str, SequenceLogps]:
    """Per-sequence log-prob sums/counts for each scope in `scopes` ("completion" and/or "all"), chunked.

    One backbone forward; only the scored positions go through the LM head, `chunk_size` rows at a time, each
    chunk checkpointed so its float32 logits are recomputed in backward instead of stored.
    """
    _, weight, bias, softcap = _lm_head_parts(model)
    h = hidden_states(model, input_ids, attention_mask)[:, :-1]
    masks = {s: _target_mask(attention_mask, completion_mask, s) for s in scopes}
    union = torch.zeros_like(next(iter(masks.values())))
    for m in masks.values():
        union |= m
    rows = h[union]  # [N, H]: only the positions some scope scores
    targets = input_ids[:, 1:][union]
    pieces = []
    for i in range(0, rows.shape[0], chunk_size):
        hc, tc = rows[i:i + chunk_size], targets[i:i + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(_chunk_token_logps, hc, tc, weight, bias, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(hc, tc, weight, bias, softcap))
    tok = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    seq_of = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(union)[union]
    out = {}
    for s, m in masks.items():
        keep = m[union].float()
        sums = torch.zeros(input_ids.shape[0], device=tok.device, dtype=torch.float32).index_add(0, seq_of, tok * keep)
        out[s] = SequenceLogps(sums, m.sum(-1).float())
    return out


def sequence_logps_naive(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                         scopes: tuple[str, ...] = ("completion",)) -> dict[str, SequenceLogps]:
    """Reference path: full logits, float32 log-softmax over [B, T, V]. Same results as `sequence_logps`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = {}
    for s in scopes:
        m = _target_mask(attention_mask, completion_mask, s).float()
        out[s] = SequenceLogps((lp * m).sum(-1), m.sum(-1))
    return out


def nll(logps: SequenceLogps, reduction: str = "sequence") -> Tensor:
    """Negative log-likelihood: mean of per-sequence means (`sequence`) or pooled over all tokens (`token`)."""
    if reduction == "sequence":
        return -logps.mean.mean()
    return -logps.sum.sum() / logps.count.sum().clamp(min=1.0)


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


class ORPOLoss(nn.Module):
    """ORPO on a batch of pairs: rows [0, B) are chosen, rows [B, 2B) their rejected partners, one forward.

    `batch` holds `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens), all [2B, T],
    right- or left-padded. Returns (loss, metrics).
    """

    def __init__(self, lam: float = 1.0, nll_scope: str = "completion", nll_reduction: str = "sequence",
                 chunk_size: int = 1024, naive: bool = False) -> None:
        super().__init__()
        self.lam, self.nll_scope, self.nll_reduction = lam, nll_scope, nll_reduction
        self.chunk_size, self.naive = chunk_size, naive

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scopes = ("completion",) if self.nll_scope == "completion" else ("completion", "all")
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        if self.naive:
            lps = sequence_logps_naive(model, ids, am, cm, scopes)
        else:
            lps = sequence_logps(model, ids, am, cm, scopes, self.chunk_size)
        b = ids.shape[0] // 2
        comp = lps["completion"]
        scored = lps[self.nll_scope]
        chosen_scored = SequenceLogps(scored.sum[:b], scored.count[:b])
        nll_loss = nll(chosen_scored, self.nll_reduction)
        return orpo_objective(comp.mean[:b], comp.mean[b:], nll_loss, self.lam)


class SFTLoss(nn.Module):
    """NLL of the completions in `batch` (the SFT baselines), through the same chunked log-prob path."""

    def __init__(self, nll_scope: str = "completion", nll_reduction: str = "sequence", chunk_size: int = 1024) -> None:
        super().__init__()
        self.nll_scope, self.nll_reduction, self.chunk_size = nll_scope, nll_reduction, chunk_size

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        lps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                             (self.nll_scope,), self.chunk_size)[self.nll_scope]
        loss = nll(lps, self.nll_reduction)
        return loss, {"loss": loss.detach(), "nll": loss.detach(), "chosen_logp": lps.mean.detach().mean()}
