"""Crash-safe file writes: a file is written beside its target and renamed over it, so a reader or a resumed run
sees either the old file or the whole new one, never half of it (model checkpoints have their own, fsynced
variant in `checkpoint.py`).

A temporary file is named `.<target name>.tmp<pid>-<random>`. A write that fails (a full disk, an exception in
the writer) removes its temporary file; one killed outright (`kill -9`) cannot, so each write first sweeps the
leftovers of its own target: temporary files whose writer process is gone, or older than a day (a reused pid).
`atomic_write_json` / `strict_json` write strict JSON: NaN and +-inf become null, never the non-standard
`NaN`/`Infinity` tokens other tools reject.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A leftover older than this is removed even when a process with its pid exists (pids are reused).
STALE_AFTER_S = 24 * 3600.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _temp_pattern(path: Path) -> re.Pattern[str]:
    # Current names (.NAME.tmpPID-HEX) and the older plot names (.STEM.tmpPID.SUFFIX) this module replaces.
    name, stem, suffix = map(re.escape, (path.name, path.stem, path.suffix))
    return re.compile(rf"^\.(?:{name}\.tmp(\d+)(?:-[0-9a-f]+)?|{stem}\.tmp(\d+){suffix})$")


def sweep_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a dead writer left beside `path` (see the module docstring); returns them."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return []
    pattern = _temp_pattern(path)
    removed = []
    now = time.time()
    for entry in folder.iterdir():
        m = pattern.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        try:
            old = now - entry.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            continue
        if (pid != os.getpid() and not _pid_alive(pid)) or old:
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:  # another writer swept it first
                pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """`with atomic_path(target) as tmp:` write `tmp` (any writer: savefig, a tokenizer, ...); on a clean exit it
    is renamed over `target`, on an exception it is removed and the exception goes on. Stale temporary files of
    `target` from dead writers are swept first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` and rename `tmp` over `path` (see `atomic_path`); returns `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` via a temporary file in the same folder and one rename."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN/inf float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return finite_or_none(obj.item())  # a numpy scalar
    return obj


def strict_json(obj: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None,
                sort_keys: bool = False) -> str:
    """Standard JSON text of `obj`: NaN/inf -> null, and `allow_nan=False` so nothing non-standard gets out."""
    return json.dumps(finite_or_none(obj), indent=indent, default=default, sort_keys=sort_keys,
                      ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None, sort_keys: bool = False) -> Path:
    """Write `obj` as strict JSON (see `strict_json`) plus a newline, atomically."""
    return atomic_write_text(path, strict_json(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Any) -> Path:
    """Write an iterable of objects as strict JSON lines, atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(strict_json(r) + "\n")

    return atomic_write(path, write)
