"""The variants beyond the paper, trained end to end on the tiny task of test_train: orpo_mixed_prefix and
orpo_mixed_firsterr score the rejected traces on their own part only, orpo_adaptive sets phi from its probe."""

from __future__ import annotations

import pytest
from test_train import ArithTask, _train, make_questions, make_store, tiny_config

from orpo_distill.tasks.answers import first_arithmetic_error

pytestmark = pytest.mark.usefixtures("one_thread")


class LocatingArithTask(ArithTask):
    """ArithTask with the numeric kind's first-error locator (its wrong teacher traces write `3 + 4 = 9`)."""

    located: int = 0

    def first_error_offset(self, q, completion):
        off = first_arithmetic_error(completion)
        self.located += off is not None
        return off


@pytest.fixture
def run(tmp_path, tiny_llama_dir):
    task = LocatingArithTask()
    qs = make_questions(8)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "run", **{"trainer.epochs": 2})
    # every question's initial student negatives are wrong; q7's teacher fallback negatives are near-misses
    store = make_store(cfg, qs, task, student_all_right={"q7"})
    yield cfg, task, qs, store
    store.close()


def test_prefix_and_first_error_variants_train_and_score_their_own_part(run):
    cfg, task, qs, store = run
    base = _train(cfg, "orpo_mixed", task, qs, store, eval_questions=None)
    pre = _train(cfg, "orpo_mixed_prefix", task, qs, store, eval_questions=None)
    err = _train(cfg, "orpo_mixed_firsterr", task, qs, store, eval_questions=None)
    assert (base["rejected_scope"], pre["rejected_scope"], err["rejected_scope"]) == (
        "all", "after_prefix", "after_first_error")
    p0, b0, e0 = pre["per_epoch"][0]["pairs"], base["per_epoch"][0]["pairs"], err["per_epoch"][0]["pairs"]
    assert b0["rejected_scored_tokens"] == b0["rejected_tokens"] and b0["rejected_after_prefix"] == 0
    # the student's negatives "a b The answer is N." share "a" with the teacher's "a + b = ...": scored after it
    assert p0["rejected_after_prefix"] == p0["pairs"] == 24  # q7's teacher near-misses too: "a + b = " is shared
    assert p0["rejected_scored_tokens"] < p0["rejected_tokens"] == b0["rejected_tokens"]
    # q7's teacher negatives "a + b = c+1+i. ..." have a located wrong result, but their shared prefix with the
    # chosen trace already reaches it (max(prefix, error)); the student's negatives have no equation to check
    assert e0["rejected_after_error"] + e0["rejected_after_prefix"] == 24
    assert task.located == 1  # q7 has one wrong teacher trace (3 pairs): located once, cached across epochs
    assert e0["rejected_scored_tokens"] <= p0["rejected_scored_tokens"]
    for res in (base, pre, err):
        losses = [e["train_loss"] for e in res["per_epoch"]]
        assert losses[-1] < losses[0], losses
    # the same chosen side and NLL: the first step's NLL agrees, only the odds-ratio term differs
    assert pre["per_epoch"][0]["train_loss"] != base["per_epoch"][0]["train_loss"]


def test_adaptive_variant_records_its_signal_and_phi(run):
    cfg, task, qs, store = run
    res = _train(cfg, "orpo_adaptive", task, qs, store, eval_questions=None)
    pools = [e["pool"] for e in res["per_epoch"]]
    assert res["phi_schedule"] == "adaptive"
    assert all(0.0 < p["adaptive_signal"] < 1.0 for p in pools)
    assert pools[0]["phi"] == 0.0
    expected = max(0.0, min(1.0, 1 - pools[1]["adaptive_signal"] / pools[0]["adaptive_signal"]))
    assert pools[1]["phi"] == pytest.approx(expected)
    assert pools[1]["drawn_current"] == pools[1]["sampled_questions"]
