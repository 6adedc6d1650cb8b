"""Gradient accumulation: the micro-batches of one optimiser step, each backpropagating its share of the step's
loss (`loss.step_totals`), give the gradient of the whole step as one batch, also for a ragged last step."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_llama

from orpo_distill.loss import ORPOLoss, SFTLoss, StepTotals, step_totals
from orpo_distill.pairs import Encoded, collate


def _items(n: int, pairs: bool, vocab: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for i in range(n):  # ragged prompts and completions, so token pooling and padding both matter
        p = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 6))]
        c = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 9))]
        r = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 9))] if pairs else None
        out.append(Encoded(f"q{i}", p, c, r, f"c{i}", f"r{i}" if pairs else None))
    return out


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def model(unigram_tokenizer):
    return tiny_llama(unigram_tokenizer, hidden=16, layers=1)


@pytest.mark.parametrize("kind", ["orpo", "sft"])
@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("sizes", [(2, 2, 2, 2), (2, 2, 2, 1)], ids=["8=4x2", "7=2+2+2+1"])
def test_accumulated_gradient_equals_one_big_batch(model, unigram_tokenizer, kind, reduction, sizes):
    vocab, pad = len(unigram_tokenizer), unigram_tokenizer.pad_token_id
    scope = "all" if reduction == "token" else "completion"  # both scopes are exercised
    loss_fn = (ORPOLoss(lam=1.0, nll_scope=scope, nll_reduction=reduction, chunk_size=5) if kind == "orpo"
               else SFTLoss(nll_scope=scope, nll_reduction=reduction, chunk_size=5))
    items = _items(sum(sizes), kind == "orpo", vocab)

    model.zero_grad()
    whole = collate(items, pad)
    big, _ = loss_fn(model, whole)
    big.backward()
    want = _grads(model).clone()

    model.zero_grad()
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    micro = [collate(items[s:s + n], pad) for s, n in zip(starts, sizes)]
    totals = step_totals(micro, scope)
    assert totals == step_totals([whole], scope)
    assert totals.items == len(items)
    shares = 0.0
    for b in micro:
        share, metrics = loss_fn(model, b, totals)
        share.backward()
        shares += share.item()
        assert metrics["loss"].item() == pytest.approx(loss_fn(model, b)[0].item(), rel=1e-6)  # per-batch mean
    got = _grads(model)
    assert shares == pytest.approx(big.item(), rel=1e-5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert want.abs().max() > 0

    if sizes[-1] != sizes[0]:  # what equal weighting of micro-batches (loss / len(micro)) would have given
        model.zero_grad()
        for b in micro:
            (loss_fn(model, b)[0] / len(micro)).backward()
        assert (_grads(model) - want).abs().max() > 1e-3 * want.abs().max()


def test_step_totals_counts_pairs_once_and_only_nll_tokens(unigram_tokenizer):
    pad = unigram_tokenizer.pad_token_id
    pairs = _items(3, True, 50, seed=1)
    sft = _items(2, False, 50, seed=2)
    t = step_totals([collate(pairs, pad), collate(sft, pad)], "completion")
    # completion targets: every completion token is predicted from the position before it
    want_tokens = sum(len(e.chosen_ids) for e in pairs) + sum(len(e.chosen_ids) for e in sft)
    assert t == StepTotals(items=5, tokens=want_tokens)
    t_all = step_totals([collate(pairs, pad)], "all")
    assert t_all.tokens == sum(len(e.prompt_ids) + len(e.chosen_ids) - 1 for e in pairs)  # rejected rows excluded
    with pytest.raises(ValueError, match="pairs.collate"):
        step_totals([{k: v for k, v in collate(sft, pad).items() if k != "is_pair"}], "completion")


def test_collated_batches_move_to_a_device_value_by_value(unigram_tokenizer):
    b = collate(_items(2, True, 50), unigram_tokenizer.pad_token_id)
    moved = {k: v.to("cpu") for k, v in b.items()}  # what the trainer does with every batch
    assert all(isinstance(v, torch.Tensor) for v in moved.values())
    assert bool(moved["is_pair"]) and not bool(collate(_items(2, False, 50), 0)["is_pair"])


def test_a_step_mixing_pair_and_sft_batches_weighs_every_example_once(model, unigram_tokenizer):
    """An ORPO step may hold SFT-only micro-batches (questions without negatives): each example counts once."""
    vocab, pad = len(unigram_tokenizer), unigram_tokenizer.pad_token_id
    orpo, sft = ORPOLoss(lam=0.5), SFTLoss()
    pb, sb = collate(_items(3, True, vocab, seed=3), pad), collate(_items(2, False, vocab, seed=4), pad)
    totals = step_totals([pb, sb], "completion")
    assert totals.items == 5
    with torch.no_grad():
        shares = orpo(model, pb, totals)[0] + sft(model, sb, totals)[0]
        want = (3 * orpo(model, pb)[0] + 2 * sft(model, sb)[0]) / 5
    assert shares.item() == pytest.approx(want.item(), rel=1e-6)
