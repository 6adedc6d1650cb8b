"""What ships works from a user's checkout: no tracked file names a path on the machine it was written on, the
example configs and scripts read data from the hub or a path the user gives (never from outside the repo), and the
core install is lean and never pins torch."""

from __future__ import annotations

import os
import re
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
        if p.name == ".gitignore":  # its patterns are relative to the repo, not machine paths
            continue
        text = _text(p)
        for lineno, line in enumerate((text or "").splitlines(), 1):
            if any(m in line for m in MACHINE_PATHS):
                bad.append(f"{p.relative_to(REPO)}:{lineno}: {line.strip()[:100]}")
    assert not bad, "machine-specific paths in tracked files:\n" + "\n".join(bad)


def _examples() -> list[Path]:
    found = sorted((REPO / "examples").glob("*.yaml"))
    assert found, "examples/ has no configs"
    return found


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet")


def test_examples_read_data_from_the_hub_not_from_outside_the_checkout():
    for f in [*_examples(), REPO / "examples" / "paper_all.sh"]:
        assert "../" not in f.read_text(encoding="utf-8"), f"{f.name} reads a path outside the user's checkout"
    for f in _examples():
        cfg = load_config(f)
        for split in ("train", "validation", "test"):
            path = getattr(cfg.task, split).path
            assert path is None or not _is_local(path), f"{f.name}: task.{split}.path={path!r} is a local path"


def test_paper_all_script_passes_valid_overrides(tmp_path):
    """Run the script with a stand-in `orpo-distill` that records its arguments; each run's overrides must load,
    and TEST_DIR must point every task's test split at TEST_DIR/TASK/test.jsonl."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "orpo-distill"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {calls}\nprintf "\\n" >> {calls}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TEST_DIR="local")
    subprocess.run(["bash", "examples/paper_all.sh"], cwd=REPO, env=env, check=True, timeout=60)
    lines = [ln.rstrip("\0").split("\0") for ln in calls.read_text().split("\0\n") if ln.strip()]
    runs = [a for a in lines if a[0] == "run"]
    assert len(runs) == 10 and lines[-1][0] == "report" and len(lines[-1]) == 1 + 10 + 2
    seen = set()
    for args in runs:
        cfg_path, out = args[1], args[3]
        assert args[2] == "--out"
        cfg = load_config(REPO / cfg_path, args[4:])
        seen.add((cfg.task.name, cfg.student.model))
        assert cfg.task.test.path == f"local/{cfg.task.name}/test.jsonl"
        assert cfg.task.train.path is None  # the built-in task's hub dataset
        assert cfg.student.trust_remote_code == cfg.student.model.startswith("internlm/")
        assert out.endswith(f"/{cfg.task.name}")
    assert len(seen) == 10


# Distribution name -> the module it provides, for the core dependencies.
MODULE_OF = {"pyyaml": "yaml", "rouge-score": "rouge_score", "math-verify": "math_verify"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower()


def test_core_dependencies_are_all_imported_and_torch_is_never_pinned():
    """A lean core install: every core dependency is imported by the package (optional ones such as TensorBoard
    live in extras), and torch is a range everywhere so that pip never replaces the torch build installed first."""
    project = _pyproject()
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src" / "orpo_distill").rglob("*.py"))
    unused = [req for req in project["dependencies"]
              if not re.search(rf"^\s*(import|from) {MODULE_OF.get(_name(req), _name(req))}\b", source, re.M)]
    assert not unused, f"core dependencies the package never imports (move them to an extra or drop them): {unused}"
    extras = project["optional-dependencies"]
    assert "tensorboard" in {_name(r) for r in extras["dev"]}, "the tests write TensorBoard logs"
    assert "tensorboard" in {_name(r) for r in extras["tensorboard"]}
    for group, reqs in [("dependencies", project["dependencies"]), *extras.items()]:
        for req in reqs:
            assert not (_name(req) == "torch" and "==" in req), f"{group} pins torch: {req}"


def test_nothing_a_user_gets_cites_files_outside_the_repo():
    """Users have only the repository: code and docs cite docs/METHOD.md, never the team's ../shared notes (the
    tests may read ../shared/data, which CI provides, and skip without it)."""
    bad = [f"{p.relative_to(REPO)}:{n}" for p in _tracked() if p.relative_to(REPO).parts[0] != "tests"
           for n, line in enumerate((_text(p) or "").splitlines(), 1) if "../" + "shared" in line]
    assert not bad, "cites ../shared, which users do not have:\n" + "\n".join(bad)


def test_method_doc_names_only_config_keys_that_exist():
    from orpo_distill.config import config_reference

    keys = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", config_reference(), re.M))
    text = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    sections = "run|task|teacher|student|sampling|pairs|policy|objective|trainer|eval"
    named = set(re.findall(rf"`((?:{sections})\.[a-z0-9_.]+)", text))
    assert len(named) > 20, "docs/METHOD.md should name the keys that set each choice"
    assert named <= keys, f"docs/METHOD.md names keys the config does not have: {sorted(named - keys)}"
    assert (REPO / "README.md").read_text(encoding="utf-8").count("docs/METHOD.md") >= 1
