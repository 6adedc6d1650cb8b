"""Reading a task's rows from disk or the hub and turning them into Questions, with errors that say where.

Sources: JSONL (also .jsonl.gz), JSON (an array, or an object holding one under "data"/"rows"/"examples"/the
split name), CSV/TSV, Parquet, a `datasets.save_to_disk` folder, any other local folder `datasets.load_dataset`
can read, or a hub dataset name (`owner/name` or `owner/name:config`). Each row goes through the task's
`question_from_row`; a bad row (malformed JSON, non-UTF-8 bytes, a missing/empty/mistyped field, an answer key
that is not among the options) raises `TaskDataError` "FILE:LINE: field 'x': why", or with `skip_invalid` is
skipped and counted in a `LoadReport`. Row limits keep the first N valid rows, or a seeded sample of N in data
order. Question ids are the dataset's own (duplicates get a "~2" suffix), else a content hash.

Local copies of the built-in datasets: when the environment variable `ORPO_DISTILL_DATA_DIR` is set, a built-in
task whose split reads its hub default (no `path`, or the hub name itself) reads `$ORPO_DISTILL_DATA_DIR/<task>/
<split>.jsonl` instead when that file exists (e.g. `gsm8k/test.jsonl`, in the hub dataset's own schema), so the
same config runs offline; without the file it goes to the hub as usual.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import Question
from .kinds import RowError

log = logging.getLogger(__name__)

FILE_FORMATS = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".csv", ".tsv", ".parquet")

DATA_DIR_ENV = "ORPO_DISTILL_DATA_DIR"


class TaskDataError(UserError):
    """Data that cannot be used; the message names the file, the line (or row) and the field (exit 2)."""


@dataclass
class LoadReport:
    """What one load read: rows seen, questions kept, and every skipped row with its reason."""

    source: str = ""
    rows: int = 0
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file:line, why)

    def reasons(self) -> Counter[str]:
        """Skip reasons without their location, counted ("field 'question': is empty": 3)."""
        return Counter(why for _, why in self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.loaded} questions from {self.rows} rows"
        top = "; ".join(f"{n} x {why}" for why, n in self.reasons().most_common(5))
        return (f"{self.source}: skipped {len(self.skipped)} of {self.rows} rows ({top}); first at "
                f"{self.skipped[0][0]}; {self.loaded} questions kept")


@dataclass(frozen=True)
class _Bad:
    """A row that could not even be read (bad JSON, bad bytes); carried to the skip-or-raise decision."""

    error: RowError


Row = Mapping[str, Any] | _Bad


# ------------------------------------------------------------------------------------------------ readers

def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else p.suffix.lower()


def _decode(data: bytes, path: Path) -> str:
    """Whole-file UTF-8 (a BOM is fine); bad bytes -> TaskDataError with the line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise TaskDataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at column {col}); "
                            "re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Row]]:
    opener = gzip.open if _suffix(path) == ".jsonl.gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, _Bad(RowError(None, f"not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                                 f"{e.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _Bad(RowError(None, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(row, dict):
                yield where, _Bad(RowError(None, f"a row must be a JSON object, got {type(row).__name__}"))
                continue
            yield where, row


def _read_json(path: Path, split: str | None) -> Iterator[tuple[str, Row]]:
    text = _decode(path.read_bytes(), path)
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos: pos + 1] == "[":
        # Walk the array item by item so that every row knows its line.
        pos += 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if text[pos: pos + 1] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                item, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            where = f"{path}:{line}"
            yield where, item if isinstance(item, dict) else _Bad(
                RowError(None, f"a row must be a JSON object, got {type(item).__name__}"))
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if text[pos: pos + 1] == ",":
                pos += 1
            elif text[pos: pos + 1] != "]":
                line = text.count("\n", 0, pos) + 1
                raise TaskDataError(f"{path}:{line}: not valid JSON (expected ',' or ']' between rows)")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    keys = [k for k in (split, "data", "rows", "examples", "questions") if k]
    items = next((data[k] for k in keys if isinstance(data, dict) and isinstance(data.get(k), list)), None)
    if items is None:
        raise TaskDataError(f"{path}: a JSON file must hold an array of row objects, or an object with one under "
                            f"{' / '.join(repr(k) for k in keys)} (use JSONL for one row per line)")
    for i, item in enumerate(items, 1):
        yield f"{path}: item {i}", item if isinstance(item, dict) else _Bad(
            RowError(None, f"a row must be a JSON object, got {type(item).__name__}"))


def _read_csv(path: Path) -> Iterator[tuple[str, Row]]:
    import csv

    text = _decode(path.read_bytes(), path)
    delim = "\t" if _suffix(path) == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
    if not reader.fieldnames:
        return
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                yield where, _Bad(RowError(None, f"more values than the {len(reader.fieldnames)} header columns"))
                continue
            yield where, {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        raise TaskDataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TaskDataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {i}", row


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and
                                                    (p / "dataset_info.json").is_file())


def _read_dataset(ds: Any, where: str) -> Iterator[tuple[str, Row]]:
    for i, row in enumerate(ds, 1):
        yield f"{where}: row {i}", row


def _pick_split(dd: Any, split: str | None, where: str) -> Any:
    """One split of a DatasetDict (the one asked for, else the only one)."""
    names = list(dd.keys())
    if split in names:
        return dd[split]
    if split is None and len(names) == 1:
        return dd[names[0]]
    raise TaskDataError(f"{where}: no split {split!r}; it has {', '.join(names)} (set the split's `split:`)")


def _read_saved(p: Path, split: str | None) -> Iterator[tuple[str, Row]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several kinds for a corrupt folder; all mean the same here
        raise TaskDataError(f"{p}: not a readable `save_to_disk` folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, str(p))
        where = f"{p}[{split or list(ds.info.splits or ['?'])[0]}]"
    else:
        where = str(p)
    yield from _read_dataset(ds, where)


def _read_hub(name: str, split: str | None, config: str | None = None) -> Iterator[tuple[str, Row]]:
    """`datasets.load_dataset(name, config, split=split)`: a hub dataset, or a local folder of data files."""
    import datasets

    if ":" in name and config is None and not Path(name).exists():
        name, config = name.split(":", 1)
    where = f"{name}{':' + config if config else ''}[{split or '?'}]"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset, bad config: all end here with the dataset named
        hint = "" if Path(name).exists() else " (not a local file or folder either; check the path)"
        raise TaskDataError(f"{where}: could not load the dataset ({type(e).__name__}: {e}){hint}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, where)
    yield from _read_dataset(ds, where)


def iter_rows(path: str, split: str | None = None, hub_config: str | None = None) -> Iterator[tuple[str, Row]]:
    """(where, row) for each row of `path`; `where` is "file:line" (or "file: row N" for tabular data)."""
    p = Path(path)
    if p.is_dir():
        if _is_saved_dataset(p):
            yield from _read_saved(p, split)
        else:
            yield from _read_hub(str(p), split, hub_config)
        return
    suffix = _suffix(p)
    if p.is_file():
        if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
            yield from _read_jsonl(p)
        elif suffix == ".json":
            yield from _read_json(p, split)
        elif suffix in (".csv", ".tsv"):
            yield from _read_csv(p)
        elif suffix == ".parquet":
            yield from _read_parquet(p)
        else:
            raise TaskDataError(f"{p}: unknown data format {suffix or '(no extension)'!r}; use one of "
                                f"{', '.join(FILE_FORMATS)}, a dataset folder, or a hub dataset name")
        return
    if suffix in FILE_FORMATS or p.is_absolute() or path.startswith((".", "~")):
        raise TaskDataError(f"{p}: file not found")
    yield from _read_hub(path, split, hub_config)


# ---------------------------------------------------------------------------------------------- questions

def local_copy(path: str, task: Any, split: str | None) -> tuple[Path | None, str]:
    """(the local file that replaces a built-in task's hub default, a hint for errors when there is none).

    Only when `ORPO_DISTILL_DATA_DIR` is set, `task` has a hub default and `path` is that hub name: the file is
    `$ORPO_DISTILL_DATA_DIR/<task name>/<split>.jsonl`, used when it exists."""
    root = os.environ.get(DATA_DIR_ENV)
    hub = getattr(task, "hub", None)
    if not root or hub is None or path != hub.name or not split:
        return None, ""
    candidate = Path(root).expanduser() / str(getattr(task, "name", "")) / f"{split}.jsonl"
    if candidate.is_file():
        return candidate, ""
    return None, f" ({DATA_DIR_ENV} is set, but {candidate} does not exist; the hub was tried instead)"


def _with_hint(rows: Iterator[tuple[str, Row]], hint: str) -> Iterator[tuple[str, Row]]:
    try:
        yield from rows
    except TaskDataError as e:
        raise TaskDataError(f"{e}{hint}") from None


def load_questions_from(path: str, task: Any, fields: Mapping[str, str] | None = None, limit: int | None = None,
                        sample_seed: int | None = None, skip_invalid: bool = False, split: str | None = None,
                        report: LoadReport | None = None, hub_config: str | None = None) -> list[Question]:
    """The Questions of one data source, read with `task.question_from_row`.

    `fields` maps our names (question, options, answer, id, rationale) to the dataset's. `limit` keeps the first
    N valid rows, or with `sample_seed` a seeded sample of N (kept in data order). `skip_invalid` skips bad rows
    (counted in `report`, and logged) instead of raising `TaskDataError`. Each Question's `source` is its
    "file:line" and `meta["row"]` its 0-based position among the source's rows (skipped ones included).
    """
    if not hasattr(task, "question_from_row"):
        raise TaskDataError(f"task {getattr(task, 'name', task)!r} does not read data files")
    try:
        fmap = task.fields(fields)
    except ValueError as e:
        raise TaskDataError(str(e)) from None
    local, hint = local_copy(str(path), task, split)
    if local is not None:
        path, hub_config = str(local), None
    report = report if report is not None else LoadReport()
    report.source = str(path)
    out: list[Question] = []
    seen: dict[str, int] = {}
    rows = iter_rows(path, split, hub_config)
    if hint:
        rows = _with_hint(rows, hint)
    for index, (where, row) in enumerate(rows):
        report.rows += 1
        try:
            if isinstance(row, _Bad):
                raise row.error
            q = task.question_from_row(row, fmap, where)
        except RowError as e:
            if not skip_invalid:
                raise TaskDataError(e.where(where) + " (use --skip-invalid / task.skip_invalid to skip bad "
                                    "rows)") from None
            report.skipped.append((where, e.where("").removeprefix(": ")))
            continue
        n = seen.get(q.id, 0) + 1
        seen[q.id] = n
        meta = {**q.meta, "row": index}
        q = replace(q, id=q.id if n == 1 else f"{q.id}~{n}", meta=meta)
        out.append(q)
        if limit is not None and sample_seed is None and len(out) >= limit:
            break
    if limit is not None and sample_seed is not None and len(out) > limit:
        keep = sorted(random.Random(sample_seed).sample(range(len(out)), limit))
        out = [out[i] for i in keep]
    report.loaded = len(out)
    if report.skipped:
        log.warning(report.summary())
    if not out:
        why = f"all {report.rows} rows were skipped: {report.summary()}" if report.rows else "it has no rows"
        raise TaskDataError(f"{path}: no questions ({why})")
    return out

