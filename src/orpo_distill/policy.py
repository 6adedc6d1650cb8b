"""The negative pool: where each epoch's rejected traces come from (off-, on- and mixed-policy ORPO-Distill).

The one job of this module is to decide, before each training epoch, which rejected texts every question gets,
and to record why. Rules (docs/METHOD.md; the choices marked "ours" there):
- Epoch 1 trains on the initial student's wrong traces (source "initial", sampled once and cached in the store).
- Before epoch e > 1 the current student is the student after epoch e-1. For every question independently a
  seeded draw (a function of seed, epoch and question id only, so it does not depend on question order) picks
  the current student with probability phi(e), else the initial pool. Only the questions drawn are re-sampled
  (source "epoch:{e-1}"); phi = 0 never samples the student after the start, phi = 1 re-samples every question.
- phi(e) is `policy.phi` (constant) or, with `schedule: linear`, goes from `phi_start` at the first refresh
  (epoch 2) to `phi_end` at the last (epoch E); with a single refresh it is their mean.
- `schedule: adaptive` (ours, beyond the paper; `AdaptivePhi`): phi(e) follows how far the student has moved
  away from the initial student's negatives. A fixed probe of (chosen, initial negative) pairs is scored by the
  current student before every epoch; g is the probe's mean odds-ratio gradient weight
  sigmoid(-(log odds(chosen) - log odds(rejected))), the share of its pull the ORPO term still puts on those
  negatives (near 1: the student still prefers its own mistakes; near 0: they are beaten). phi(e) =
  clip(1 - g(e-1) / g(0), 0, 1) (`adaptive_phi`): the share of the off-policy negatives' initial signal that is
  used up is the share of questions that draw fresh negatives from the current student.
- Fallbacks, per question, each counted: no wrong trace from the drawn source -> the other source (for a question
  drawn "initial" that is the most recent student traces this run already has in the store, never a new sample,
  so phi = 0 stays free of student sampling) -> the teacher's own wrong traces (`teacher_negatives_fallback`)
  -> no negatives: the question trains with the NLL term only.
- The `orpo_teacher_neg` baseline draws the teacher's wrong traces for every question (no student fallback).
Every negative keeps its trace key and source; `PoolStats` is the per-epoch make-up that train.py logs: share
from the current student, mean age in epochs (the initial student's traces are e-1 epochs old before epoch e),
how many questions fell back where, and how many have no negatives.

The policy reads and samples only through two callables the trainer supplies (`load` and `sample`), so it has
no model or store code of its own and its tests can count every sampling call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import PolicyConfig
from .errors import UserError
from .pairs import Text

INITIAL = "initial"
TEACHER = "teacher"


def student_source(epochs_trained: int) -> str:
    """The store `source` of the student after `epochs_trained` epochs (0 = the untouched initial student)."""
    return INITIAL if epochs_trained == 0 else f"epoch:{epochs_trained}"


def source_epochs(source: str) -> int | None:
    """Epochs of training behind a student source ("initial" -> 0, "epoch:3" -> 3); None for the teacher."""
    if source == INITIAL:
        return 0
    if source.startswith("epoch:"):
        return int(source.split(":", 1)[1])
    return None


def phi_for_epoch(cfg: PolicyConfig, epoch: int, epochs: int, phi: float | None = None) -> float:
    """The probability that a question's negatives come from the current student before `epoch` (1-based).

    `phi` overrides the config's constant (the orpo_off/orpo_on baselines). Epoch 1 has no refresh: 0.
    `schedule: adaptive` is not a function of the epoch alone: `AdaptivePhi` (ValueError here).
    """
    if epoch <= 1:
        return 0.0
    if phi is not None:
        return float(phi)
    if cfg.schedule == "constant":
        return float(cfg.phi)
    if cfg.schedule == "adaptive":
        raise ValueError("policy.schedule=adaptive: phi comes from the student's scores (policy.AdaptivePhi)")
    refreshes = epochs - 1  # epochs 2..E
    if refreshes <= 1:
        return (cfg.phi_start + cfg.phi_end) / 2.0
    t = (epoch - 2) / (refreshes - 1)
    return cfg.phi_start + t * (cfg.phi_end - cfg.phi_start)


def log_odds(logp: float) -> float:
    """log(q / (1 - q)) of a mean token log-prob `logp` <= 0 (loss.py's log1mexp, in float64)."""
    lp = min(float(logp), -1e-12)
    return lp - (math.log(-math.expm1(lp)) if lp > -math.log(2) else math.log1p(-math.exp(lp)))


def or_weight(chosen_logp: float, rejected_logp: float) -> float:
    """The odds-ratio term's gradient weight on one pair, sigmoid(-(log odds(chosen) - log odds(rejected))):
    ~1 while the student prefers the rejected completion, ~0 once the chosen one clearly wins."""
    z = log_odds(chosen_logp) - log_odds(rejected_logp)
    return 1.0 / (1.0 + math.exp(z)) if z > -700 else 1.0


def adaptive_phi(signal: float, start: float) -> float:
    """`schedule: adaptive`: phi = clip(1 - signal / start, 0, 1), with `signal` the probe's mean odds-ratio weight
    now and `start` before epoch 1 (both in [0, 1]). 0 while the initial negatives pull as hard as at the start,
    1 when they no longer pull at all (or pulled nothing from the start)."""
    if not (math.isfinite(signal) and math.isfinite(start)):
        raise ValueError(f"adaptive phi: non-finite signal {signal!r} or start {start!r}")
    if start <= 0.0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - signal / start))


@dataclass
class AdaptivePhi:
    """phi per epoch from the probe signal (`adaptive_phi`), for `NegativePolicy(adaptive=...)`.

    `chosen` holds each question's chosen texts; `score(question_id, texts)` their mean token log-probs under
    the current student. The probe: up to `probe_size` questions (a seeded draw, independent of question order)
    that have chosen texts and initial negatives, each with its first chosen text and first initial negative.
    The start signal is measured before epoch 1; a resumed run reads it back from `history()` (the trainer's
    per-epoch records, whose "pool" holds the epoch's `PoolStats`)."""

    chosen: Mapping[str, Sequence[Text]]
    score: Callable[[str, Sequence[Text]], list[float]]
    seed: int = 0
    probe_size: int = 64
    history: Callable[[], Sequence[Mapping[str, Any]]] | None = None
    start: float | None = None

    def probe(self, initial: Mapping[str, Sequence[Text]]) -> list[tuple[str, Text, Text]]:
        qids = sorted(q for q in initial if initial[q] and self.chosen.get(q))
        qids.sort(key=lambda q: random.Random(f"probe:{self.seed}:{q}").random())
        return [(q, self.chosen[q][0], initial[q][0]) for q in sorted(qids[: self.probe_size])]

    def measure(self, initial: Mapping[str, Sequence[Text]]) -> float | None:
        """The probe's mean odds-ratio weight under the current student (None: no probe pair)."""
        pairs = self.probe(initial)
        if not pairs:
            return None
        weights = [or_weight(*self.score(q, [c, r])) for q, c, r in pairs]
        return sum(weights) / len(weights)

    def _start(self) -> float | None:
        if self.start is None and self.history is not None:
            for rec in self.history():
                pool = rec.get("pool") or {}
                if pool.get("epoch") == 1 and pool.get("adaptive_signal") is not None:
                    self.start = float(pool["adaptive_signal"])
        return self.start

    def phi(self, epoch: int, signal: float | None) -> float:
        """phi before `epoch` given the signal measured now; epoch 1 records the start and returns 0."""
        if epoch <= 1:
            if self.start is None:
                self.start = signal
            return 0.0
        start = self._start()
        if signal is None or start is None:  # no probe (no question has both sides): no evidence of movement
            return 0.0
        return adaptive_phi(signal, start)


def make_adaptive(cfg: PolicyConfig, *, schedule: str | None, phi: float | None,
                  chosen: Mapping[str, Sequence[Text]], score: Callable[[str, Sequence[Text]], list[float]],
                  seed: int, history: Callable[[], Sequence[Mapping[str, Any]]] | None = None) -> AdaptivePhi | None:
    """The `AdaptivePhi` of a student-negatives variant whose schedule (the variant's own, else `cfg.schedule`) is
    adaptive; None for a fixed phi (orpo_off, orpo_on) or another schedule."""
    if phi is not None or (schedule or cfg.schedule) != "adaptive":
        return None
    return AdaptivePhi(chosen, score, seed=seed, probe_size=cfg.adaptive_probe, history=history)


def draws_current(question_ids: Sequence[str], phi: float, seed: int, epoch: int) -> list[str]:
    """The questions whose negatives come from the current student this epoch (one seeded draw per question)."""
    if phi <= 0:
        return []
    return [q for q in question_ids if random.Random(f"phi:{seed}:{epoch}:{q}").random() < phi]


@dataclass
class QuestionPool:
    """One question's negatives for one epoch, and how they were chosen."""

    question_id: str
    drawn: str  # "current" | "initial" | "teacher"
    used: str  # "current" | "initial" | "older" (an earlier epoch's student) | "teacher" | "none"
    negatives: list[Text] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"question_id": self.question_id, "drawn": self.drawn, "used": self.used,
                "negatives": [[t.key, t.source] for t in self.negatives]}


@dataclass
class PoolStats:
    """The make-up of one epoch's negative pool (logged per epoch, kept in result.json)."""

    epoch: int
    phi: float
    questions: int = 0  # questions that have chosen texts (the ones that could get pairs)
    drawn_current: int = 0
    sampled_questions: int = 0  # questions the student was sampled for before this epoch
    from_current: int = 0
    from_initial: int = 0
    from_older: int = 0
    from_teacher: int = 0
    fallback_other_source: int = 0  # drawn one student source, got the other
    fallback_teacher: int = 0  # no student negatives at all, used the teacher's wrong traces
    no_negatives: int = 0  # SFT-only this epoch
    negatives: int = 0
    share_current: float = 0.0  # of all negatives, the share written by the student being trained now
    mean_age: float | None = None  # mean age in epochs of the student negatives
    adaptive_signal: float | None = None  # schedule adaptive: the probe's mean odds-ratio weight before the epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# (source, question ids) -> {question id: wrong texts of that source}
LoadFn = Callable[[str, Sequence[str]], dict[str, list[Text]]]
# (epochs trained, question ids) -> None: sample the current student for these questions into the store
SampleFn = Callable[[int, Sequence[str]], Any]


class NegativePolicy:
    """Builds each epoch's negative pool for one variant and seed.

    `mode="student"` is the ORPO-Distill policy (phi from `phi_fn(epoch)`, or from `adaptive` when given),
    `mode="teacher"` the teacher-negatives baseline. `load(source, qids)` returns the stored wrong texts of a
    student source (this run's revision for "epoch:E") or, with source "teacher", the teacher's wrong traces;
    `sample(epochs_trained, qids)` samples the current student into the store.
    """

    def __init__(self, question_ids: Sequence[str], *, load: LoadFn, sample: SampleFn | None = None,
                 mode: str = "student", phi_fn: Callable[[int], float] = lambda e: 0.0, seed: int = 0,
                 teacher_fallback: bool = True, adaptive: AdaptivePhi | None = None) -> None:
        if mode not in ("student", "teacher"):
            raise ValueError(f"negative policy mode must be 'student' or 'teacher', got {mode!r}")
        self.question_ids = list(question_ids)
        self.load, self.sample, self.mode = load, sample, mode
        self.phi_fn, self.seed, self.teacher_fallback = phi_fn, seed, teacher_fallback
        self.adaptive = adaptive
        self._initial: dict[str, list[Text]] | None = None
        self._teacher: dict[str, list[Text]] | None = None

    def initial(self) -> dict[str, list[Text]]:
        if self._initial is None:
            self._initial = self.load(INITIAL, self.question_ids)
        return self._initial

    def teacher(self) -> dict[str, list[Text]]:
        if self._teacher is None:
            self._teacher = self.load(TEACHER, self.question_ids)
        return self._teacher

    def pool(self, epoch: int) -> tuple[dict[str, QuestionPool], PoolStats]:
        """The negatives of every question for `epoch` (1-based), sampling the current student where drawn."""
        qids = self.question_ids
        cur_src = student_source(epoch - 1)
        signal = None
        if self.mode == "student" and self.adaptive is not None:
            signal = self.adaptive.measure(self.initial())
            phi = self.adaptive.phi(epoch, signal)
        else:
            phi = self.phi_fn(epoch) if self.mode == "student" else 0.0
        stats = PoolStats(epoch=epoch, phi=phi, questions=len(qids), adaptive_signal=signal)
        pools: dict[str, QuestionPool] = {}
        if self.mode == "teacher":
            teacher = self.teacher()
            for q in qids:
                negs = teacher.get(q, [])
                pools[q] = QuestionPool(q, "teacher", "teacher" if negs else "none", list(negs))
            return pools, _finish(stats, pools, cur_src, epoch)

        drawn = draws_current(qids, phi, self.seed, epoch) if epoch > 1 else []
        stats.drawn_current = len(drawn)
        current: dict[str, list[Text]] = {}
        if drawn:
            if self.sample is None:
                raise RuntimeError("this policy needs the current student's traces but has no sampler")
            self.sample(epoch - 1, drawn)
            stats.sampled_questions = len(drawn)
            current = self.load(cur_src, drawn)
        initial = self.initial()
        drawn_set = set(drawn)
        # Questions drawn "initial" with no initial negatives fall back to the latest student traces this run
        # already has (read, never sampled), newest first.
        need_older = [q for q in qids if q not in drawn_set and not initial.get(q)]
        older: dict[str, list[Text]] = {}
        for e in range(epoch - 1, 0, -1):
            if not need_older:
                break
            got = self.load(student_source(e), need_older)
            for q in need_older:
                if got.get(q):
                    older[q] = got[q]
            need_older = [q for q in need_older if q not in older]
        for q in qids:
            if q in drawn_set:
                choices = [("current", current.get(q)), ("initial", initial.get(q))]
                drawn_name = "current"
            else:
                choices = [("initial", initial.get(q)), ("older", older.get(q))]
                drawn_name = "initial"
            used, negs = "none", []
            for name, got in choices:
                if got:
                    used, negs = name, list(got)
                    break
            if used != "none" and used != choices[0][0]:
                stats.fallback_other_source += 1
            if used == "none" and self.teacher_fallback and self.teacher().get(q):
                used, negs = "teacher", list(self.teacher()[q])
                stats.fallback_teacher += 1
            pools[q] = QuestionPool(q, drawn_name, used, negs)
        return pools, _finish(stats, pools, cur_src, epoch)


def _finish(stats: PoolStats, pools: dict[str, QuestionPool], cur_src: str, epoch: int) -> PoolStats:
    ages: list[int] = []
    n_current = 0
    for p in pools.values():
        stats.from_current += p.used == "current"
        stats.from_initial += p.used == "initial"
        stats.from_older += p.used == "older"
        stats.from_teacher += p.used == "teacher"
        stats.no_negatives += p.used == "none"
        for t in p.negatives:
            stats.negatives += 1
            n_current += t.source == cur_src
            trained = source_epochs(t.source)
            if trained is not None:
                ages.append(epoch - 1 - trained)
    stats.share_current = n_current / stats.negatives if stats.negatives else 0.0
    stats.mean_age = sum(ages) / len(ages) if ages else None
    return stats


def restore_pools(data: dict[str, Any], texts: dict[str, str]) -> dict[str, QuestionPool]:
    """Rebuild the pools saved with `QuestionPool.to_json` (in a checkpoint) from the key -> text map."""
    out: dict[str, QuestionPool] = {}
    for q, d in data.items():
        missing = [k for k, _ in d["negatives"] if k not in texts]
        if missing:
            raise UserError(f"the checkpoint's pool of question {q!r} names traces the trace store lacks "
                            f"({missing[:3]}): was the store replaced or pruned? Restore it, or remove the "
                            "variant's checkpoints/ folder to train it from the start")
        out[q] = QuestionPool(q, d["drawn"], d["used"], [Text(k, texts[k], s) for k, s in d["negatives"]])
    return out
