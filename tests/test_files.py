"""files.py: atomic writes leave no temporary file when they fail, sweep the leftovers of dead writers (kill -9),
keep a live writer's, and write strict JSON (NaN/inf -> null)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from orpo_distill.files import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    strict_json,
    sweep_stale_temps,
)


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_target(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(target, "old")

    def full_disk(tmp):
        tmp.write_bytes(b"")  # the 0-byte file a full disk leaves
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, full_disk)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and _hidden(tmp_path) == []


def test_leftovers_of_dead_writers_are_swept_live_ones_kept_old_ones_swept(tmp_path):
    target = tmp_path / "plot.png"
    dead, live = _dead_pid(), os.getppid()  # our parent is alive
    leftovers = [tmp_path / f".plot.png.tmp{dead}-00ff00ff", tmp_path / f".plot.tmp{dead}.png",
                 tmp_path / f".plot.png.tmp{dead}"]
    kept = tmp_path / f".plot.png.tmp{live}-0a0a0a0a"
    old_live = tmp_path / f".plot.png.tmp{live}-0b0b0b0b"
    others = [tmp_path / f".other.png.tmp{dead}-00ff00ff", tmp_path / ".plot.png.notes"]
    for p in [*leftovers, kept, old_live, *others]:
        p.touch()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_live, (day_ago, day_ago))  # a reused pid: old enough to be a leftover anyway
    atomic_write_text(target, "png")
    assert target.read_text() == "png"
    assert _hidden(tmp_path) == sorted(p.name for p in [kept, *others])
    assert sweep_stale_temps(target) == []


def test_strict_json_turns_non_finite_numbers_into_null(tmp_path):
    import numpy as np

    obj = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": np.float32("nan"), "e": np.float64(0.5)},
           "t": (1, 2)}
    assert json.loads(strict_json(obj)) == {"a": None, "b": [1.0, None, None], "c": {"d": None, "e": 0.5},
                                            "t": [1, 2]}
    p = atomic_write_json(tmp_path / "r.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")
    atomic_write_jsonl(tmp_path / "r.jsonl", [{"x": math.nan}, {"x": 1}])
    assert (tmp_path / "r.jsonl").read_text() == '{"x": null}\n{"x": 1}\n'
    with pytest.raises(TypeError):  # not silently stringified unless asked
        strict_json({"p": object()})
    assert json.loads(strict_json({"p": tmp_path}, default=str)) == {"p": str(tmp_path)}
