"""Which stored traces belong to this run: one query, by full identity, for the trainer, `check_traces` and sweeps.

A trace store can hold traces of many runs (`run.store` shared between runs and sweep cells, a teacher or student
folder updated in place, another prompt format, other sampling settings). The traces of one run's teacher, of its
initial student, or of one variant/seed's student after epoch E are exactly those whose role, source, model id,
revision (which carries the prompt format, `sampling.stage.model_identity`), sampling settings (without n) and
sample index (< this run's k) all match. `TraceQuery` names that identity once and `select` applies it, so no
caller can forget a column.

The revision is exactly what the samplers record (`sampling.stage.model_identity` without a loaded model): the
configured `revision`, else a content fingerprint of a local folder, else "unpinned" (a hub or served model
without a pinned `revision`: pin one to tell its versions apart).

Several teachers (`teacher:` a list): each has its own query (its model identity, K and sampling settings), so
each one's traces are stored and found under its own identity and adding a teacher never re-samples the others.
The chosen traces are POOLED (`pooled_chosen`): per question, the teachers in config order, each one's kept
correct traces in sample-index order (its own ROUGE-L filter was applied when they were sampled), and a trace
joins the pool unless its ROUGE-L F1 with a trace already in the pool exceeds `sampling.rouge_threshold`. The
result depends only on the stored traces and the config's order (never on which teacher was sampled first), and
appending a teacher never changes what the earlier ones contribute. The store's `kept` flags stay per teacher;
the pooled filter is applied when the traces are read, so it is never written anywhere that a later change of the
teacher list would make stale. With one teacher it is the stored `kept` flag alone, exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TEACHER_SOURCE = "teacher"
INITIAL_SOURCE = "initial"


@dataclass(frozen=True)
class TraceQuery:
    """The identity of one set of traces of a run (see the module docstring)."""

    role: str  # "teacher" | "student"
    source: str  # "teacher" | "initial" | "epoch:E"
    model_id: str
    revision: str
    params: tuple[tuple[str, Any], ...]  # sampling settings without n, canonical (stop as a list), sorted
    k: int  # sample indices 0..k-1

    def describe(self) -> str:
        return f"{self.role} {self.model_id} (revision {self.revision}, source {self.source}, k={self.k})"


def _canonical(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    d = dict(params)
    d.pop("n", None)
    d["stop"] = tuple(d.get("stop") or ())
    return tuple(sorted(d.items()))


def model_revision(mcfg: Any) -> tuple[str, str]:
    """(model_id, revision) of a configured model, as its sampler records them with its traces."""
    from .sampling.stage import model_identity

    return model_identity(mcfg)


def _params(cfg: Any, role: str) -> tuple[tuple[tuple[str, Any], ...], int]:
    from .sampling.stage import params_from_config

    p = params_from_config(cfg, role)
    return _canonical(p.as_dict()), p.n


def teacher_queries(cfg: Any) -> list[TraceQuery]:
    """The traces of each configured teacher (config order), each by its own identity, K and sampling settings."""
    from .config import teachers_of
    from .sampling.stage import teacher_params

    out = []
    for t in teachers_of(cfg):
        p = teacher_params(cfg, t)
        model_id, rev = model_revision(t)
        out.append(TraceQuery("teacher", TEACHER_SOURCE, model_id, rev, _canonical(p.as_dict()), p.n))
    return out


def teacher_query(cfg: Any) -> TraceQuery:
    """This run's teacher traces (one teacher; with a list of them use `teacher_queries`)."""
    qs = teacher_queries(cfg)
    if len(qs) != 1:
        raise ValueError("this run has several teachers: use teacher_queries / pooled_chosen")
    return qs[0]


def teacher_identity(cfg: Any) -> Any:
    """The teachers' resolved identities for run hashes: `[model_id, revision]` for a single `teacher:` mapping
    (what run hashes always held), a list of them for a list of teachers."""
    from .config import is_multi_teacher, teachers_of

    if not is_multi_teacher(cfg):
        return list(model_revision(cfg.teacher))
    return [list(model_revision(t)) for t in teachers_of(cfg)]


def pool_diverse(groups: Sequence[Sequence[Any]], threshold: float) -> list[Any]:
    """The pooled ROUGE-L filter over one question's traces, `groups` in priority order (a teacher's traces in
    sample-index order per group): greedy, a trace is kept unless its ROUGE-L F1 with an already kept one exceeds
    `threshold`. Deterministic for a fixed order; earlier groups are never changed by later ones."""
    from .sampling.diversity import diversity_keep

    flat = [t for group in groups for t in group]
    return [t for t, keep in zip(flat, diversity_keep([t.completion for t in flat], threshold)) if keep]


def pooled_chosen(store: Any, cfg: Any, question_ids: Iterable[str] | None = None) -> dict[str, list[Any]]:
    """The chosen traces of each question: every configured teacher's kept correct traces, pooled across teachers
    with the ROUGE-L filter (see the module docstring), in pool order (teacher order, then sample index)."""
    qids = None if question_ids is None else [str(x) for x in question_ids]
    per_teacher: list[dict[str, list[Any]]] = []
    for q in teacher_queries(cfg):
        by_q: dict[str, list[Any]] = {}
        for t in sorted(select(store, q, qids, verdicts=("correct",), kept=True),
                        key=lambda t: (t.question_id, t.sample_index, t.key)):
            by_q.setdefault(t.question_id, []).append(t)
        per_teacher.append(by_q)
    if len(per_teacher) == 1:
        return per_teacher[0]
    threshold = float(cfg.sampling.rouge_threshold)
    out: dict[str, list[Any]] = {}
    for qid in sorted({q for by_q in per_teacher for q in by_q}):
        pool = pool_diverse([by_q.get(qid, []) for by_q in per_teacher], threshold)
        if pool:
            out[qid] = pool
    return out


def initial_student_query(cfg: Any) -> TraceQuery:
    """This run's initial (untrained) student traces."""
    params, k = _params(cfg, "student")
    model_id, rev = model_revision(cfg.student)
    return TraceQuery("student", INITIAL_SOURCE, model_id, rev, params, k)


def refresh_query(cfg: Any, epochs_trained: int, revision: str) -> TraceQuery:
    """The traces of one variant/seed's student after `epochs_trained` epochs; `revision` is the one the trainer
    records for them (`train.student_revision`)."""
    if epochs_trained < 1:
        raise ValueError(f"a refreshed student has trained at least one epoch, got {epochs_trained}")
    params, k = _params(cfg, "student")
    model_id = model_revision(cfg.student)[0]
    return TraceQuery("student", f"epoch:{epochs_trained}", model_id, revision, params, k)


def matches(trace: Any, q: TraceQuery) -> bool:
    """Whether one stored trace belongs to the query's identity."""
    return (trace.role == q.role and trace.source == q.source and trace.model_id == q.model_id
            and trace.revision == q.revision and 0 <= trace.sample_index < q.k
            and _canonical(trace.params) == q.params)


def select(store: Any, q: TraceQuery, question_ids: Iterable[str] | None = None, *,
           verdicts: Sequence[str] | None = None, kept: bool | None = None) -> list[Any]:
    """The stored traces of `q` (for `question_ids`, all questions when None), optionally only these verdicts /
    only kept (or dropped) ones, in the store's deterministic order."""
    qids = None if question_ids is None else [str(x) for x in question_ids]
    if qids is not None and not qids:
        return []
    verdict = verdicts[0] if verdicts is not None and len(verdicts) == 1 else None
    rows = store.traces(role=q.role, source=q.source, question_ids=qids, model_id=q.model_id, verdict=verdict,
                        kept=kept)
    return [t for t in rows if matches(t, q) and (verdicts is None or t.verdict in verdicts)]


def other_revisions(store: Any, q: TraceQuery, question_ids: Iterable[str] | None = None) -> list[str]:
    """Revisions of the same model and source that the store holds but `q` excludes (for error messages)."""
    qids = None if question_ids is None else [str(x) for x in question_ids]
    rows = store.traces(role=q.role, source=q.source, question_ids=qids, model_id=q.model_id)
    return sorted({t.revision for t in rows} - {q.revision})


__all__ = ["TraceQuery", "initial_student_query", "matches", "model_revision", "other_revisions", "pool_diverse",
           "pooled_chosen", "refresh_query", "select", "teacher_identity", "teacher_queries", "teacher_query"]
