"""The bad-input and fault matrix: every way a user's input or the machine can go wrong that we know of, run
through the real command line, each checked for its exit code, a one-line message naming the file/key/value at
fault, and no traceback.

Most cases run `cli.main([...])` in-process and fail in the preflight, before any model is loaded (fast). The few
that need a real signal run `python -m orpo_distill` in a subprocess. Faults that cannot be produced for real on
every machine (a full disk, a read-only or locked store as root) are simulated where they surface: a write that
raises `OSError(ENOSPC)` or the SQLite error text. `ORPO_FAULT_MATRIX=FILE` appends one JSON row per case
(case, exit code, message) to FILE, from which the matrix table in reports is generated.

Models: the tiny teacher and student shipped with the demo (real, loadable folders), or broken copies of them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from orpo_distill.cli import main
from orpo_distill.demo import assets_dir

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def base_config(tmp: Path) -> dict[str, Any]:
    """A tiny real run: the synthetic task, the shipped tiny teacher and student on the CPU."""
    return {
        "run": {"out_dir": str(tmp / "run"), "seeds": 1, "variants": ["sft_single", "orpo_mixed"],
                "workers": 1},  # in-process: several cases replace stages with monkeypatched fakes
        "task": {"name": "synthetic", "synthetic": {"n_train": 4, "n_validation": 2, "n_test": 2}},
        "teacher": {"model": str(assets_dir() / "teacher"), "template": "plain", "device": "cpu",
                    "batch_size": 4},
        "student": {"model": str(assets_dir() / "student"), "template": "plain", "device": "cpu",
                    "batch_size": 4},
        "sampling": {"k": 2, "max_new_tokens": 8},
        "trainer": {"epochs": 1, "batch_size": 4, "report_to": ["jsonl"]},
        "eval": {"max_new_tokens": 8},
    }


def arith_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Env:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    cfg: dict[str, Any] = field(default_factory=dict)
    server: str = ""  # base URL of a fake OpenAI-compatible server, for the cases that need one

    def write(self, cfg: dict[str, Any] | None = None, name: str = "config.yaml") -> str:
        p = self.tmp / name
        p.write_text(yaml.safe_dump(cfg if cfg is not None else self.cfg))
        return str(p)

    def arith(self, **files: Path) -> None:
        """Point the config at a numeric task over JSONL files (train/validation/test)."""
        self.cfg["task"] = {"name": "arith", "kind": "numeric",
                            **{split: {"path": str(p)} for split, p in files.items()}}

    def model_copy(self, which: str = "student") -> Path:
        d = self.tmp / f"{which}_copy"
        shutil.copytree(assets_dir() / which, d)
        self.cfg[which]["model"] = str(d)
        return d


@dataclass
class Case:
    """One row of the matrix: `setup(env)` returns the argv; `code` the exit code; `needles` must all appear in
    stderr (the message names the file/key/value); `absent` must not (secrets)."""

    setup: Callable[[Env], list[str]]
    code: int
    needles: tuple[str, ...] | Callable[[Env], tuple[str, ...]] = ()
    absent: tuple[str, ...] = ()
    xfail: str | None = None
    check: Callable[[Env], None] | None = None


CASES: dict[str, Case] = {}


def case(name: str, code: int, needles: Any = (), **kw: Any) -> Callable[[Callable[[Env], list[str]]], Any]:
    def deco(fn: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
        CASES[name] = Case(fn, code, needles, **kw)
        return fn

    return deco


# ---- config --------------------------------------------------------------------------------------------------

@case("config: empty file", 2, ("config.yaml", "empty"))
def _(env: Env) -> list[str]:
    (env.tmp / "config.yaml").write_text("")
    return ["run", str(env.tmp / "config.yaml")]


@case("config: YAML syntax error", 2, ("config.yaml", "not valid YAML"))
def _(env: Env) -> list[str]:
    (env.tmp / "config.yaml").write_text("trainer:\n  lr: [1, 2\n")
    return ["run", str(env.tmp / "config.yaml")]


@case("config: file not found", 2, ("missing.yaml", "not found"))
def _(env: Env) -> list[str]:
    return ["run", str(env.tmp / "missing.yaml")]


@case("config: unknown key", 2, ("trainer.lrr", "unknown key", "lr"))
def _(env: Env) -> list[str]:
    env.cfg["trainer"]["lrr"] = 1e-4
    return ["run", env.write()]


@case("config: wrong type", 2, ("trainer.epochs", "'many'"))
def _(env: Env) -> list[str]:
    env.cfg["trainer"]["epochs"] = "many"
    return ["run", env.write()]


@case("config: bad override syntax", 2, ("trainer.lr", "section.key=value"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "trainer.lr"]


@case("config: out-of-range value", 2, ("policy.phi", "1.5"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "policy.phi=1.5"]


@case("config: run.variants=[]", 2, ("run.variants", "at least 1"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "run.variants=[]"]


@case("config: n_test=0", 2, ("task.synthetic.n_test", "empty"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "task.synthetic.n_test=0"]


@case("config: synthetic task with a data path", 2, ("task.test.path", "synthetic"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "task.test.path=test.jsonl"]


@case("config: API key inside base_url", 2, ("base_url", "api_key_env"), absent=("sk-live-123456",))
def _(env: Env) -> list[str]:
    env.cfg["teacher"].update(backend="openai", model="m", base_url="https://u:sk-live-123456@api.example/v1")
    return ["run", env.write()]


@case("config: API key given as api_key_env", 2, ("api_key_env",), absent=("sk-live-123456",))
def _(env: Env) -> list[str]:
    env.cfg["teacher"].update(backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                              api_key_env="sk-live-123456")
    return ["run", env.write()]


@case("config: api_key_env not set", 2, ("ORPO_FAULTS_UNSET_KEY", "not set"))
def _(env: Env) -> list[str]:
    env.monkeypatch.delenv("ORPO_FAULTS_UNSET_KEY", raising=False)
    env.cfg["teacher"].update(backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                              api_key_env="ORPO_FAULTS_UNSET_KEY")
    return ["run", env.write()]


@case("config: teacher.model not set", 2, ("teacher.model", "not set"))
def _(env: Env) -> list[str]:
    env.cfg["teacher"]["model"] = ""
    return ["run", env.write()]


@case("config: run.out_dir is a file", 2, ("run.out_dir", "is a file"))
def _(env: Env) -> list[str]:
    (env.tmp / "afile").write_text("x")
    env.cfg["run"]["out_dir"] = str(env.tmp / "afile")
    env.cfg["run"]["store"] = str(env.tmp / "traces.sqlite")
    return ["run", env.write()]


# ---- data ----------------------------------------------------------------------------------------------------

def _arith_files(env: Env, train: list[Any] | None = None, test: list[Any] | None = None) -> None:
    env.arith(train=write_jsonl(env.tmp / "train.jsonl", arith_rows(4) if train is None else train),
              test=write_jsonl(env.tmp / "test.jsonl", arith_rows(2, 100) if test is None else test))


@case("data: missing file", 2, ("nope.jsonl", "not found"))
def _(env: Env) -> list[str]:
    _arith_files(env)
    env.cfg["task"]["train"]["path"] = str(env.tmp / "nope.jsonl")
    return ["run", env.write()]


@case("data: bad JSON line", 2, ("train.jsonl:2", "JSON"))
def _(env: Env) -> list[str]:
    _arith_files(env, train=[arith_rows(1)[0], '{"id": "q1", "question": "What is', arith_rows(1, 5)[0]])
    return ["run", env.write()]


@case("data: missing field", 2, ("train.jsonl:1", "answer"))
def _(env: Env) -> list[str]:
    _arith_files(env, train=[{"id": "q0", "question": "What is 1 + 1?"}])
    return ["run", env.write()]


@case("data: empty file", 2, ("test.jsonl",))
def _(env: Env) -> list[str]:
    _arith_files(env)
    (env.tmp / "test.jsonl").write_text("")
    return ["run", env.write()]


@case("data: wrong answer format", 2, ("train.jsonl:1", "seven"))
def _(env: Env) -> list[str]:
    _arith_files(env, train=[{"id": "q0", "question": "What is 5 + 2?", "answer": "seven"}])
    return ["run", env.write()]


@case("data: eval --task synthetic with --data", 2, ("--data", "synthetic"))
def _(env: Env) -> list[str]:
    return ["eval", "--model", str(assets_dir() / "student"), "--task", "synthetic", "--data", "x.jsonl"]


# ---- models --------------------------------------------------------------------------------------------------

@case("model: missing local path", 2, ("student.model", "./no/such/model", "no such model folder"))
def _(env: Env) -> list[str]:
    env.cfg["student"]["model"] = "./no/such/model"
    return ["run", env.write()]


@case("model: missing path in eval", 2, ("--model", "no_such_dir/model/x", "no such model folder"))
def _(env: Env) -> list[str]:
    return ["eval", "--model", "no_such_dir/model/x", "--task", "synthetic", "--limit", "1"]


@case("model: broken config.json", 2, ("config.json", "not valid JSON"))
def _(env: Env) -> list[str]:
    d = env.model_copy("teacher")
    (d / "config.json").write_text("{not json")
    return ["run", env.write()]


@case("model: unknown model_type", 2, ("config.json", "nosuchmodel"))
def _(env: Env) -> list[str]:
    d = env.model_copy("student")
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "model_type": "nosuchmodel"}))
    return ["run", env.write()]


@case("model: missing tokenizer", 2, ("student.model", "tokenizer"))
def _(env: Env) -> list[str]:
    d = env.model_copy("student")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    return ["run", env.write()]


@case("model: only pickle weights", 2, (".bin", "safetensors"))
def _(env: Env) -> list[str]:
    d = env.model_copy("student")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return ["run", env.write()]


@case("model: device cuda without CUDA", 2, ("student.device", "'cuda'", "no CUDA"))
def _(env: Env) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env.cfg["student"]["device"] = "cuda"
    return ["run", env.write()]


@case("model: bad device name", 2, ("teacher.device", "'gpu0'"))
def _(env: Env) -> list[str]:
    env.cfg["teacher"]["device"] = "gpu0"
    return ["run", env.write()]


@case("model: GGUF file missing", 2, ("teacher.model", "q4.gguf", "not found"))
def _(env: Env) -> list[str]:
    env.cfg["teacher"]["gguf_file"] = "q4.gguf"
    return ["run", env.write()]


# ---- the trace store -----------------------------------------------------------------------------------------

def _store(env: Env) -> Path:
    p = Path(env.cfg["run"]["out_dir"]) / "traces.sqlite"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


@case("store: not a database", 2, lambda env: (str(_store(env)), "not a database"))
def _(env: Env) -> list[str]:
    _store(env).write_bytes(b"these are not the traces you are looking for\n" * 100)
    return ["run", env.write()]


@case("store: damaged file", 2, lambda env: (str(_store(env)), "damaged"))
def _(env: Env) -> list[str]:
    from orpo_distill.store import TraceStore

    with TraceStore(_store(env)):
        pass
    data = _store(env).read_bytes()
    _store(env).write_bytes(data[:100] + b"\x00garbage" * 64)  # the header survives, the pages do not
    return ["run", env.write()]


@case("store: damaged, traces stats", 2, lambda env: (str(_store(env)), "not a database"))
def _(env: Env) -> list[str]:
    _store(env).write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    return ["traces", "stats", str(_store(env))]


@case("store: path is a folder", 2, lambda env: (str(env.tmp / "adir"),))
def _(env: Env) -> list[str]:
    (env.tmp / "adir").mkdir()
    env.cfg["run"]["store"] = str(env.tmp / "adir")
    return ["run", env.write()]


def _fail_add(env: Env, message: str) -> None:
    from orpo_distill.store import TraceStore

    def add(self: Any, traces: Any) -> int:
        raise sqlite3.OperationalError(message)

    env.monkeypatch.setattr(TraceStore, "add", add)


@case("store: read-only (simulated)", 2, lambda env: (str(_store(env)), "readonly", "writable"))
def _(env: Env) -> list[str]:
    _fail_add(env, "attempt to write a readonly database")
    return ["traces", "teacher", env.write(), "--no-progress"]


@case("store: locked (simulated)", 2, lambda env: (str(_store(env)), "locked", "another process"))
def _(env: Env) -> list[str]:
    _fail_add(env, "database is locked")
    return ["traces", "teacher", env.write(), "--no-progress"]


# ---- disk ----------------------------------------------------------------------------------------------------

@case("disk: full while sampling (SQLite)", 2, lambda env: (str(_store(env)), "database or disk is full",
                                                            "free space"))
def _(env: Env) -> list[str]:
    _fail_add(env, "database or disk is full")
    return ["run", env.write(), "--no-progress"]


@case("disk: full writing an output (ENOSPC)", 2, ("config.yaml", "no space left"))
def _(env: Env) -> list[str]:
    import orpo_distill.pipeline as pipeline

    def full(path: Any, text: str) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    env.monkeypatch.setattr(pipeline, "atomic_write_text", full)
    return ["run", env.write(), "--no-progress"]


# ---- endpoints -----------------------------------------------------------------------------------------------

def _openai_teacher(env: Env, base_url: str) -> None:
    env.cfg["teacher"] = {"backend": "openai", "model": "fake-teacher", "base_url": base_url, "max_retries": 0,
                          "timeout_s": 5}


@case("endpoint: dead port (run)", 3, lambda env: (env.cfg["teacher"]["base_url"].split("/v1")[0],))
def _(env: Env) -> list[str]:
    _openai_teacher(env, f"http://127.0.0.1:{free_port()}/v1")
    return ["run", env.write(), "--no-progress"]


@case("endpoint: dead port (traces teacher)", 3, lambda env: (env.cfg["teacher"]["base_url"].split("/v1")[0],))
def _(env: Env) -> list[str]:
    _openai_teacher(env, f"http://127.0.0.1:{free_port()}/v1")
    return ["traces", "teacher", env.write(), "--no-progress"]


@pytest.fixture()
def rejecting_server():
    from fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer(reject_substring=" ") as srv:  # every prompt has a space: HTTP 400 for each
        yield srv


@case("endpoint: HTTP 400 on every prompt (run)", 3, ("fake-teacher", "4 prompts"))
def _(env: Env) -> list[str]:
    _openai_teacher(env, env.server)
    return ["run", env.write(), "--no-progress"]


@case("endpoint: HTTP 400 on every prompt (traces teacher)", 3, ("fake-teacher", "4 prompts"))
def _(env: Env) -> list[str]:
    _openai_teacher(env, env.server)
    return ["traces", "teacher", env.write(), "--no-progress"]


# ---- command-line values -------------------------------------------------------------------------------------

def _eval(*extra: str) -> list[str]:
    return ["eval", "--model", str(assets_dir() / "student"), "--task", "synthetic", *extra]


@case("cli: eval --batch-size 0", 2, ("--batch-size", "0"))
def _(env: Env) -> list[str]:
    return _eval("--batch-size", "0")


@case("cli: eval --limit -1", 2, ("--limit", "-1"))
def _(env: Env) -> list[str]:
    return _eval("--limit", "-1")


@case("cli: eval --max-new-tokens 0", 2, ("--max-new-tokens", "0"))
def _(env: Env) -> list[str]:
    return _eval("--max-new-tokens", "0")


@case("cli: eval --majority-k 0", 2, ("--majority-k", "0"))
def _(env: Env) -> list[str]:
    return _eval("--majority-k", "0")


@case("cli: eval --batch-size abc", 2, ("--batch-size", "'abc'"))
def _(env: Env) -> list[str]:
    return _eval("--batch-size", "abc")


@case("cli: eval --temperature 0", 2, ("--temperature", "0"))
def _(env: Env) -> list[str]:
    return _eval("--majority-k", "3", "--temperature", "0")


@case("cli: show-prompt --index -1", 2, ("--index", "-1"))
def _(env: Env) -> list[str]:
    return ["show-prompt", "--task", "synthetic", "--index", "-1"]


@case("cli: run --seeds 0", 2, ("--seeds", "0"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "--seeds", "0"]


@case("cli: run --sweep without '='", 2, ("--sweep", "objective.lam", "section.key=v1,v2"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "--sweep", "objective.lam"]


@case("cli: run --sweep without values", 2, ("--sweep", "lists no values"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "--sweep", "objective.lam="]


@case("cli: run --sweep unknown key", 2, ("objective.lamm", "unknown key"))
def _(env: Env) -> list[str]:
    return ["run", env.write(), "--sweep", "objective.lamm=0.1,1"]


@case("cli: report of two runs without --out", 2, ("--out",))
def _(env: Env) -> list[str]:
    env.monkeypatch.chdir(env.tmp)
    return ["report", "a", "b"]


@case("cli: unknown command", 2, ("invalid choice", "trian"))
def _(env: Env) -> list[str]:
    return ["trian", "x.yaml"]


@case("cli: train before traces", 2, ("traces.sqlite", "orpo-distill traces teacher"))
def _(env: Env) -> list[str]:
    return ["train", env.write(), "--no-progress"]


# ---- runs: settings, divergence, interrupts --------------------------------------------------------------------

def _finished_variant(env: Env, config_hash: str = "0123456789") -> Path:
    """A finished variant (result.json) made with other settings, plus the old run's results/config."""
    out = Path(env.cfg["run"]["out_dir"])
    vdir = out / "variants" / "sft_single" / "seed0"
    vdir.mkdir(parents=True)
    (vdir / "result.json").write_text(json.dumps({"variant": "sft_single", "seed": 0, "config_hash": config_hash,
                                                  "final_eval": {"accuracy": 0.5, "n": 2}}))
    (out / "results.json").write_text('{"old": true}\n')
    (out / "config.yaml").write_text("old: true\n")
    return out


def _untouched(env: Env) -> None:
    out = Path(env.cfg["run"]["out_dir"])
    assert (out / "results.json").read_text() == '{"old": true}\n'
    assert (out / "config.yaml").read_text() == "old: true\n"


@case("run: out dir holds a finished run with other settings", 2, ("sft_single", "0123456789", "--out"),
      check=_untouched)
def _(env: Env) -> list[str]:
    _finished_variant(env)
    return ["run", env.write(), "--no-progress"]


@case("demo --quick into a full demo's folder", 2, ("sft_single", "0123456789", "--out"), check=_untouched)
def _(env: Env) -> list[str]:
    _finished_variant(env)
    return ["demo", "--quick", "--out", env.cfg["run"]["out_dir"], "--no-progress"]


def _diverging(env: Env) -> None:
    """Fake stages: traces present, orpo_mixed diverges, sft_single trains (a NaN loss in its log)."""
    import orpo_distill.sampling.stage as stage
    import orpo_distill.train as train
    from orpo_distill.errors import TrainingDiverged

    class Rep:
        sampled, existing, failed_prompts, errors = 0, 8, 0, 0

    env.monkeypatch.setattr(stage, "run_traces", lambda cfg, which, progress=True: Rep())

    def run_train(cfg: Any, *, variants: Any, seeds: Any, progress: bool = True) -> list[dict[str, Any]]:
        (v,), (s,) = variants, seeds
        if v == "orpo_mixed":
            raise TrainingDiverged(f"{v} seed {s}: loss is nan at step 3")
        return [{"variant": v, "seed": s, "config_hash": "x", "model_dir": None, "costs": {},
                 "final_eval": {"accuracy": 0.5, "n": 2, "unparsed": 0},
                 "per_epoch": [{"epoch": 1, "train_loss": float("nan"), "eval": {"accuracy": 0.5}}]}]

    env.monkeypatch.setattr(train, "run_train", run_train)


def _diverged_results(env: Env) -> None:
    text = (Path(env.cfg["run"]["out_dir"]) / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    res = json.loads(text)
    assert res["variants"]["orpo_mixed"]["accuracy"] is None and res["variants"]["orpo_mixed"]["diverged"]
    assert res["variants"]["sft_single"]["accuracy"] == 0.5


@case("train: a variant diverges", 4, ("orpo_mixed seed 0", "diverged", "trainer.lr"), check=_diverged_results)
def _(env: Env) -> list[str]:
    _diverging(env)
    return ["run", env.write(), "--no-progress"]


@case("signal: Ctrl-C in-process", 130, ("interrupted", "resume"))
def _(env: Env) -> list[str]:
    import orpo_distill.sampling.stage as stage

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    env.monkeypatch.setattr(stage, "run_traces", interrupted)
    return ["run", env.write(), "--no-progress"]


# ---- the matrix ----------------------------------------------------------------------------------------------

def _record(name: str, code: int, err: str) -> None:
    path = os.environ.get("ORPO_FAULT_MATRIX")
    if path:
        message = " ".join(line.strip() for line in err.splitlines() if line.startswith("orpo-distill:")
                           or line.startswith("  "))
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": name, "code": code, "message": message}) + "\n")


def _params() -> list[Any]:
    out = []
    for name, c in CASES.items():
        marks = [pytest.mark.xfail(reason=c.xfail, strict=False)] if c.xfail else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.mark.parametrize("name", _params())
def test_fault(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               request: pytest.FixtureRequest) -> None:
    c = CASES[name]
    env = Env(tmp_path, monkeypatch, base_config(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "HTTP 400" in name:
        env.server = request.getfixturevalue("rejecting_server").base_url
    argv = c.setup(env)
    code = main(argv)
    err = capsys.readouterr().err
    _record(name, code, err)
    needles = c.needles(env) if callable(c.needles) else c.needles
    assert code == c.code, (code, err)
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    for a in c.absent:
        assert a not in err, (a, err)
    assert any(line.startswith("orpo-distill: ") for line in err.splitlines()), err
    if c.check is not None:
        c.check(env)


def test_the_matrix_is_big_enough() -> None:
    assert len(CASES) >= 40


# ---- real signals (subprocesses) -----------------------------------------------------------------------------

N_SLOW_QUESTIONS = 40


def _slow_traces_config(tmp: Path) -> Path:
    cfg = base_config(tmp)
    cfg["task"]["synthetic"]["n_train"] = N_SLOW_QUESTIONS
    cfg["teacher"]["batch_size"] = 1  # one question per committed chunk
    cfg["sampling"].update(k=4, max_new_tokens=48)
    cfg["sampling"]["rouge_threshold"] = 1.0
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orpo_distill", *args]


def _count(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM traces").fetchone()[0])
    except sqlite3.Error:
        return 0


def _start_and_wait_for_traces(cfg: Path, store: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # SIGINT back to its default in the child: a shell that starts this suite in the background (nohup cmd &)
    # hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the command
    # would sample to the end and the test would skip
    proc = subprocess.Popen(_cli("traces", "teacher", str(cfg), "--no-progress"), cwd=cfg.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while _count(store) == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no trace was written before the process ended (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)],
                         ids=["SIGINT", "SIGKILL"])
def test_signal_keeps_work_and_resumes(tmp_path: Path, sig: int, code: int) -> None:
    cfg = _slow_traces_config(tmp_path)
    store = tmp_path / "run" / "traces.sqlite"
    proc = _start_and_wait_for_traces(cfg, store)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    kept = _count(store)
    _record(f"signal: {signal.Signals(sig).name} mid-sampling (subprocess)", proc.returncode, err)
    if proc.returncode == 0:
        pytest.skip("the process finished before the signal arrived (a very fast machine)")
    assert proc.returncode == code, err
    assert kept > 0
    if sig == signal.SIGINT:
        assert "Traceback" not in err, err
        assert "interrupted" in err and "resume" in err
        return
    # after kill -9 the same command resumes: what was committed is kept, only the rest is sampled
    done = subprocess.run(_cli("traces", "teacher", str(cfg), "--no-progress"), cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert f"{kept} already in the store" in done.stdout
    assert _count(store) == N_SLOW_QUESTIONS * 4


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    p = subprocess.run(_cli("config", "show"), text=True, capture_output=True, timeout=120)
    assert p.returncode == 0 and "trainer:" in p.stdout
    p = subprocess.run(_cli("run", str(tmp_path / "none.yaml")), text=True, capture_output=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("orpo-distill: ") and "none.yaml" in p.stderr
