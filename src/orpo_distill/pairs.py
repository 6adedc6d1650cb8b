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

Rejected scope (`objective.rejected_scope`, ours, beyond the paper; docs/METHOD.md "Beyond the paper"): which
tokens of a rejected completion its mean log-prob (the odds-ratio term's log q(y_rejected|x)) averages over.
- `all` (the paper, default): every completion token.
- `after_prefix`: the tokens after the longest common token prefix (in the student's tokenization, end token
  included) that the rejected completion shares with ANY chosen completion of its question (the encoder's
  `chosen_texts`, else the pair's own chosen). A trace equal to a chosen one up to its last token is scored on
  that last token; one that differs from its first token is scored on all of them.
- `after_first_error`: from the first wrong step the task locates (`first_error_offset`: a character offset,
  mapped to the token that holds it with the fast tokenizer's offsets, else by re-tokenising the text before it),
  but never inside the common prefix with a chosen trace: the start is max(prefix, first error), so the penalty
  never falls on tokens a correct trace of the question also writes (an "error" inside that prefix is one a
  correct trace shares: a lucky slip, or a locator's false alarm). No located error: as `after_prefix`.
- An empty scope (the rejected completion is a prefix of, or equal to, a chosen one; or truncation cut every
  token after the start) falls back to the whole completion, counted as `rejected_scope_fallback`.
The scope only zeroes the rejected row's `completion_mask` before its start (`Encoded.rejected_start`); the
chosen rows, the NLL term and the tokens put through the model are unchanged, so `loss.py` needs no change (its
rejected log-prob is the mean over `completion_mask`, and its NLL reads the chosen rows only).

Batches: pair batches are [2B, T] (chosen rows first, then their rejected rows, in the same order), SFT batches
[B, T], with an `is_pair` marker; right padding; `completion_mask` is 1 exactly on completion tokens (the end
token included; on a rejected row, from its `rejected_start` on). Pair and SFT-only examples never share a
batch. With `group_by_length`, examples are sorted by length inside shuffled mega-batches
(50 batches each) so a batch pads little, the batch order is shuffled, and the longest batch goes first (an
out-of-memory error shows at step 1, not hours in).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# encode_prompt is re-exported for callers of pairs.encode_prompt: the one prompt encoder lives in tasks.prompts
from .tasks.prompts import completion_end_ids, encode_prompt, render_prompt  # noqa: F401

STRATEGIES = ("cycle", "all", "random", "hardest")
REJECTED_SCOPES = ("all", "after_prefix", "after_first_error")
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

def strip_end(tokenizer, text: str, end_ids: Sequence[int]) -> str:
    """`text` without a trailing end string (a sampler that kept it), so the end is never doubled."""
    tails = [t for t in {tokenizer.decode(list(end_ids)), tokenizer.eos_token} if t]
    while any(text.endswith(t) for t in tails):
        text = text[: -len(next(t for t in tails if text.endswith(t)))]
    return text


def encode_completion(tokenizer, text: str, end_ids: Sequence[int] | None = None) -> list[int]:
    """Token ids of a completion: no special tokens, then exactly once `end_ids` (default: the end of an answer in
    the tokenizer's own format, `tasks.prompts.completion_end_ids`)."""
    end = list(end_ids) if end_ids is not None else completion_end_ids(tokenizer)
    return list(tokenizer(strip_end(tokenizer, text, end), add_special_tokens=False)["input_ids"]) + end


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_at_char(tokenizer, text: str, offset: int) -> int:
    """The index, in `tokenizer(text, add_special_tokens=False)`, of the token that holds character `offset` (the
    first token ending after it); the token count when `offset` is at or past the end of `text`.

    Fast tokenizers: their offset mapping. Others: the number of leading tokens that `text[:offset]` tokenises to
    as well (a token cut by the offset tokenises differently, so it is the first one not shared)."""
    if offset <= 0:
        return 0
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > offset and end > start:
                return i
        return len(enc["input_ids"])
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if offset >= len(text):
        return len(full)
    return common_prefix(full, tokenizer(text[:offset], add_special_tokens=False)["input_ids"])


def prefix_start(rejected_ids: Sequence[int], chosen_ids: Sequence[Sequence[int]]) -> int:
    """Where `after_prefix` scoring starts: the longest common prefix with any of the chosen completions."""
    return max((common_prefix(rejected_ids, c) for c in chosen_ids), default=0)


def scope_start(rejected_ids: Sequence[int], chosen_ids: Sequence[Sequence[int]], scope: str,
                error_token: int | None = None) -> tuple[int, str]:
    """(first scored token of the rejected completion, how it was decided) for `objective.rejected_scope`.

    `how` is "all" (scope all, or nothing shared and no error after it), "prefix", "error" (a located first
    error after the common prefix) or "fallback" (an empty scope: the whole completion)."""
    if scope not in REJECTED_SCOPES:
        raise ValueError(f"objective.rejected_scope: unknown scope {scope!r}; allowed: {', '.join(REJECTED_SCOPES)}")
    if scope == "all":
        return 0, "all"
    start = prefix_start(rejected_ids, chosen_ids)
    how = "prefix" if start else "all"
    if scope == "after_first_error" and error_token is not None and error_token > start:
        start, how = error_token, "error"
    if start >= len(rejected_ids):
        return 0, "fallback"
    return start, how


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
    rejected_start: int = 0  # first scored token of the rejected completion (objective.rejected_scope)

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
    # objective.rejected_scope: pairs scored after a shared prefix / from a located first error / on the whole
    # completion because the scope was empty; rejected completion tokens in all, and those scored
    rejected_after_prefix: int = 0
    rejected_after_error: int = 0
    rejected_scope_fallback: int = 0
    rejected_tokens: int = 0
    rejected_scored_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Encoder:
    """Tokenises examples for the student, caching the prompt and completion ids of each text.

    `rejected_scope` with `chosen_texts` (every chosen text of each question; None: the pair's own chosen only)
    and `first_error` ((question id, completion) -> character offset of its first wrong step, or None) decide
    `Encoded.rejected_start` (see the module docstring)."""

    tokenizer: object
    template: str = "auto"
    system_prompt: str | None = None
    max_length: int = 1024
    max_prompt_length: int = 512
    rejected_scope: str = "all"
    chosen_texts: Mapping[str, Sequence[Text]] | None = None
    first_error: Callable[[str, str], int | None] | None = None
    _prompts: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _completions: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _starts: dict[tuple[str, str, str], tuple[int, str]] = field(default_factory=dict, repr=False)
    end_ids: list[int] = field(default_factory=list, init=False)  # how this format ends an answer

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)
        if self.rejected_scope not in REJECTED_SCOPES:
            raise ValueError(f"objective.rejected_scope: unknown scope {self.rejected_scope!r}; allowed: "
                             f"{', '.join(REJECTED_SCOPES)}")
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

    def rejected_scope_start(self, ex: Example) -> tuple[int, str]:
        """(first scored token, how) of the pair's rejected completion before truncation (`scope_start`)."""
        assert ex.rejected is not None
        key = (ex.question_id, ex.rejected.key, ex.chosen.key if self.chosen_texts is None else "")
        if key not in self._starts:
            chosen = list((self.chosen_texts or {}).get(ex.question_id) or []) or [ex.chosen]
            error_token = None
            if self.rejected_scope == "after_first_error" and self.first_error is not None:
                text = strip_end(self.tokenizer, ex.rejected.text, self.end_ids)
                off = self.first_error(ex.question_id, text)
                if off is not None:
                    error_token = token_at_char(self.tokenizer, text, off)
            self._starts[key] = scope_start(self.completion(ex.rejected), [self.completion(c) for c in chosen],
                                            self.rejected_scope, error_token)
        return self._starts[key]

    def encode(self, ex: Example, user_message: str, stats: EncodeStats | None = None) -> Encoded:
        prompt, p_cut = self.prompt(ex.question_id, user_message)
        room = self.max_length - len(prompt)
        chosen = self.completion(ex.chosen)
        rejected = self.completion(ex.rejected) if ex.rejected is not None else None
        c_cut = len(chosen) > room
        r_cut = rejected is not None and len(rejected) > room
        start, how = 0, "all"
        if rejected is not None and self.rejected_scope != "all":
            start, how = self.rejected_scope_start(ex)
            if start >= min(room, len(rejected)):  # truncation left nothing after the start: the whole trace
                start, how = 0, "fallback"
        enc = Encoded(ex.question_id, prompt, chosen[:room], rejected[:room] if rejected is not None else None,
                      ex.chosen.key, ex.rejected.key if ex.rejected else None,
                      ex.rejected.source if ex.rejected else None, truncated=p_cut or c_cut or r_cut,
                      rejected_start=start)
        if stats is not None and enc.rejected_ids is not None:
            stats.rejected_after_prefix += how == "prefix"
            stats.rejected_after_error += how == "error"
            stats.rejected_scope_fallback += how == "fallback"
            stats.rejected_tokens += len(enc.rejected_ids)
            stats.rejected_scored_tokens += len(enc.rejected_ids) - start
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

def _rows_to_batch(rows: list[tuple[list[int], list[int]]], pad_id: int,
                   starts: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Right-padded rows; `starts[r]` completion tokens of row r are left out of its `completion_mask`."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c, dtype=torch.long)
        att[r, :n] = 1
        comp[r, len(p) + (starts[r] if starts is not None else 0):n] = 1
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
    starts = [0] * len(items)
    if items[0].is_pair:
        rows += [(it.prompt_ids, it.rejected_ids) for it in items]  # type: ignore[misc]
        starts += [it.rejected_start for it in items]  # objective.rejected_scope: the rejected rows' scored part
    return {**_rows_to_batch(rows, pad_id, starts), "is_pair": torch.tensor(items[0].is_pair)}


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


def text_scorer(encoder: Encoder, messages: Mapping[str, str], scorer: Callable[[list[int], list[list[int]]], list[float]]
                ) -> Callable[[str, Sequence[Text]], list[float]]:
    """`score(question_id, texts)`: the mean log-probs of texts as the trainer sees them (the student's prompt and
    completion ids, cut to `max_length`), from `scorer(prompt_ids, completion_ids)` (the current student)."""

    def score(question_id: str, texts: Sequence[Text]) -> list[float]:
        prompt, _ = encoder.prompt(question_id, messages[question_id])
        room = encoder.max_length - len(prompt)
        return scorer(prompt, [encoder.completion(t)[:room] for t in texts])

    return score


def error_locator(task: object, questions: Mapping[str, object]) -> Callable[[str, str], int | None]:
    """`first_error(question_id, completion)` for the encoder: the task's `first_error_offset` (None when the
    task has none, `tasks.base.first_error_offset`)."""
    from .tasks.base import first_error_offset

    return lambda question_id, text: first_error_offset(task, questions[question_id], text)  # type: ignore[arg-type]


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum) if n_batches else 0
