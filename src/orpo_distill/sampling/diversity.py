"""The diversity filter: drop near-duplicate teacher traces by ROUGE-L F1 against already kept traces.

ORPO-Distill keeps a teacher trace only if its ROUGE-L overlap with every trace already kept for the same question
is at most a threshold (0.8). Tokenisation matches the `rouge-score` package's default (lower-case, runs of
[a-z0-9]; no stemming), so scores equal `rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure`.
The longest common subsequence uses a bit-parallel algorithm (one big-integer operation per token of the second
text) because the plain dynamic programme is quadratic in pure Python and too slow for K=8 traces of 500 tokens
over thousands of questions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation without stemming."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, Hyyro 2004)."""
    if len(a) < len(b):
        a, b = b, a  # the bit vector spans the longer text; loop over the shorter one
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_f1_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric)."""
    return rouge_l_f1_tokens(rouge_tokens(a), rouge_tokens(b))


def diversity_keep(texts: Sequence[str], threshold: float, already_kept: Sequence[str] = ()) -> list[bool]:
    """Greedy filter in the given order: text i is kept unless its ROUGE-L F1 with `already_kept` or with an
    earlier kept text of `texts` exceeds `threshold`. Deterministic for a fixed order."""
    kept_tokens = [rouge_tokens(t) for t in already_kept]
    out = []
    for t in texts:
        toks = rouge_tokens(t)
        keep = all(rouge_l_f1_tokens(toks, k) <= threshold for k in kept_tokens)
        out.append(keep)
        if keep:
            kept_tokens.append(toks)
    return out
