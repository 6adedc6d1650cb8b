"""Grading a predictions file against a task's questions: what `orpo-distill score` does.

A predictions file is JSONL with a `completion` field per row. When the rows carry an `id` (the files `evaluate`
writes do), they pair with questions by id, and only by id: every row needs one, no id may repeat, every id must
be a question of the data and every question must have its row; anything else is refused with the predictions
file, the line and the id (predictions of another split or another dataset are never graded against the wrong
questions). Rows without any id pair by order, with a row-count check: one row per question, or one per data row
(so a file made before `--skip-invalid` dropped bad rows still lines up).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Question, Task
from .loading import TaskDataError


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a predictions JSONL file; bad JSON, bad bytes or no `completion` -> error naming the line."""
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(f"{p}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, Mapping) or not isinstance(row.get("completion"), str):
                raise TaskDataError(f"{p}:{lineno}: field 'completion': missing or not a string")
            rows.append({**row, "_line": lineno})
    return rows


def align(questions: Sequence[Question], preds: Sequence[Mapping[str, Any]], n_rows: int | None = None,
          where: str = "predictions") -> list[Mapping[str, Any]]:
    """`preds` reordered so that item i belongs to `questions[i]`: by id when the rows carry ids (all must match,
    see the module docstring), by order with a row-count check when none does."""
    if any("id" in r for r in preds):
        return _align_by_id(questions, preds, where)
    if len(preds) == len(questions):
        return list(preds)
    if n_rows is not None and len(preds) == n_rows:
        return [preds[q.meta["row"]] for q in questions]
    rows = f" (or {n_rows} data rows)" if n_rows is not None and n_rows != len(questions) else ""
    raise TaskDataError(f"{where}: {len(preds)} predictions for {len(questions)} questions{rows}; the file needs "
                        "one row per question, in data order, with a `completion` field")


def _line(r: Mapping[str, Any], i: int) -> str:
    return str(r.get("_line", i + 1))


def _align_by_id(questions: Sequence[Question], preds: Sequence[Mapping[str, Any]],
                 where: str) -> list[Mapping[str, Any]]:
    known = {str(q.id) for q in questions}
    by_id: dict[str, Mapping[str, Any]] = {}
    first_line: dict[str, str] = {}
    for i, r in enumerate(preds):
        if "id" not in r or r["id"] is None:
            raise TaskDataError(f"{where}:{_line(r, i)}: field 'id': missing, but other rows have one; give every "
                                "row its question's id, or drop the ids to pair rows with questions by order")
        pid = str(r["id"])
        if pid in by_id:
            raise TaskDataError(f"{where}:{_line(r, i)}: id {pid!r} repeats line {first_line[pid]}; one prediction "
                                "per question")
        if pid not in known:
            sample = ", ".join(repr(str(q.id)) for q in questions[:3])
            raise TaskDataError(f"{where}:{_line(r, i)}: id {pid!r} is not a question of the data (its ids look "
                                f"like {sample}{', ...' if len(questions) > 3 else ''}); are these predictions of "
                                "another split or dataset? Score them against the data they were made from")
        by_id[pid] = r
        first_line[pid] = _line(r, i)
    missing = [str(q.id) for q in questions if str(q.id) not in by_id]
    if missing:
        raise TaskDataError(f"{where}: no prediction for {len(missing)} of the {len(questions)} questions (first: id "
                            f"{missing[0]!r}); were the predictions made with a row limit? Score against the same "
                            "rows (or predict every question)")
    return [by_id[str(q.id)] for q in questions]


def score_predictions(task: Task, questions: Sequence[Question], preds: Sequence[Mapping[str, Any]],
                      n_rows: int | None = None, where: str = "predictions") -> tuple[dict[str, Any],
                                                                                     list[dict[str, Any]]]:
    """(summary, per-question rows): accuracy, n, correct, wrong, unparsed; each row id/gold/answer/verdict."""
    tally = {"correct": 0, "wrong": 0, "unparsed": 0}
    rows = []
    for q, p in zip(questions, align(questions, preds, n_rows, where)):
        g = task.grade(q, p["completion"])
        tally[g.verdict] += 1
        rows.append({"id": q.id, "gold": q.gold, "answer": g.answer, "verdict": g.verdict,
                     "completion": p["completion"]})
    n = len(questions)
    summary = {"task": getattr(task, "name", ""), "accuracy": tally["correct"] / n if n else 0.0, "n": n, **tally}
    return summary, rows
