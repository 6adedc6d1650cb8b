"""objective.rejected_scope: where a rejected trace's scored part starts (hand-made token sequences, the char ->
token mapping of two tokenizer styles, the encoder), and that the loss then averages over that part only."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from orpo_distill.loss import ORPOLoss, sequence_logps_naive
from orpo_distill.pairs import (
    Encoded,
    Encoder,
    EncodeStats,
    Example,
    Text,
    _rows_to_batch,
    build_examples,
    collate,
    prefix_start,
    scope_start,
    token_at_char,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CHOSEN = "Start with 12. 12 + 7 = 19. 19 * 2 = 38. The answer is 38."
NEAR_MISS = "Start with 12. 12 + 7 = 18. 18 * 2 = 36. The answer is 36."
REWORDED = "At first there are 12 pens. Then 12 + 7 = 18 pens. 18 * 2 = 36. The answer is 36."


# ---------------------------------------------------------------- the rule on hand-made token sequences

def test_identical_up_to_the_last_token_is_scored_on_the_last_token_only():
    assert scope_start([1, 2, 3, 4, 9], [[1, 2, 3, 4, 5]], "after_prefix") == (4, "prefix")


def test_diverging_at_the_first_token_is_scored_on_every_token():
    assert scope_start([7, 2, 3, 4], [[1, 2, 3, 4]], "after_prefix") == (0, "all")
    assert scope_start([7, 2, 3, 4], [[1, 2, 3, 4]], "after_first_error", error_token=None) == (0, "all")


def test_empty_scope_falls_back_to_the_whole_trace():
    # a strict prefix of a chosen trace, and an equal one: nothing of their own to penalise
    assert scope_start([1, 2, 3], [[1, 2, 3, 4]], "after_prefix") == (0, "fallback")
    assert scope_start([1, 2, 3], [[1, 2, 3]], "after_prefix") == (0, "fallback")
    assert scope_start([1, 2, 3], [[1, 2, 3]], "after_first_error", error_token=1) == (0, "fallback")


def test_the_longest_prefix_over_all_chosen_traces_counts():
    chosen = [[1, 9, 9], [1, 2, 3, 8], [5]]
    assert prefix_start([1, 2, 3, 4, 5], chosen) == 3
    assert scope_start([1, 2, 3, 4, 5], chosen, "after_prefix") == (3, "prefix")


def test_first_error_after_the_prefix_moves_the_start_and_one_inside_it_does_not():
    rej, chosen = [1, 2, 3, 4, 5, 6, 7], [[1, 2, 0]]
    assert scope_start(rej, chosen, "after_first_error", error_token=5) == (5, "error")
    # an "error" inside the prefix a correct trace also writes: start = max(prefix, error) = the prefix
    assert scope_start(rej, [[1, 2, 3, 4, 0]], "after_first_error", error_token=1) == (4, "prefix")
    # no error located: as after_prefix
    assert scope_start(rej, chosen, "after_first_error", error_token=None) == (2, "prefix")


def test_scope_all_is_the_paper_and_unknown_scopes_are_refused():
    assert scope_start([1, 2, 3], [[1, 2, 3, 4]], "all") == (0, "all")
    with pytest.raises(ValueError, match="rejected_scope"):
        scope_start([1], [[1]], "after_everything")


# ---------------------------------------------------------------- batches and the loss

def _pair(prompt, chosen, rejected, start) -> Encoded:
    return Encoded("q", prompt, chosen, rejected, "c", "r", "initial", rejected_start=start)


def test_collate_zeroes_only_the_rejected_rows_mask_before_the_start():
    items = [_pair([5, 6], [1, 2, 3], [1, 2, 9, 9], 2), _pair([5], [4, 4], [4, 7], 0)]
    b = collate(items, pad_id=0)
    cm = b["completion_mask"].tolist()
    assert cm[0] == [0, 0, 1, 1, 1, 0]  # chosen rows untouched
    assert cm[1] == [0, 1, 1, 0, 0, 0]
    assert cm[2] == [0, 0, 0, 0, 1, 1]  # rejected: prompt 2 + 2 shared tokens left out
    assert cm[3] == [0, 1, 1, 0, 0, 0]  # start 0: the whole completion
    assert b["attention_mask"].tolist()[2] == [1, 1, 1, 1, 1, 1]  # every token still goes through the model


def test_scope_all_builds_exactly_the_batch_of_before():
    items = [_pair([5, 6], [1, 2, 3], [1, 2, 9, 9], 0), _pair([5], [4, 4], [4, 7], 0)]
    rows = [(i.prompt_ids, i.chosen_ids) for i in items] + [(i.prompt_ids, i.rejected_ids) for i in items]
    old = _rows_to_batch(rows, 0)
    new = collate(items, 0)
    for k in old:
        assert torch.equal(old[k], new[k])


def test_loss_averages_the_rejected_log_prob_over_the_scope_only(unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, seed=1)
    items = [_pair([1, 5, 6], [7, 8, 9, 2], [7, 8, 10, 11, 2], 2)]
    full = collate([_pair([1, 5, 6], [7, 8, 9, 2], [7, 8, 10, 11, 2], 0)], 0)
    scoped = collate(items, 0)
    with torch.no_grad():
        per_tok = torch.log_softmax(model(input_ids=full["input_ids"]).logits.float(), -1)
        ids = full["input_ids"][1]
        lp = [float(per_tok[1, t - 1, ids[t]]) for t in range(3, 8)]  # the rejected completion's 5 tokens
        got_full = sequence_logps_naive(model, full["input_ids"], full["attention_mask"], full["completion_mask"])
        got = sequence_logps_naive(model, scoped["input_ids"], scoped["attention_mask"], scoped["completion_mask"])
        assert float(got_full["completion"].mean[1]) == pytest.approx(sum(lp) / 5, abs=1e-5)
        assert float(got["completion"].mean[1]) == pytest.approx(sum(lp[2:]) / 3, abs=1e-5)
        # the chosen row and hence the NLL term are the same; only the odds-ratio term moves
        assert float(got["completion"].mean[0]) == float(got_full["completion"].mean[0])
        loss = ORPOLoss(lam=0.0)
        assert float(loss(model, {**scoped, "is_pair": torch.tensor(True)})[0]) == pytest.approx(
            float(loss(model, {**full, "is_pair": torch.tensor(True)})[0]), abs=1e-6)


# ---------------------------------------------------------------- characters -> tokens, the encoder

class _Slow:
    """A tokenizer without offset mappings (the fallback path of `token_at_char`)."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


@pytest.mark.parametrize("which", ["bpe_tokenizer", "unigram_tokenizer"])
def test_char_offsets_map_to_the_token_that_holds_them(which, request):
    tok = request.getfixturevalue(which)
    text = NEAR_MISS
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for needle in ("18", "36", "The answer"):
        off = text.index(needle)
        i = token_at_char(tok, text, off)
        assert tok.decode(ids[:i]).strip() == text[:off].strip() or needle[0] in tok.decode(ids[i:i + 1])
        assert tok.decode(ids[i:]).lstrip().startswith(needle[0])
        assert token_at_char(_Slow(tok), text, off) == i  # both paths agree on these boundaries
    assert token_at_char(tok, text, 0) == 0
    assert token_at_char(tok, text, len(text)) == len(ids)


@pytest.mark.parametrize("which", ["bpe_tokenizer", "unigram_tokenizer"])
def test_encoder_scores_a_near_miss_after_its_shared_prefix(which, request):
    tok = request.getfixturevalue(which)
    enc = Encoder(tok, template="plain", rejected_scope="after_prefix")
    ex = Example("q", Text("c", CHOSEN, "teacher"), Text("r", NEAR_MISS, "initial"))
    e = enc.encode(ex, "Ann has 12 pens.")
    assert 0 < e.rejected_start < len(e.rejected_ids)
    assert e.rejected_ids[: e.rejected_start] == e.chosen_ids[: e.rejected_start]
    assert e.rejected_ids[e.rejected_start] != e.chosen_ids[e.rejected_start]
    assert "18" in tok.decode(e.rejected_ids[e.rejected_start:e.rejected_start + 2]) \
        or tok.decode(e.rejected_ids[e.rejected_start:]).lstrip().startswith(("1", "8"))
    # the default is the paper's: the whole completion
    assert Encoder(tok, template="plain").encode(ex, "Ann has 12 pens.").rejected_start == 0


def test_first_error_skips_a_differently_worded_but_correct_start(bpe_tokenizer):
    tok = bpe_tokenizer
    ex = Example("q", Text("c", CHOSEN, "teacher"), Text("r", REWORDED, "initial"))
    enc_prefix = Encoder(tok, template="plain", rejected_scope="after_prefix")
    assert enc_prefix.encode(ex, "m").rejected_start == 0  # differs from the first token: all scored
    calls = []

    def locate(qid, text):
        calls.append((qid, text))
        return text.index("18")

    enc = Encoder(tok, template="plain", rejected_scope="after_first_error", first_error=locate)
    stats = EncodeStats()
    e = enc.encode(ex, "m", stats)
    assert calls == [("q", REWORDED)]
    assert tok.decode(e.rejected_ids[e.rejected_start:]).lstrip().startswith("18")
    assert stats.rejected_after_error == 1 and stats.rejected_after_prefix == 0
    assert stats.rejected_scored_tokens == len(e.rejected_ids) - e.rejected_start
    # a task without a locator: as after_prefix
    assert Encoder(tok, template="plain", rejected_scope="after_first_error").encode(ex, "m").rejected_start == 0


def test_prefix_counts_any_chosen_trace_of_the_question(bpe_tokenizer):
    tok = bpe_tokenizer
    other = "At first there are 12 pens. Then 12 + 7 = 19 pens. 19 * 2 = 38. The answer is 38."
    chosen = {"q": [Text("c1", CHOSEN, "teacher"), Text("c2", other, "teacher")]}
    enc = Encoder(tok, template="plain", rejected_scope="after_prefix", chosen_texts=chosen)
    e = enc.encode(Example("q", chosen["q"][0], Text("r", REWORDED, "initial")), "m")
    # paired with c1 (nothing shared) but c2 shares "At first ... 12 + 7 = 1": scored after that
    assert e.rejected_start > 5
    assert tok.decode(e.rejected_ids[: e.rejected_start]) in other


def test_truncation_that_leaves_nothing_after_the_start_falls_back(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt_len = len(Encoder(tok, template="plain").prompt("q", "m")[0])
    ex = Example("q", Text("c", CHOSEN, "teacher"), Text("r", NEAR_MISS, "initial"))
    start = Encoder(tok, template="plain", rejected_scope="after_prefix").encode(ex, "m").rejected_start
    enc = Encoder(tok, template="plain", rejected_scope="after_prefix", max_length=prompt_len + start,
                  max_prompt_length=prompt_len)
    stats = EncodeStats()
    e = enc.encode(ex, "m", stats)
    assert len(e.rejected_ids) == start and e.rejected_start == 0 and stats.rejected_scope_fallback == 1


def test_build_examples_and_unknown_scope(bpe_tokenizer):
    with pytest.raises(ValueError, match="rejected_scope"):
        Encoder(bpe_tokenizer, template="plain", rejected_scope="nope")
    enc = Encoder(bpe_tokenizer, template="plain", rejected_scope="after_prefix")
    exs, stats = build_examples([("q", "m")], {"q": [Text("c", CHOSEN, "teacher")]},
                                {"q": [Text("r", NEAR_MISS, "initial"), Text("r2", REWORDED, "initial")]}, enc)
    assert [e.rejected_start > 0 for e in exs] == [True, False]
    assert stats.rejected_after_prefix == 1 and stats.rejected_tokens > stats.rejected_scored_tokens
