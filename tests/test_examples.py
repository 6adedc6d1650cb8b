"""What ships works from a user's checkout: no tracked file names a path on the machine it was written on, and
the example configs and scripts read data from the hub or a path the user gives, never from outside the repo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orpo_distill.config import load_config

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
MACHINE_PATHS = ("/" + "work/", "/" + "tmp/", "/" + "home/")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def _text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary (model weights) or deleted in the work tree


def test_no_tracked_file_names_a_machine_path():
    bad = []
    for p in _tracked():
        if p.name == ".gitignore":  # ignore patterns such as /tmp/ are relative to the repo, not machine paths
            continue
        text = _text(p)
        for lineno, line in enumerate((text or "").splitlines(), 1):
            if any(m in line for m in MACHINE_PATHS):
                bad.append(f"{p.relative_to(REPO)}:{lineno}: {line.strip()[:100]}")
    assert not bad, "machine-specific paths in tracked files:\n" + "\n".join(bad)
