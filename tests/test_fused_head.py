"""The fused head (loss.fused_sequence_loss): ORPO and SFT losses and their gradients equal to the naive
full-logits path and to the checkpointed chunked path, at vocabularies of 32k and 150k, in float32 and under bf16
autocast, through the known head transforms (Granite's logit scale, Gemma-2's soft-cap) and a biased head; a
head it cannot read directly (a LoRA adapter on it, ZeRO-3's uniform calls) goes through the chunked path; the
head's logits are computed once per group of pairs, never again in backward."""

from __future__ import annotations

import pytest
import torch

import orpo_distill.loss as L
from orpo_distill.loss import ORPOLoss, ORPOStudent, SFTLoss, StepTotals

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(vocab: int, hidden: int = 16, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _batch(vocab: int, pairs: int = 3, t: int = 18, seed: int = 0, is_pair: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs if is_pair else pairs
    ids = torch.randint(3, vocab, (rows, t), generator=g)
    am = torch.ones(rows, t, dtype=torch.long)
    cm = torch.zeros(rows, t, dtype=torch.long)
    for i in range(rows):  # chosen and rejected of different lengths, right-padded
        n = t - (3 * i) % 7
        am[i, n:] = 0
        ids[i, n:] = 0
        cm[i, 4 + i % 3:n] = 1
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm, "is_pair": torch.tensor(is_pair)}


def _run(model, objective, batch, totals=None, autocast=False, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss, metrics = objective(model, batch, totals, **kw)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _assert_close(a, b, rtol):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert torch.allclose(la, lb, rtol=rtol, atol=rtol), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for k in ga:  # against each gradient's own scale: summation orders differ between the paths
        scale = ga[k].abs().max()
        assert scale > 0, k
        assert (ga[k] - gb[k]).abs().max() <= rtol * scale, (k, float((ga[k] - gb[k]).abs().max() / scale))
    for k in ("chosen_logp", "rejected_logp", "l_or"):
        if k in ma:
            assert torch.allclose(ma[k], mb[k], rtol=rtol, atol=rtol), k


def _count_fused(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = L._FusedHeadLoss.forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(L._FusedHeadLoss, "forward", staticmethod(spy))
    return calls


@pytest.mark.parametrize("vocab", [32000, 150000], ids=["32k", "150k"])
def test_fused_equals_naive_and_chunked_fp32(vocab, monkeypatch):
    model = _llama(vocab)
    batch = _batch(vocab)
    calls = _count_fused(monkeypatch)
    naive = _run(model, ORPOLoss(naive=True), batch)
    chunked = _run(model, ORPOLoss(fused=False, chunk_size=7), batch)
    assert not calls
    for cs in (1024, 20, 7):  # all pairs in one group / one pair per group / a pair split into pieces
        fused = _run(model, ORPOLoss(chunk_size=cs), batch)
        _assert_close(naive, fused, 2e-5)
        _assert_close(chunked, fused, 2e-5)
    assert len(calls) == 3


@pytest.mark.parametrize("vocab", [32000, 150000], ids=["32k", "150k"])
def test_fused_equals_chunked_under_bf16_autocast(vocab):
    model = _llama(vocab)
    batch = _batch(vocab)
    chunked = _run(model, ORPOLoss(fused=False), batch, autocast=True)
    fused = _run(model, ORPOLoss(), batch, autocast=True)
    naive = _run(model, ORPOLoss(naive=True), batch, autocast=True)
    # the same bf16 matmuls: only float32 summation order and one bf16 rounding of d logits differ
    _assert_close(chunked, fused, 2e-2)
    _assert_close(naive, fused, 2e-2)


def test_fused_with_bf16_weights_gives_bf16_gradients():
    model = _llama(32000).to(torch.bfloat16)
    batch = _batch(32000)
    fused = _run(model, ORPOLoss(), batch)
    chunked = _run(model, ORPOLoss(fused=False), batch)
    assert all(g.dtype == torch.bfloat16 for g in fused[2].values())
    _assert_close(chunked, fused, 3e-2)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("scope", ["completion", "all"])
def test_step_shares_and_scopes_equal_the_chunked_path(reduction, scope):
    model = _llama(4000)
    batch = _batch(4000, pairs=4)
    totals = StepTotals(items=7, tokens=90, world=2)
    for tot in (None, totals):
        a = _run(model, ORPOLoss(lam=0.7, nll_scope=scope, nll_reduction=reduction, fused=False), batch, tot)
        b = _run(model, ORPOLoss(lam=0.7, nll_scope=scope, nll_reduction=reduction, chunk_size=30), batch, tot)
        _assert_close(a, b, 2e-5)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_sft_batches_equal_the_chunked_path(reduction, monkeypatch):
    model = _llama(32000)
    batch = _batch(32000, pairs=5, is_pair=False)
    calls = _count_fused(monkeypatch)
    for tot in (None, StepTotals(items=9, tokens=120)):
        a = _run(model, SFTLoss(nll_reduction=reduction, fused=False), batch, tot)
        b = _run(model, SFTLoss(nll_reduction=reduction, chunk_size=25), batch, tot)
        _assert_close(a, b, 2e-5)
    assert len(calls) == 2


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0,
                                            initializer_range=0.5))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          final_logit_softcapping=3.0, sliding_window=64, initializer_range=0.5))


@pytest.mark.parametrize("build", [_granite, _gemma2], ids=["granite_scale", "gemma2_softcap"])
def test_head_transforms_are_honoured(build, monkeypatch):
    model = build()
    batch = _batch(500)
    calls = _count_fused(monkeypatch)
    naive = _run(model, ORPOLoss(naive=True), batch)
    fused = _run(model, ORPOLoss(chunk_size=20), batch)
    assert calls and L.chunked_head_ok(model)
    _assert_close(naive, fused, 5e-5)


def test_biased_head_is_fused_and_its_bias_trained(monkeypatch):
    model = _llama(300, tie_word_embeddings=False)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(300) * 0.5)
    batch = _batch(300)
    calls = _count_fused(monkeypatch)
    naive = _run(model, ORPOLoss(naive=True), batch)
    fused = _run(model, ORPOLoss(), batch)
    assert calls and "lm_head.bias" in fused[2]
    _assert_close(naive, fused, 2e-5)


def test_lora_on_the_head_falls_back_and_lora_elsewhere_is_fused(monkeypatch):
    from peft import LoraConfig, get_peft_model

    batch = _batch(400)
    calls = _count_fused(monkeypatch)
    on_head = get_peft_model(_llama(400, tie_word_embeddings=False),
                             LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    a = _run(on_head, ORPOLoss(naive=True), batch)
    b = _run(on_head, ORPOLoss(), batch)
    assert not calls  # an adapter on the head: the module-calling chunked path
    _assert_close(a, b, 2e-5)
    elsewhere = get_peft_model(_llama(400), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    a = _run(elsewhere, ORPOLoss(naive=True), batch)
    b = _run(elsewhere, ORPOLoss(), batch)
    assert calls  # frozen plain head: fused, no head gradient formed
    assert all("lora" in k for k in b[2])
    _assert_close(a, b, 2e-5)


def test_student_module_fused_and_uniform_chunks_unfused(monkeypatch):
    model = _llama(2000)
    batch = _batch(2000)
    calls = _count_fused(monkeypatch)
    model.zero_grad()
    loss, _ = ORPOStudent(model)(batch)
    loss.backward()
    assert len(calls) == 1
    g_fused = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    loss2, _ = ORPOStudent(model, uniform_chunks=True)(batch)
    loss2.backward()
    assert len(calls) == 1  # ZeRO-3's uniform head calls need the module-calling path
    assert torch.allclose(loss, loss2, rtol=1e-6)
    assert (g_fused - model.model.embed_tokens.weight.grad).abs().max() <= 1e-5 * g_fused.abs().max()


def test_head_logits_are_computed_once_per_group(monkeypatch):
    model = _llama(1000)
    batch = _batch(1000, pairs=4)
    n = []
    real = L._fused_logits
    monkeypatch.setattr(L, "_fused_logits", lambda *a: n.append(1) or real(*a))
    rows = int(L._target_mask(batch["attention_mask"], batch["completion_mask"], "completion").sum())
    loss, _ = ORPOLoss(chunk_size=rows)(model, batch)  # every pair fits in one group
    loss.backward()
    assert len(n) == 1  # forward and gradient from the same logits; backward computes none
    n.clear()
    loss, _ = ORPOLoss(chunk_size=4)(model, batch)  # each pair split: scored in pieces, each recomputed once
    pieces = len(n) // 2
    loss.backward()
    assert len(n) == 2 * pieces and pieces >= 8


def test_no_grad_scoring_does_not_use_the_fused_path(monkeypatch):
    model = _llama(500)
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        ORPOLoss()(model, _batch(500))
    assert not calls


def test_fused_head_under_backbone_gradient_checkpointing():
    plain = _llama(3000)
    batch = _batch(3000)
    ref = _run(plain, ORPOLoss(fused=False), batch)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train()
    got = _run(plain, ORPOLoss(), batch)
    _assert_close(ref, got, 2e-5)
