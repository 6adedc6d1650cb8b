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


def teacher_query(cfg: Any) -> TraceQuery:
    """This run's teacher traces."""
    params, k = _params(cfg, "teacher")
    model_id, rev = model_revision(cfg.teacher)
    return TraceQuery("teacher", TEACHER_SOURCE, model_id, rev, params, k)


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


__all__ = ["TraceQuery", "initial_student_query", "matches", "model_revision", "other_revisions", "refresh_query",
           "select", "teacher_query"]
