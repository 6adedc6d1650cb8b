"""The chunked log-prob path against each model's own forward: known LM-head transforms (Granite's
logits_scaling, Cohere's logit_scale, Gemma-2/3's final-logit soft-cap) and detection of an unknown one."""

from __future__ import annotations

import logging

import pytest
import torch

from orpo_distill.loss import (
    ORPOLoss,
    check_chunked_head,
    chunked_head_ok,
    head_transform,
    sequence_logps,
    sequence_logps_naive,
    verify_chunked_head,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.5)  # large weights: logits of order 10, so a skipped transform shows


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**COMMON, logits_scaling=8.0))


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**COMMON, logit_scale=0.25))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=3.0,
                                          attn_logit_softcapping=50.0, sliding_window=64))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=3.0,
                                              sliding_window=64))


def _batch(b: int = 4, t: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    cm = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        n = t - 2 * i
        am[i, n:] = 0
        ids[i, n:] = 0
        cm[i, 5:n] = 1
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


@pytest.mark.parametrize("build", [_granite, _cohere, _gemma2, _gemma3], ids=["granite", "cohere", "gemma2", "gemma3"])
def test_chunked_path_reproduces_the_models_own_log_probs(build):
    torch.manual_seed(0)
    model = build().float().eval()
    assert head_transform(model) != head_transform(torch.nn.Module())  # the transform is recognised
    batch = _batch()
    # the chunked path itself (before any fallback could hide a difference) matches the model's logits
    assert check_chunked_head(model, batch["input_ids"], batch["attention_mask"]) < 1e-5
    want = sequence_logps_naive(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                ("completion", "all"))
    got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                         ("completion", "all"), chunk_size=7)
    assert chunked_head_ok(model) is True  # verified once, and the chunked path is kept
    for s in ("completion", "all"):
        assert torch.allclose(got[s].sum, want[s].sum, rtol=1e-5, atol=1e-4), (s, got[s].sum, want[s].sum)
    # the skipped transform would have been visible: the head's raw output gives other log-probs
    head = model.get_output_embeddings()
    with torch.no_grad():
        h = model.get_decoder()(input_ids=batch["input_ids"][:1]).last_hidden_state
        raw = torch.log_softmax(head(h).float(), -1)
        own = torch.log_softmax(model(input_ids=batch["input_ids"][:1]).logits.float(), -1)
    assert (raw - own).abs().max() > 1e-2


class _ScaledLlama(torch.nn.Module):
    """A causal LM whose forward does something to the head's output that no config describes."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.inner = LlamaForCausalLM(LlamaConfig(**COMMON))
        self.config = self.inner.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 0.3 + 0.5
        return out


def test_unknown_head_transform_is_detected_and_falls_back(caplog):
    torch.manual_seed(0)
    model = _ScaledLlama().float().eval()
    batch = _batch()
    assert check_chunked_head(model, batch["input_ids"], batch["attention_mask"]) > 0.1
    with caplog.at_level(logging.WARNING, logger="orpo_distill.loss"):
        verify_chunked_head(model, batch)
    assert chunked_head_ok(model) is False
    assert "full-logits forward" in caplog.text and "memory" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orpo_distill.loss"):
        verify_chunked_head(model, batch)  # once per model
    assert caplog.text == ""
    # from now on the model's own forward is what scores it, gradients included
    loss_a, _ = ORPOLoss()(model, batch)
    loss_a.backward()
    g_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_b, _ = ORPOLoss(naive=True)(model, batch)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert all(torch.allclose(a, p.grad) for a, p in zip(g_a, model.parameters()))


def test_verification_runs_in_eval_mode_and_restores_modes():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, attention_dropout=0.5)).train()
    model.model.layers[0].eval()  # a submodule in another mode than its parent: kept as it was
    verify_chunked_head(model, _batch()["input_ids"])
    assert chunked_head_ok(model) is True  # dropout did not make the two forwards differ
    assert model.training and not model.model.layers[0].training


def test_adapter_on_the_lm_head_is_part_of_the_chunked_path():
    """The head is called as a module, so a LoRA adapter on it counts (its bare weight matrix would miss it)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**COMMON))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                      init_lora_weights=False)).eval()
    batch = _batch()
    assert check_chunked_head(model, batch["input_ids"], batch["attention_mask"]) < 1e-5
    got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])["completion"]
    want = sequence_logps_naive(model, batch["input_ids"], batch["attention_mask"],
                                batch["completion_mask"])["completion"]
    assert chunked_head_ok(model) is True
    assert torch.allclose(got.sum, want.sum, rtol=1e-5, atol=1e-4)
