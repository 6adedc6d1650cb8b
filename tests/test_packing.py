"""Padding-free batches (loss.pack_batch, `packing=True`): the real tokens of a padded batch packed into rows with
position ids restarting per sequence give the padded path's log-probs, ORPO/SFT losses and gradients for a
Llama-style (rotary) and a GPT-2-style (absolute positions) model, right- or left-padded; a model that does not
read packed rows from the position ids is caught by the one-time check and trained padded."""

from __future__ import annotations

import logging

import pytest
import torch

from orpo_distill.loss import ORPOLoss, ORPOStudent, SFTLoss, pack_batch, sequence_logps, verify_packing

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 300
LENGTHS = [24, 10, 17, 5, 22, 13]  # chosen rows 0-2, rejected rows 3-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # dropout off: packed and padded rows draw different dropout masks
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2))


def _batch(left: bool = False, is_pair: bool = True, lengths=LENGTHS, t: int = 26) -> dict:
    g = torch.Generator().manual_seed(3)
    rows = len(lengths)
    ids = torch.randint(3, VOCAB, (rows, t), generator=g)
    am = torch.zeros(rows, t, dtype=torch.long)
    cm = torch.zeros(rows, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(t - n, t) if left else slice(0, n)
        am[i, sl] = 1
        cm[i, sl] = 1
        cm[i, sl.start:sl.start + 3] = 0  # a 3-token prompt
        ids[i][~am[i].bool()] = 0
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm, "is_pair": torch.tensor(is_pair)}


def test_pack_batch_places_every_real_token_once_in_rows_no_longer_than_the_longest():
    b = _batch()
    plan = pack_batch(b["input_ids"], b["attention_mask"])
    assert plan.input_ids.shape[1] <= max(LENGTHS)
    assert plan.input_ids.shape[0] < len(LENGTHS)  # fewer rows: the short sequences share rows
    real = b["attention_mask"].bool()
    idx = plan.index[real]
    assert idx.unique().numel() == idx.numel() == sum(LENGTHS)
    assert torch.equal(plan.input_ids.flatten()[idx], b["input_ids"][real])
    assert bool((plan.index[~real] == -1).all())
    # positions restart at 0 at every sequence start, and follow each sequence's own order
    pos = plan.position_ids.flatten()
    for i, n in enumerate(LENGTHS):
        assert pos[plan.index[i][real[i]]].tolist() == list(range(n))


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_packed_logps_equal_padded(build, left):
    model = build().eval()
    b = _batch(left)
    args = (b["input_ids"], b["attention_mask"], b["completion_mask"], ("completion", "all"))
    padded = sequence_logps(model, *args)
    packed = sequence_logps(model, *args, packing=True)
    for s in ("completion", "all"):
        assert torch.allclose(padded[s].sum, packed[s].sum, rtol=1e-5, atol=1e-5), s
        assert torch.equal(padded[s].count, packed[s].count)


def _loss_and_grads(model, objective, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_packed_orpo_and_sft_losses_and_gradients_equal_padded(build, fused):
    model = build().train()
    for objective, batch in ((ORPOLoss(fused=fused), _batch()),
                             (ORPOLoss(fused=fused, nll_scope="all", nll_reduction="token"), _batch()),
                             (SFTLoss(fused=fused), _batch(is_pair=False))):
        la, ga = _loss_and_grads(model, objective, batch, packing=False)
        lb, gb = _loss_and_grads(model, objective, batch, packing=True)
        assert torch.allclose(la, lb, rtol=1e-5), (la, lb)
        assert ga.keys() == gb.keys() and ga
        for k in ga:
            assert (ga[k] - gb[k]).abs().max() <= 1e-4 * ga[k].abs().max().clamp(min=1e-12), k


def test_left_padded_all_tokens_scope_stays_exact():
    """The first real token of a left-padded row is scored (scope all) from the pad before it: a packed row has
    no such position, so that batch runs padded and the values stay those of the padded path."""
    model = _llama().eval()
    b = _batch(left=True)
    obj = ORPOLoss(nll_scope="all")
    la, _ = obj(model, b, packing=False)
    lb, _ = obj(model, b, packing=True)
    assert torch.allclose(la, lb, rtol=1e-6)


def test_student_packs_after_the_check_and_a_model_that_ignores_packing_trains_padded(monkeypatch, caplog):
    model = _llama().train()
    b = _batch()
    ref, _ = ORPOStudent(model)(b)
    assert verify_packing(model) is True
    got, _ = ORPOStudent(model, packing=True)(b)
    assert torch.allclose(ref, got, rtol=1e-5)

    # a model whose masking does not read packed sequences from the position ids: caught, logged, padded
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    other = _llama().train()
    with caplog.at_level(logging.WARNING, logger="orpo_distill.loss"):
        got2, _ = ORPOStudent(other, packing=True)(b)
    assert verify_packing(other) is False
    assert "padding-free" in caplog.text
    assert torch.allclose(ref, got2, rtol=1e-5)
