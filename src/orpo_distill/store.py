"""The trace store: every sampled trace, with its provenance, in one append-only SQLite file.

Each `Trace` is keyed by a content hash (`trace_key`) of what determines it: role, model id and revision, source
(teacher, initial student, student after epoch E), the user message, the sampling settings without `n`, and the
sample index. Writing is `INSERT OR IGNORE` on that key inside one transaction per batch, in WAL mode, so a batch is
either wholly on disk or absent after a crash (`kill -9` included), re-running the same command samples only the
keys the store lacks, and a second identical run makes zero teacher calls. A `runs` table records each sampling
call's usage, errors and cost, so `stats()` can report tokens and money spent. `sampling_lock` is an advisory file
lock per sampling identity (`<store>.locks/<hash>.lock`) that samplers hold while they look up, sample and write,
so that two processes never pay for the same traces while samplers of different traces (parallel workers'
refreshes) never wait for each other. Provenance fields (model id, revision, checkpoint) are stored with any credentials redacted.
Export to JSONL and to a `datasets.Dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_path, strict_json
from .sampling.base import SamplingParams
from .secrets import redact_text

ROLES = ("teacher", "student")
VERDICTS = ("correct", "wrong", "unparsed")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Trace:
    """One sampled completion with everything needed to trust and reuse it."""

    key: str  # trace_key(...): sha256 hex of the content that determines this trace
    question_id: str
    role: str  # "teacher" | "student"
    source: str  # "teacher" | "initial" | "epoch:E"
    model_id: str
    revision: str
    checkpoint: str | None  # the student checkpoint path/name, None for teachers and hub weights
    sample_index: int
    seed: int  # the run's sampling seed (per-sample streams are derived from it, the prompt and the index)
    params: dict[str, Any]  # SamplingParams.as_dict() without n
    prompt: str  # the task's user message (each backend wraps it in its own template)
    completion: str
    n_tokens: int
    prompt_tokens: int
    finish_reason: str
    latency_s: float
    answer: str | None
    verdict: str  # "correct" | "wrong" | "unparsed"
    kept: bool  # False when the diversity (ROUGE-L) filter dropped it
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = [f.name for f in fields(Trace)]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
    key TEXT PRIMARY KEY,
    question_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('teacher', 'student')),
    source TEXT NOT NULL,
    model_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    checkpoint TEXT,
    sample_index INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    params TEXT NOT NULL,
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    latency_s REAL NOT NULL,
    answer TEXT,
    verdict TEXT NOT NULL CHECK (verdict IN ('correct', 'wrong', 'unparsed')),
    kept INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_order ON traces (question_id, source, sample_index);
CREATE INDEX IF NOT EXISTS traces_role_source ON traces (role, source);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    role TEXT NOT NULL,
    source TEXT NOT NULL,
    model_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    requested INTEGER NOT NULL,
    existing INTEGER NOT NULL,
    sampled INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    cost_usd REAL NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def _canonical_params(params: SamplingParams | dict[str, Any]) -> dict[str, Any]:
    d = params.as_dict() if isinstance(params, SamplingParams) else dict(params)
    d.pop("n", None)  # n says how many samples, not what each one is: k=8 then k=12 reuses the first 8
    d["stop"] = list(d.get("stop") or [])
    return d


def trace_key(role: str, model_id: str, revision: str, source: str, prompt: str, params: SamplingParams,
              sample_index: int) -> str:
    """The content key of one trace: sha256 hex over a canonical JSON of everything that determines it."""
    payload = {"role": role, "model_id": model_id, "revision": revision, "source": source, "prompt": prompt,
               "params": _canonical_params(params), "sample_index": int(sample_index)}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _row(t: Trace) -> tuple:
    if t.role not in ROLES:
        raise ValueError(f"trace {t.key}: role must be one of {ROLES}, got {t.role!r}")
    if t.verdict not in VERDICTS:
        raise ValueError(f"trace {t.key}: verdict must be one of {VERDICTS}, got {t.verdict!r}")
    d = t.to_dict()
    d["params"] = json.dumps(_canonical_params(t.params), sort_keys=True, ensure_ascii=False)
    d["kept"] = int(bool(t.kept))
    for k in ("model_id", "revision", "checkpoint"):  # provenance never carries a credential
        d[k] = redact_text(d[k]) if d[k] is not None else None
    return tuple(d[f] for f in _FIELDS)


def _trace(row: sqlite3.Row) -> Trace:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["kept"] = bool(d["kept"])
    return Trace(**d)


class TraceStore:
    """An append-only SQLite trace store (WAL). Use as a context manager, or call `close()`.

    Safe to read from other processes while one writes (WAL); writers wait for each other (busy timeout). One
    connection is shared by the threads of this process behind a lock.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"trace store not found: {self.path}")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=timeout_s, check_same_thread=False,
                                       isolation_level=None)  # we issue BEGIN/COMMIT ourselves
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        try:
            if not readonly:
                # WAL: a commit is one append to the log, readers never block, and a killed writer leaves at most
                # an uncommitted tail that SQLite discards on the next open. FULL: a commit survives power loss too.
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"could not switch {self.path} to WAL mode (got {mode})")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            version = self._db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise UserError(f"{self.path}: not a trace store ({e})") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            self._db.close()
            raise UserError(f"{self.path}: trace store schema version {version and version[0]}, "
                            f"this orpo-distill reads version {SCHEMA_VERSION}")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the samplers' lock -------------------------------------------------------------------------------------
    def lock_path(self, what: str) -> Path:
        """The lock file of one sampling identity `what`: traces of different identities have different keys, so
        their samplers need not exclude each other. The files stay (a few bytes each): deleting a lock file that
        another process has opened would let two holders in."""
        name = hashlib.sha256(what.encode("utf-8")).hexdigest()[:20]
        return self.path.with_name(self.path.name + ".locks") / f"{name}.lock"

    @contextmanager
    def sampling_lock(self, what: str, *, timeout_s: float | None = None,
                      poll_s: float = 0.2) -> Iterator[None]:
        """Hold the advisory lock of sampling identity `what` (`fcntl.flock` on `lock_path(what)`) while sampling.

        A second sampler (another process, or another connection in this one) waits, saying once on stderr who
        holds the lock, until it is released; with `timeout_s` it gives up with a `UserError` instead. The lock
        is released by the kernel when its holder dies (kill -9 included), so a crash never leaves it stuck.
        Not taken on systems without `fcntl` (Windows): there two samplers may still both sample.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        lock_path = self.lock_path(what)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            t0 = time.monotonic()
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told:
                        holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
                        print(f"orpo-distill: {self.path} is being sampled by {holder}; waiting for it to finish "
                              f"(then only what it did not sample is sampled here)", file=sys.stderr, flush=True)
                        told = True
                    if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                        raise UserError(f"{self.path}: another sampler still holds {lock_path} after "
                                        f"{timeout_s:g} s; wait for it to finish, then run again") from None
                    time.sleep(poll_s)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({redact_text(what)})".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- writing -----------------------------------------------------------------------------------------------
    def add(self, traces: Iterable[Trace]) -> int:
        """Insert traces in ONE transaction (all or none); keys already present are ignored (INSERT OR IGNORE
        semantics on the key). Returns the number inserted."""
        rows = [_row(t) for t in traces]
        if not rows:
            return 0
        # ON CONFLICT(key) DO NOTHING, not INSERT OR IGNORE: only a repeated key is skipped; any other
        # constraint failure (a NULL, a bad verdict) aborts and rolls back the whole batch instead of dropping rows.
        sql = (f"INSERT INTO traces ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))}) "
               "ON CONFLICT(key) DO NOTHING")
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def add_run(self, *, role: str, source: str, model_id: str, revision: str, requested: int, existing: int,
                sampled: int, errors: int, prompt_tokens: int, completion_tokens: int, seconds: float,
                cost_usd: float, status: str) -> None:
        """Record one sampling call (usage, errors, cost) so that `stats()` can total what was spent."""
        with self._lock:
            self._db.execute(
                "INSERT INTO runs (role, source, model_id, revision, requested, existing, sampled, errors, "
                "prompt_tokens, completion_tokens, seconds, cost_usd, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (role, source, redact_text(model_id), redact_text(revision), requested, existing, sampled, errors,
                 prompt_tokens,
                 completion_tokens, seconds, cost_usd, status, time.time()))

    # -- reading -----------------------------------------------------------------------------------------------
    def existing_keys(self, keys: Iterable[str]) -> set[str]:
        """The subset of `keys` already in the store."""
        keys = list(keys)
        if not keys:
            return set()
        with self._lock:
            # json_each passes any number of keys as one parameter (no SQLite variable limit).
            cur = self._db.execute("SELECT key FROM traces WHERE key IN (SELECT value FROM json_each(?))",
                                   (json.dumps(keys),))
            return {r[0] for r in cur}

    def get(self, keys: Sequence[str]) -> list[Trace]:
        """The stored traces among `keys`, in the store's deterministic order."""
        if not keys:
            return []
        return self._select("key IN (SELECT value FROM json_each(?))", [json.dumps(list(keys))])

    def traces(self, *, role: str | None = None, source: str | None = None,
               question_ids: Iterable[str] | None = None, verdict: str | None = None, kept: bool | None = None,
               model_id: str | None = None) -> list[Trace]:
        """Traces matching every given filter, ordered by question_id, source, sample_index (then role, model)."""
        where, args = [], []
        for col, val in (("role", role), ("source", source), ("verdict", verdict), ("model_id", model_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if kept is not None:
            where.append("kept = ?")
            args.append(int(kept))
        if question_ids is not None:
            where.append("question_id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps([str(q) for q in question_ids]))
        return self._select(" AND ".join(where) or "1", args)

    def _select(self, where: str, args: list[Any]) -> list[Trace]:
        sql = (f"SELECT {', '.join(_FIELDS)} FROM traces WHERE {where} "
               "ORDER BY question_id, source, sample_index, role, model_id, revision, key")
        with self._lock:
            return [_trace(r) for r in self._db.execute(sql, args)]

    def iter_all(self) -> Iterator[Trace]:
        yield from self.traces()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM traces").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        """Counts per role and source: traces, questions, correct/wrong/unparsed rates, diversity drops,
        exact duplicates, tokens, length-capped rate; plus usage, errors and cost totals from the runs table; and
        `teachers`: per teacher identity (model id + revision) its traces, correct rate, kept correct traces,
        tokens and what its sampling calls cost."""
        groups: dict[str, Any] = {}
        with self._lock:
            rows = self._db.execute(
                "SELECT role, source, COUNT(*) AS n, COUNT(DISTINCT question_id) AS questions, "
                "SUM(verdict='correct') AS correct, SUM(verdict='wrong') AS wrong, "
                "SUM(verdict='unparsed') AS unparsed, SUM(kept=0) AS dropped, "
                "SUM(n_tokens) AS completion_tokens, SUM(finish_reason='length') AS truncated "
                "FROM traces GROUP BY role, source ORDER BY role, source").fetchall()
            # Exact duplicates: a completion identical to another of the same question, role and source.
            dups = {(r[0], r[1]): r[2] for r in self._db.execute(
                "SELECT role, source, SUM(c - 1) FROM (SELECT role, source, COUNT(*) AS c FROM traces "
                "GROUP BY role, source, question_id, completion) GROUP BY role, source")}
            run_rows = self._db.execute(
                "SELECT role, source, COUNT(*), SUM(sampled), SUM(errors), SUM(prompt_tokens), "
                "SUM(completion_tokens), SUM(seconds), SUM(cost_usd), SUM(status != 'ok') "
                "FROM runs GROUP BY role, source").fetchall()
            teacher_rows = self._db.execute(
                "SELECT model_id, revision, COUNT(*) AS n, COUNT(DISTINCT question_id) AS questions, "
                "SUM(verdict='correct') AS correct, SUM(verdict='correct' AND kept=1) AS kept_correct, "
                "SUM(n_tokens) AS completion_tokens FROM traces WHERE role='teacher' "
                "GROUP BY model_id, revision ORDER BY model_id, revision").fetchall()
        for r in rows:
            n = int(r["n"])
            groups[f"{r['role']}/{r['source']}"] = {
                "role": r["role"], "source": r["source"], "traces": n, "questions": int(r["questions"]),
                "correct": int(r["correct"]), "wrong": int(r["wrong"]), "unparsed": int(r["unparsed"]),
                "correct_rate": r["correct"] / n, "unparsed_rate": r["unparsed"] / n,
                "dropped_by_diversity": int(r["dropped"]), "kept": n - int(r["dropped"]),
                "exact_duplicates": int(dups.get((r["role"], r["source"]), 0)),
                "duplicate_rate": dups.get((r["role"], r["source"]), 0) / n,
                "completion_tokens": int(r["completion_tokens"] or 0),
                "mean_tokens": (r["completion_tokens"] or 0) / n, "truncated_rate": (r["truncated"] or 0) / n,
            }
        runs = {}
        for r in run_rows:
            runs[f"{r[0]}/{r[1]}"] = {"calls": r[2], "sampled": r[3] or 0, "errors": r[4] or 0,
                                      "prompt_tokens": r[5] or 0, "completion_tokens": r[6] or 0,
                                      "seconds": r[7] or 0.0, "cost_usd": r[8] or 0.0, "aborted_calls": r[9] or 0}
        total = sum(g["traces"] for g in groups.values())
        teachers = []
        for r in teacher_rows:  # one row per teacher identity (model id + revision) the store holds
            n = int(r["n"])
            spent = self.run_totals(role="teacher", model_id=r["model_id"], revision=r["revision"])
            teachers.append({"teacher": r["model_id"], "model_id": r["model_id"], "revision": r["revision"],
                             "traces": n, "questions": int(r["questions"]), "correct": int(r["correct"]),
                             "correct_rate": r["correct"] / n, "kept_correct": int(r["kept_correct"] or 0),
                             "completion_tokens": int(r["completion_tokens"] or 0),
                             **{k: spent[k] for k in ("prompt_tokens", "cost_usd", "errors", "calls")}})
        return {"path": str(self.path), "traces": total, "groups": groups, "runs": runs, "teachers": teachers,
                "cost_usd": sum(r["cost_usd"] for r in runs.values()),
                "errors": sum(r["errors"] for r in runs.values())}

    def run_totals(self, *, role: str, model_id: str, revision: str, source: str | None = None) -> dict[str, Any]:
        """What the sampling calls of one model identity spent (the `runs` table): calls, sampled, errors, tokens,
        seconds, cost. Calls are recorded per model id and revision, not per sampling setting: two teachers of one
        model and revision with other temperatures share these totals."""
        where, args = "role = ? AND model_id = ? AND revision = ?", [role, redact_text(model_id),
                                                                     redact_text(revision)]
        if source is not None:
            where += " AND source = ?"
            args.append(source)
        with self._lock:
            r = self._db.execute(
                "SELECT COUNT(*), SUM(sampled), SUM(errors), SUM(prompt_tokens), SUM(completion_tokens), "
                f"SUM(seconds), SUM(cost_usd) FROM runs WHERE {where}", args).fetchone()
        return {"calls": int(r[0]), "sampled": int(r[1] or 0), "errors": int(r[2] or 0),
                "prompt_tokens": int(r[3] or 0), "completion_tokens": int(r[4] or 0), "seconds": float(r[5] or 0.0),
                "cost_usd": float(r[6] or 0.0)}

    # -- export ------------------------------------------------------------------------------------------------
    def export_jsonl(self, path: str | Path) -> int:
        """Write every trace as one JSON object per line (deterministic order); returns the count."""
        n = 0
        with atomic_path(path) as tmp:  # readers never see a half-written export; a failed one leaves no temp file
            with tmp.open("w", encoding="utf-8") as f:
                for t in self.iter_all():
                    f.write(strict_json(t.to_dict()) + "\n")
                    n += 1
        return n

    def to_dataset(self, **filters: Any):
        """A `datasets.Dataset` of the traces (the `traces()` filters apply); `params` is a JSON string column
        so that every row has the same schema."""
        from datasets import Dataset

        rows = []
        for t in self.traces(**filters):
            d = t.to_dict()
            d["params"] = json.dumps(d["params"], sort_keys=True)
            rows.append(d)
        if not rows:
            return Dataset.from_dict({f: [] for f in _FIELDS})
        return Dataset.from_list(rows)


def format_stats(stats: dict[str, Any]) -> str:
    """A human-readable table of `TraceStore.stats()`."""
    lines = [f"trace store {stats['path']}: {stats['traces']} traces"]
    head = (f"{'role/source':<22} {'traces':>7} {'questions':>9} {'correct':>8} {'unparsed':>8} {'dup':>6} "
            f"{'dropped':>7} {'tokens':>10} {'mean tok':>8} {'capped':>7}")
    if stats["groups"]:
        lines += [head, "-" * len(head)]
    for name, g in stats["groups"].items():
        lines.append(f"{name:<22} {g['traces']:>7} {g['questions']:>9} {g['correct_rate']:>8.1%} "
                     f"{g['unparsed_rate']:>8.1%} {g['duplicate_rate']:>6.1%} {g['dropped_by_diversity']:>7} "
                     f"{g['completion_tokens']:>10} {g['mean_tokens']:>8.1f} {g['truncated_rate']:>7.1%}")
    if stats["runs"]:
        lines.append("")
        lines.append(f"{'sampling calls':<22} {'calls':>7} {'sampled':>9} {'errors':>8} {'prompt tok':>11} "
                     f"{'compl tok':>10} {'seconds':>9} {'cost $':>9}")
        for name, r in stats["runs"].items():
            lines.append(f"{name:<22} {r['calls']:>7} {r['sampled']:>9} {r['errors']:>8} {r['prompt_tokens']:>11} "
                         f"{r['completion_tokens']:>10} {r['seconds']:>9.1f} {r['cost_usd']:>9.4f}")
    teachers = stats.get("teachers") or []
    if teachers:
        lines.append("")
        head = (f"{'teacher':<28} {'k':>3} {'traces':>7} {'correct':>8} {'kept ok':>7} {'pooled':>6} "
                f"{'compl tok':>10} {'prompt tok':>10} {'errors':>6} {'cost $':>9}")
        lines += [head, "-" * len(head)]
        for t in teachers:
            name = str(t.get("teacher", t.get("model_id", "?")))
            name = name if len(name) <= 28 else "..." + name[-25:]
            lines.append(f"{name:<28} {str(t.get('k', '-')):>3} {t['traces']:>7} {t['correct_rate']:>8.1%} "
                         f"{t['kept_correct']:>7} {str(t.get('pooled_chosen', '-')):>6} "
                         f"{t['completion_tokens']:>10} {t['prompt_tokens']:>10} {t['errors']:>6} "
                         f"{t['cost_usd']:>9.4f}")
    lines.append(f"total cost: ${stats['cost_usd']:.4f}; request errors (retried or failed): {stats['errors']}")
    return "\n".join(lines)
