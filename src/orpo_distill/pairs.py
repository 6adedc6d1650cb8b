"""Turn traces into training examples: pair chosen with rejected texts, tokenise them for the student, batch them.

The one job of this module is the step from *text* to *student tensors*. Teacher text crosses into the student
only as text: every prompt and completion is tokenised here with the student's tokenizer and the student's own
prompt format (`tasks.prompts.render_prompt` and `encode_prompt`, the very prompt tokens the student is sampled and
evaluated with), so no token ids ever cross models.

Pairing (docs/METHOD.md leaves it open; ours, `pairs.strategy`), for one question with P positives and N negatives:
- `cycle` (default): max(P, N) pairs; walk the longer list and cycle the shorter one, so every positive and every
  negative is used and no negative repeats before all have been used.
- `all`: all P x N pairs (a seeded random subset of `max_pairs_per_question` of them when that is set).
- `random`: a seeded random subset of the P x N pairs, of size `max_pairs_per_question` (default max(P, N)).
- `hardest`: negatives ranked by the current student's mean log-probability (highest first, computed with
  `loss.sequence_logps` under no_grad); positive i gets the i-th hardest negative, cycling when N < P.
`max_pairs_per_question` caps the pairs of every strategy, and only pairs: a question without negatives (every
question of the SFT variants, or an ORPO question whose negatives ran out) yields one SFT-only example per kept
chosen text (no rejected partner), all of them, trained with the NLL term alone.

Tokenisation (the boundary rules the tests pin down):
- prompt ids = `tasks.prompts.encode_prompt` of the rendered prompt, the samplers' own function: the tokenizer's
  leading special tokens (BOS) exactly once, never a trailing EOS a post-processor appends;
- completion ids = the completion text without special tokens, then exactly once the model's end of an answer,
  `tasks.prompts.completion_end_ids`: the chat template's end-of-turn token (`<|im_end|>`, `<end_of_turn>`, ...)
  for chat models, EOS for the plain template (a trailing end string in the text is removed first so it is never
  doubled).
Truncation (counted in `EncodeStats`): a prompt longer than `max_prompt_length` is cut from the LEFT, keeping a
leading BOS (the end of the prompt, with the question and the generation prompt, is what the completion follows);
then each completion is cut from the RIGHT to fit `max_length`. A cut completion has no end token, on purpose: teaching
the student to stop in the middle of a reasoning chain would be worse than not scoring the end.

Batches: pair batches are [2B, T] (chosen rows first, then their rejected rows, in the same order), SFT batches
[B, T], with an `is_pair` marker; right padding; `completion_mask` is 1 exactly on completion tokens (the end
token included). Pair and SFT-only
examples never share a batch. With `group_by_length`, examples are sorted by length inside shuffled mega-batches
(50 batches each) so a batch pads little, the batch order is shuffled, and the longest batch goes first (an
out-of-memory error shows at step 1, not hours in).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# encode_prompt is re-exported for callers of pairs.encode_prompt: the one prompt encoder lives in tasks.prompts
from .tasks.prompts import completion_end_ids, encode_prompt, render_prompt  # noqa: F401

STRATEGIES = ("cycle", "all", "random", "hardest")
MEGABATCH = 50  # batches per length-grouping window (as in transformers' LengthGroupedSampler)


# --------------------------------------------------------------------------------------------------------------
# Pairing: which positive goes with which negative (pure functions over indices)
# --------------------------------------------------------------------------------------------------------------

def pair_indices(n_pos: int, n_neg: int, strategy: str = "cycle", *, max_pairs: int | None = None,
                 rng: random.Random | None = None, neg_scores: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """(positive index, negative index) pairs for one question; [] when either side is empty.

    `rng` drives `random` (and `all` with a cap); `neg_scores` (the student's mean log-prob of each negative,
    higher = harder) is required by `hardest`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pairs.strategy: unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if n_pos <= 0 or n_neg <= 0:
        return []
    rng = rng or random.Random(0)
    if strategy == "cycle":
        out = [(k % n_pos, k % n_neg) for k in range(max(n_pos, n_neg))]
    elif strategy == "hardest":
        if neg_scores is None or len(neg_scores) != n_neg:
            raise ValueError("pairs.strategy=hardest needs one student log-prob score per negative")
        order = sorted(range(n_neg), key=lambda j: (-neg_scores[j], j))
        out = [(i, order[i % n_neg]) for i in range(n_pos)]
    else:
        every = [(i, j) for i in range(n_pos) for j in range(n_neg)]
        if strategy == "all":
            if max_pairs is None or max_pairs >= len(every):
                return every
            return sorted(rng.sample(every, max_pairs))
        size = min(len(every), max_pairs if max_pairs is not None else max(n_pos, n_neg))
        return sorted(rng.sample(every, size))
    return out[:max_pairs] if max_pairs is not None else out


def pair_rng(seed: int, epoch: int, question_id: str) -> random.Random:
    """The seeded RNG of one question's pairing in one epoch (independent of question order)."""
    return random.Random(f"pairs:{seed}:{epoch}:{question_id}")


@dataclass(frozen=True)
class Text:
    """A completion text with its provenance: the trace key (or `gold:<id>`) and where it came from."""

    key: str
    text: str
    source: str  # "teacher" | "gold" | "initial" | "epoch:E"


@dataclass(frozen=True)
class Example:
    """One training example: a chosen completion and, for ORPO, its rejected partner (None: SFT only)."""

    question_id: str
    chosen: Text
    rejected: Text | None = None


def make_examples(question_id: str, positives: Sequence[Text], negatives: Sequence[Text], strategy: str = "cycle",
                  *, max_pairs: int | None = None, rng: random.Random | None = None,
                  neg_scores: Sequence[float] | None = None) -> list[Example]:
    """The examples of one question: pairs (at most `max_pairs`) when it has negatives, else one SFT-only example
    per positive, all of them."""
    if not positives:
        return []
    if not negatives:  # NLL only: every kept trace (the cap is on pairs)
        return [Example(question_id, p) for p in positives]
    idx = pair_indices(len(positives), len(negatives), strategy, max_pairs=max_pairs, rng=rng, neg_scores=neg_scores)
    return [Example(question_id, positives[i], negatives[j]) for i, j in idx]


# --------------------------------------------------------------------------------------------------------------
# Tokenisation with the student's tokenizer
# --------------------------------------------------------------------------------------------------------------

def encode_completion(tokenizer, text: str, end_ids: Sequence[int] | None = None) -> list[int]:
    """Token ids of a completion: no special tokens, then exactly once `end_ids` (default: the end of an answer in
    the tokenizer's own format, `tasks.prompts.completion_end_ids`)."""
    end = list(end_ids) if end_ids is not None else completion_end_ids(tokenizer)
    tails = [t for t in {tokenizer.decode(end), tokenizer.eos_token} if t]
    while any(text.endswith(t) for t in tails):  # a sampler that kept the end string: do not double it
        text = text[: -len(next(t for t in tails if text.endswith(t)))]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + end


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_prompt_length >= max_length:
        raise ValueError(f"pairs.max_prompt_length ({max_prompt_length}) must be smaller than pairs.max_length "
                         f"({max_length}): otherwise a long prompt leaves no room for the completion")


def truncate_prompt(ids: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    """Cut from the left to `max_prompt_length` tokens, keeping a leading BOS."""
    if len(ids) <= max_prompt_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - (max_prompt_length - 1):]
    return ids[len(ids) - max_prompt_length:]


@dataclass
class Encoded:
    """A tokenised example. `rejected_ids` is None for SFT-only examples."""

    question_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    chosen_key: str
    rejected_key: str | None = None
    rejected_source: str | None = None
    truncated: bool = False

    @property
    def is_pair(self) -> bool:
        return self.rejected_ids is not None

    @property
    def length(self) -> int:
        """The padded row length this example needs."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids or []))

    @property
    def n_tokens(self) -> int:
        """Real tokens this example puts through the model (both rows of a pair)."""
        p = len(self.prompt_ids)
        return p + len(self.chosen_ids) + (p + len(self.rejected_ids) if self.rejected_ids is not None else 0)


@dataclass
class EncodeStats:
    """Counts of the truncation rule's cuts, for the epoch log."""

    examples: int = 0
    pairs: int = 0
    sft_only: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    max_length_seen: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Encoder:
    """Tokenises examples for the student, caching the prompt and completion ids of each text."""

    tokenizer: object
    template: str = "auto"
    system_prompt: str | None = None
    max_length: int = 1024
    max_prompt_length: int = 512
    _prompts: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _completions: dict[str, list[int]] = field(default_factory=dict, repr=False)
    end_ids: list[int] = field(default_factory=list, init=False)  # how this format ends an answer

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)
        self.end_ids = completion_end_ids(self.tokenizer, self.template, self.system_prompt)

    def prompt(self, question_id: str, user_message: str) -> tuple[list[int], bool]:
        """(ids, truncated) of the student's prompt for this user message."""
        if question_id not in self._prompts:
            text = render_prompt(self.tokenizer, user_message, self.template, self.system_prompt)
            self._prompts[question_id] = encode_prompt(self.tokenizer, text)
        ids = self._prompts[question_id]
        cut = truncate_prompt(ids, self.max_prompt_length, self.tokenizer.bos_token_id)
        return cut, len(cut) < len(ids)

    def completion(self, t: Text) -> list[int]:
        if t.key not in self._completions:
            self._completions[t.key] = encode_completion(self.tokenizer, t.text, self.end_ids)
        return self._completions[t.key]

    def encode(self, ex: Example, user_message: str, stats: EncodeStats | None = None) -> Encoded:
        prompt, p_cut = self.prompt(ex.question_id, user_message)
        room = self.max_length - len(prompt)
        chosen = self.completion(ex.chosen)
        rejected = self.completion(ex.rejected) if ex.rejected is not None else None
        c_cut = len(chosen) > room
        r_cut = rejected is not None and len(rejected) > room
        enc = Encoded(ex.question_id, prompt, chosen[:room], rejected[:room] if rejected is not None else None,
                      ex.chosen.key, ex.rejected.key if ex.rejected else None,
                      ex.rejected.source if ex.rejected else None, truncated=p_cut or c_cut or r_cut)
        if stats is not None:
            stats.examples += 1
            stats.pairs += enc.is_pair
            stats.sft_only += not enc.is_pair
            stats.prompt_truncated += p_cut
            stats.chosen_truncated += c_cut
            stats.rejected_truncated += r_cut
            stats.max_length_seen = max(stats.max_length_seen, enc.length)
        return enc


# --------------------------------------------------------------------------------------------------------------
# Collation: the loss.py batch format, right padding
# --------------------------------------------------------------------------------------------------------------

def _rows_to_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c, dtype=torch.long)
        att[r, :n] = 1
        comp[r, len(p):n] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """A batch: [2B, T] (chosen rows, then the rejected rows in the same order) for pairs, [B, T] for SFT-only.

    Besides the three [rows, T] tensors, `is_pair` (a 0-dim bool tensor, so every value still moves with
    `.to(device)`) says which kind the batch is, for `loss.step_totals`.
    """
    if not items:
        raise ValueError("collate: empty batch")
    kinds = {it.is_pair for it in items}
    if len(kinds) != 1:
        raise ValueError("collate: pair and SFT-only examples cannot share a batch")
    rows = [(it.prompt_ids, it.chosen_ids) for it in items]
    if items[0].is_pair:
        rows += [(it.prompt_ids, it.rejected_ids) for it in items]  # type: ignore[misc]
    return {**_rows_to_batch(rows, pad_id), "is_pair": torch.tensor(items[0].is_pair)}


def plan_batches(examples: Sequence[Encoded], batch_size: int, *, group_by_length: bool = True,
                 rng: random.Random | None = None) -> list[list[int]]:
    """Example indices per micro-batch for one epoch: pairs and SFT-only examples apart, shuffled, length-grouped."""
    rng = rng or random.Random(0)
    batches: list[list[int]] = []
    for want_pair in (True, False):
        idx = [i for i, e in enumerate(examples) if e.is_pair == want_pair]
        rng.shuffle(idx)
        if group_by_length:
            window = batch_size * MEGABATCH
            idx = [i for s in range(0, len(idx), window)
                   for i in sorted(idx[s:s + window], key=lambda i: -examples[i].length)]
        batches += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda b: max(examples[i].length for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def group_steps(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Micro-batches grouped into optimiser steps of `grad_accum` (the last step of an epoch may be shorter)."""
    return [batches[s:s + grad_accum] for s in range(0, len(batches), grad_accum)]


# --------------------------------------------------------------------------------------------------------------
# Hardest negatives: the student's mean log-prob of candidate completions
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def mean_logps(model, prompt_ids: list[int], completions: Sequence[list[int]], pad_id: int, *,
               batch_size: int = 8, chunk_size: int = 1024) -> list[float]:
    """Mean per-token log-prob of each completion after the prompt under `model` (no grad, model mode kept)."""
    from .loss import sequence_logps

    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(completions), batch_size):
        batch = _rows_to_batch([(prompt_ids, c) for c in completions[s:s + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        lp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            ("completion",), chunk_size)["completion"]
        out += [float(x) for x in lp.mean.cpu()]
    return out


def build_examples(questions: Sequence[tuple[str, str]], positives: dict[str, list[Text]],
                   negatives: dict[str, list[Text]], encoder: Encoder, *, strategy: str = "cycle",
                   max_pairs: int | None = None, seed: int = 0, epoch: int = 1,
                   scorer: Callable[[list[int], list[list[int]]], list[float]] | None = None
                   ) -> tuple[list[Encoded], EncodeStats]:
    """Pair and tokenise every question's texts for one epoch.

    `questions` is (question_id, user_message) in a fixed order; `scorer(prompt_ids, completion_ids)` gives the
    student's mean log-probs for the `hardest` strategy.
    """
    stats = EncodeStats()
    out: list[Encoded] = []
    for qid, message in questions:
        pos, neg = positives.get(qid, []), negatives.get(qid, [])
        scores = None
        if strategy == "hardest" and pos and neg:
            if scorer is None:
                raise ValueError("pairs.strategy=hardest needs a scorer (the current student)")
            prompt, _ = encoder.prompt(qid, message)
            room = encoder.max_length - len(prompt)
            scores = scorer(prompt, [encoder.completion(t)[:room] for t in neg])
        exs = make_examples(qid, pos, neg, strategy, max_pairs=max_pairs, rng=pair_rng(seed, epoch, qid),
                            neg_scores=scores)
        out += [encoder.encode(e, message, stats) for e in exs]
    return out, stats


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum) if n_batches else 0
