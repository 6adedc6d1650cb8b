"""Tasks: the one entry point from a run's `task:` config to a `Task` and its Questions.

`load_task(cfg)` gives the task (a built-in one, a generic kind, a custom grader, or the synthetic task) and
`load_questions(cfg, split)` the questions of the "train", "validation" or "test" split as the config describes
them (path or hub default, field map, limit/sample, skip_invalid). Everything else here is for tools and tests:
`make_task`, `load_questions_from` (one file/folder/hub name), `score_predictions` (the `score` command).
"""

from __future__ import annotations

from typing import Any, Literal

from .base import Grade, Question, Task
from .builtin import BUILTIN, make_task, task_names
from .kinds import (
    KINDS,
    CustomTask,
    ExactTask,
    MultipleChoiceTask,
    NumericTask,
    RowError,
    YesNoTask,
)
from .loading import LoadReport, TaskDataError, iter_rows, load_questions_from

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")

__all__ = [
    "BUILTIN", "KINDS", "SPLITS", "CustomTask", "ExactTask", "Grade", "LoadReport", "MultipleChoiceTask",
    "NumericTask", "Question", "RowError", "Task", "TaskDataError", "YesNoTask", "has_split", "iter_rows",
    "load_questions", "load_questions_from", "load_task", "make_task", "task_names",
]


def _synthetic() -> Any:
    try:
        from . import synthetic
    except ImportError as e:  # pragma: no cover - the module ships with the package
        raise TaskDataError(f"the synthetic task is not available in this install ({e})") from None
    return synthetic


def load_task(cfg: Any) -> Task:
    """The Task a `TaskConfig` names. Raises TaskDataError for an unknown name/kind or a bad grader."""
    if cfg.name == "synthetic":
        try:
            return _synthetic().SyntheticTask(cfg.synthetic)
        except ValueError as e:  # bad `task.synthetic` options
            raise TaskDataError(str(e)) from None
    try:
        return make_task(cfg.name, cfg.kind, cfg.grader)
    except ValueError as e:
        raise TaskDataError(f"task: {e}") from None


def has_split(cfg: Any, split: str) -> bool:
    """Whether `split` has data: the synthetic task always; else a path, or a built-in's hub default."""
    if cfg.name == "synthetic":
        return True
    ds = getattr(cfg, split)
    if ds.path:
        return True
    task = make_task(cfg.name, cfg.kind, cfg.grader) if cfg.name in BUILTIN else None
    return task is not None and task.hub is not None


def load_questions(cfg: Any, split: Split, skip_invalid: bool | None = None,
                   report: LoadReport | None = None) -> list[Question]:
    """The questions of one split (`cfg.<split>`: path, split name, limit, sample_seed).

    Without a path, a built-in task reads its hub dataset (needs network). `skip_invalid` defaults to
    `cfg.skip_invalid`; skipped rows are counted in `report`. Raises TaskDataError naming file, line and field.
    """
    if split not in SPLITS:
        raise TaskDataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    ds = getattr(cfg, split)
    if cfg.name == "synthetic":
        syn = _synthetic()
        try:
            qs = syn.load_questions(split, cfg.synthetic, ds.limit)
        except ValueError as e:
            raise TaskDataError(str(e)) from None
        if report is not None:
            report.source, report.rows, report.loaded = f"synthetic:{split}", len(qs), len(qs)
        return qs
    task = load_task(cfg)
    path, hub_config = ds.path, ds.subset
    if not path:
        hub = getattr(task, "hub", None)
        if hub is None:
            raise TaskDataError(f"task.{split}.path is not set: give a JSONL/JSON/CSV/Parquet file, a dataset "
                                "folder or a hub dataset name")
        path, hub_config = hub.name, ds.subset or hub.config
    return load_questions_from(path, task, cfg.fields, limit=ds.limit, sample_seed=ds.sample_seed,
                               skip_invalid=cfg.skip_invalid if skip_invalid is None else skip_invalid,
                               split=ds.split or split, report=report, hub_config=hub_config)
