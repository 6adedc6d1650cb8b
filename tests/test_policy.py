"""The negative pool: phi draws and schedules, who gets sampled when, fallbacks, and the recorded make-up."""

from __future__ import annotations

import pytest

from orpo_distill.config import PolicyConfig
from orpo_distill.pairs import Text
from orpo_distill.policy import (
    NegativePolicy,
    draws_current,
    phi_for_epoch,
    restore_pools,
    source_epochs,
    student_source,
)


class FakeStore:
    """Wrong texts per (source, question); a sampler that records every call and writes 2 wrong traces per
    question, except for the questions the student already gets right."""

    def __init__(self, qids, *, initial_right=(), student_right=(), teacher_wrong=()):
        self.data: dict[tuple[str, str], list[Text]] = {}
        for q in qids:
            if q not in initial_right:
                self.data[("initial", q)] = [Text(f"init-{q}-{i}", f"wrong {i}", "initial") for i in range(2)]
            if q in teacher_wrong:
                self.data[("teacher", q)] = [Text(f"teach-{q}", "teacher wrong", "teacher")]
        self.student_right = set(student_right)
        self.calls: list[tuple[int, list[str]]] = []

    def load(self, source, qids):
        return {q: self.data[(source, q)] for q in qids if (source, q) in self.data}

    def sample(self, trained, qids):
        self.calls.append((trained, list(qids)))
        src = student_source(trained)
        for q in qids:
            if q not in self.student_right:
                self.data[(src, q)] = [Text(f"{src}-{q}-{i}", f"cur wrong {i}", src) for i in range(2)]


QIDS = [f"q{i:03d}" for i in range(60)]


def _policy(store, phi, **kw):
    return NegativePolicy(QIDS, load=store.load, sample=store.sample, phi_fn=lambda e: phi_for_epoch(
        PolicyConfig(), e, 5, phi), seed=7, **kw)


def test_phi0_never_samples_the_student_after_the_start():
    store = FakeStore(QIDS)
    pol = _policy(store, 0.0)
    for e in range(1, 6):
        pools, stats = pol.pool(e)
        assert all(t.source == "initial" for p in pools.values() for t in p.negatives)
        assert stats.from_initial == len(QIDS) and stats.sampled_questions == 0
        assert stats.mean_age == e - 1  # the initial student's traces age one epoch per epoch
        assert stats.share_current == (1.0 if e == 1 else 0.0)
    assert store.calls == []


def test_phi1_resamples_every_question_every_epoch():
    store = FakeStore(QIDS)
    pol = _policy(store, 1.0)
    pools, stats = pol.pool(1)
    assert stats.from_initial == len(QIDS) and store.calls == []  # epoch 1: the initial student is current
    for e in range(2, 6):
        pools, stats = pol.pool(e)
        assert store.calls[-1] == (e - 1, QIDS)
        assert all(t.source == f"epoch:{e - 1}" for p in pools.values() for t in p.negatives)
        assert stats.from_current == len(QIDS) and stats.share_current == 1.0 and stats.mean_age == 0
    assert [c[0] for c in store.calls] == [1, 2, 3, 4]


def test_phi_half_draws_about_half_and_records_every_source():
    qids = [f"x{i}" for i in range(400)]
    store = FakeStore(qids)
    pol = NegativePolicy(qids, load=store.load, sample=store.sample, phi_fn=lambda e: 0.5, seed=3)
    pol.pool(1)
    fractions = []
    for e in range(2, 5):
        pools, stats = pol.pool(e)
        sampled = set(store.calls[-1][1])
        fractions.append(len(sampled) / len(qids))
        for q, p in pools.items():
            want = f"epoch:{e - 1}" if q in sampled else "initial"
            assert p.drawn == ("current" if q in sampled else "initial")
            assert [t.source for t in p.negatives] == [want, want]
        assert stats.drawn_current == len(sampled) == stats.from_current
        assert stats.share_current == pytest.approx(len(sampled) / len(qids))
    assert all(0.42 < f < 0.58 for f in fractions), fractions
    # the draws differ between epochs, and each draw depends on (seed, epoch, question) only
    assert set(store.calls[0][1]) != set(store.calls[1][1])
    assert sorted(draws_current(list(reversed(qids)), 0.5, 3, 2)) == sorted(draws_current(qids, 0.5, 3, 2))
    assert draws_current(qids, 0.5, 4, 2) != draws_current(qids, 0.5, 3, 2)


def test_phi_schedules():
    cfg = PolicyConfig(phi=0.3)
    assert [phi_for_epoch(cfg, e, 5) for e in range(1, 6)] == [0.0, 0.3, 0.3, 0.3, 0.3]
    lin = PolicyConfig(schedule="linear", phi_start=0.0, phi_end=1.0)
    assert [phi_for_epoch(lin, e, 5) for e in range(1, 6)] == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0])
    assert phi_for_epoch(lin, 2, 2) == 0.5
    assert phi_for_epoch(lin, 3, 5, phi=1.0) == 1.0  # the on-policy baseline overrides the schedule
    assert (source_epochs("initial"), source_epochs("epoch:3"), source_epochs("teacher")) == (0, 3, None)


def test_fallbacks_other_source_then_teacher_then_sft_only():
    # q000: student always right now -> falls back to initial; q001: initial right, student wrong -> older epoch;
    # q002: right everywhere, teacher has a wrong trace -> teacher; q003: right everywhere -> none (SFT only)
    store = FakeStore(QIDS, initial_right={"q001", "q002", "q003"}, student_right={"q000", "q002", "q003"},
                      teacher_wrong={"q002"})
    pol = _policy(store, 1.0)
    pools, stats = pol.pool(1)
    assert pools["q001"].used == "none" and pools["q002"].used == "teacher" and pools["q003"].used == "none"
    assert stats.no_negatives == 2 and stats.fallback_teacher == 1
    pools, stats = pol.pool(2)
    assert (pools["q000"].drawn, pools["q000"].used) == ("current", "initial")
    assert pools["q001"].used == "current"
    assert [t.source for t in pools["q002"].negatives] == ["teacher"]
    assert pools["q003"].used == "none" and pools["q003"].negatives == []
    assert stats.fallback_other_source == 1 and stats.fallback_teacher == 1 and stats.no_negatives == 1
    # phi=0 afterwards: q001 (no initial negatives) reads the latest student traces of this run, samples nothing
    pol.phi_fn = lambda e: 0.0
    n_calls = len(store.calls)
    pools, stats = pol.pool(3)
    assert len(store.calls) == n_calls
    assert pools["q001"].used == "older" and [t.source for t in pools["q001"].negatives] == ["epoch:1"] * 2
    assert stats.from_older == 1 and stats.fallback_other_source == 1
    # without the teacher fallback, q002 trains SFT-only too
    pol2 = _policy(FakeStore(QIDS, initial_right={"q002"}, teacher_wrong={"q002"}), 0.0, teacher_fallback=False)
    pools, stats = pol2.pool(1)
    assert pools["q002"].used == "none" and stats.fallback_teacher == 0 and stats.no_negatives == 1


def test_teacher_negatives_baseline_and_pool_roundtrip():
    store = FakeStore(QIDS, teacher_wrong=set(QIDS[:10]))
    pol = NegativePolicy(QIDS, load=store.load, sample=store.sample, mode="teacher")
    for e in (1, 2, 3):
        pools, stats = pol.pool(e)
        assert stats.from_teacher == 10 and stats.no_negatives == 50 and stats.mean_age is None
    assert store.calls == []
    saved = {q: p.to_json() for q, p in pools.items()}
    texts = {t.key: t.text for p in pools.values() for t in p.negatives}
    back = restore_pools(saved, texts)
    assert {q: p.negatives for q, p in back.items()} == {q: p.negatives for q, p in pools.items()}
    with pytest.raises(ValueError, match="lacks"):
        restore_pools(saved, {})
    with pytest.raises(ValueError, match="mode"):
        NegativePolicy(QIDS, load=store.load, mode="both")


# ---------------------------------------------------------------- schedule: adaptive

def test_adaptive_phi_on_a_scripted_sequence_of_signals():
    from orpo_distill.policy import adaptive_phi

    start = 0.8
    signals = [0.8, 0.9, 0.6, 0.4, 0.2, 0.0]  # no movement, worse than at the start, then the negatives are beaten
    assert [round(adaptive_phi(s, start), 6) for s in signals] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert adaptive_phi(0.3, 0.0) == 1.0  # nothing pulled from the start: on-policy
    with pytest.raises(ValueError):
        adaptive_phi(float("nan"), 0.5)


def test_or_weight_is_the_odds_ratio_terms_pull():
    from orpo_distill.policy import log_odds, or_weight

    assert or_weight(-1.0, -1.0) == pytest.approx(0.5)
    assert or_weight(-0.1, -3.0) < 0.1 < 0.9 < or_weight(-3.0, -0.1)
    assert log_odds(0.0) > 20 and log_odds(-1e-30) > 20  # a confident student: finite, very large odds


class ScriptedScores:
    """The current student's mean log-probs as a script: per call of `measure`, chosen and rejected log-probs
    move apart by `gap[epoch]`."""

    def __init__(self):
        self.gap = 0.0
        self.calls = 0

    def __call__(self, qid, texts):
        self.calls += 1
        return [-1.0 + self.gap / 2, -1.0 - self.gap / 2]


def test_adaptive_policy_sets_phi_from_the_probe_and_samples_accordingly():
    from orpo_distill.policy import AdaptivePhi, make_adaptive, or_weight

    store = FakeStore(QIDS)
    chosen = {q: [Text(f"c-{q}", "right", "teacher")] for q in QIDS}
    scores = ScriptedScores()
    ad = AdaptivePhi(chosen, scores, seed=7, probe_size=16)
    pol = NegativePolicy(QIDS, load=store.load, sample=store.sample, phi_fn=lambda e: 1 / 0, seed=7, adaptive=ad)
    gaps = {1: 0.0, 2: 0.0, 3: 1.0, 4: 4.0}
    phis = {}
    for e, g in gaps.items():
        scores.gap = g
        _, stats = pol.pool(e)
        phis[e] = stats.phi
        assert stats.adaptive_signal == pytest.approx(or_weight(-1.0 + g / 2, -1.0 - g / 2))
    assert scores.calls == 16 * len(gaps)  # the probe: 16 pairs per epoch, the same pairs every time
    assert phis[1] == 0.0 and phis[2] == 0.0
    assert phis[3] == pytest.approx(1 - or_weight(-0.5, -1.5) / 0.5)
    assert 0 < phis[3] < phis[4] < 1
    assert len(store.calls[-1][1]) == len(draws_current(QIDS, phis[4], 7, 4))  # the draw used that phi
    assert make_adaptive(PolicyConfig(), schedule="adaptive", phi=0.0, chosen=chosen, score=scores, seed=0) is None
    assert make_adaptive(PolicyConfig(), schedule=None, phi=None, chosen=chosen, score=scores, seed=0) is None
    assert make_adaptive(PolicyConfig(schedule="adaptive"), schedule=None, phi=None, chosen=chosen, score=scores,
                         seed=0).probe_size == 64
    with pytest.raises(ValueError, match="adaptive"):
        phi_for_epoch(PolicyConfig(schedule="adaptive"), 2, 5)


def test_adaptive_start_signal_comes_back_from_the_history_on_resume():
    from orpo_distill.policy import AdaptivePhi

    chosen = {q: [Text(f"c-{q}", "right", "teacher")] for q in QIDS}
    scores = ScriptedScores()
    history = [{"epoch": 1, "pool": {"epoch": 1, "phi": 0.0, "adaptive_signal": 0.8}}]
    ad = AdaptivePhi(chosen, scores, history=lambda: history)  # a resumed run: no epoch 1 in this process
    assert ad.phi(3, 0.4) == pytest.approx(0.5)
    assert AdaptivePhi(chosen, scores).phi(3, 0.4) == 0.0  # no start signal: no evidence, no refresh
