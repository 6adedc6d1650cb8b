"""Crash-safe file writes: a file is written beside its target and renamed over it, so a reader or a resumed run
sees either the old file or the whole new one, never half of it (model checkpoints have their own, fsynced
variant in `checkpoint.py`)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` via a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
