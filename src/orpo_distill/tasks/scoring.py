"""Grading a predictions file against a task's questions: what `orpo-distill score` does.

A predictions file is JSONL with a `completion` field per row. Rows pair with questions by `id` when every row
has one and the ids are exactly the questions' ids (the files `evaluate` writes), otherwise by order: one row
per question, or one per data row (so a file made before `--skip-invalid` dropped bad rows still lines up).
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
    """`preds` reordered so that item i belongs to `questions[i]` (by id, else by order)."""
    ids = [q.id for q in questions]
    if preds and all("id" in r for r in preds) and sorted(map(str, (r["id"] for r in preds))) == sorted(ids):
        by_id = {str(r["id"]): r for r in preds}
        return [by_id[i] for i in ids]
    if len(preds) == len(questions):
        return list(preds)
    if n_rows is not None and len(preds) == n_rows:
        return [preds[q.meta["row"]] for q in questions]
    rows = f" (or {n_rows} data rows)" if n_rows is not None and n_rows != len(questions) else ""
    raise TaskDataError(f"{where}: {len(preds)} predictions for {len(questions)} questions{rows}; the file needs "
                        "one row per question, in data order, with a `completion` field")


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
