"""The offline demo's assets: two tiny shipped checkpoints (teacher and student) and the script that built them.

`assets_dir()` is the one way code finds the shipped models (`assets_dir() / "teacher"`, `... / "student"`,
`... / "BUILD.json"`), wherever the package is installed; `demo/build.py` rebuilds them bit-for-bit from a seed.
"""

from __future__ import annotations

from pathlib import Path


def assets_dir() -> Path:
    """The folder holding `teacher/`, `student/` and `BUILD.json` inside the installed package."""
    return Path(__file__).resolve().parent / "assets"
