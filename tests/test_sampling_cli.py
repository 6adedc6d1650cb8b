"""`orpo-distill traces teacher|student|stats|export` end to end: the synthetic task, a teacher behind a loopback
OpenAI-compatible server, a tiny local student; resume makes zero calls; a dead endpoint stops with exit code 3;
bad settings are one clear line."""

from __future__ import annotations

import json

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults

from orpo_distill.cli import main
from orpo_distill.store import TraceStore

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp_path, base_url: str, student_dir, **teacher) -> str:
    cfg = {
        "run": {"out_dir": str(tmp_path / "run")},
        "task": {"name": "synthetic", "train": {"limit": 5}},
        "teacher": {"model": "fake-teacher", "backend": "openai", "base_url": base_url, "max_retries": 1,
                    "timeout_s": 5, **teacher},
        "student": {"model": str(student_dir), "backend": "hf", "template": "plain", "batch_size": 2,
                    "device": "cpu"},
        "sampling": {"k": 3, "student_k": 2, "max_new_tokens": 12, "temperature": 0.8},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_traces_commands_end_to_end(tmp_path, tiny_gpt2_dir, capsys):
    with FakeOpenAIServer(Faults(rate=0.3, kinds=("500", "malformed"), seed=2)) as srv:
        cfg = write_config(tmp_path, srv.base_url, tiny_gpt2_dir)
        assert main(["traces", "teacher", cfg, "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "15 traces requested: 0 already in the store, 15 sampled" in out
        assert f"{srv.stats.injected} request errors" in out
        requests = srv.stats.requests
        assert main(["traces", "teacher", cfg, "--no-progress"]) == 0  # resume: nothing to do, no request
        assert "15 already in the store, 0 sampled" in capsys.readouterr().out
        assert srv.stats.requests == requests
    assert main(["traces", "student", cfg]) == 0  # with the progress bar
    captured = capsys.readouterr()
    assert "10 traces requested: 0 already in the store, 10 sampled" in captured.out
    assert "prompt" in captured.err  # tqdm wrote its bar to stderr

    store = tmp_path / "run" / "traces.sqlite"
    for target in (cfg, str(store)):
        assert main(["traces", "stats", target, "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["groups"]["teacher/teacher"]["traces"] == 15
        assert stats["groups"]["student/initial"]["traces"] == 10
    assert main(["traces", "stats", cfg]) == 0
    assert "student/initial" in capsys.readouterr().out
    assert main(["traces", "export", cfg, "--out", str(tmp_path / "all.jsonl")]) == 0
    assert "wrote 25 traces" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(rows) == 25 and {r["role"] for r in rows} == {"teacher", "student"}
    with TraceStore(store) as s:
        student = s.traces(role="student")
        assert all(t.source == "initial" and t.model_id == str(tiny_gpt2_dir) for t in student)
        assert all(t.revision.startswith("local:") and "+fmt:" in t.revision for t in student)
        assert all(t.model_id == "fake-teacher" for t in s.traces(role="teacher"))


def test_dead_endpoint_exits_3_with_a_clear_message(tmp_path, tiny_gpt2_dir, capsys):
    with FakeOpenAIServer(Faults(down_after=2)) as srv:
        cfg = write_config(tmp_path, srv.base_url, tiny_gpt2_dir, concurrency=1, max_retries=0)
        assert main(["traces", "teacher", cfg, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "failed 1 times in a row; last error: HTTP 503" in err
    assert "Run the same command again" in err
    with TraceStore(tmp_path / "run" / "traces.sqlite") as s:
        assert len(s) == 6  # the two answered questions are kept


@pytest.mark.parametrize("teacher, message", [
    ({"api_key_env": "ORPO_TEST_UNSET_VAR"}, "'ORPO_TEST_UNSET_VAR', which is not set"),
    ({"endpoint": "completions", "template": "chat"}, "needs the model's tokenizer"),
])
def test_bad_settings_are_one_line(tmp_path, tiny_gpt2_dir, capsys, monkeypatch, teacher, message):
    monkeypatch.delenv("ORPO_TEST_UNSET_VAR", raising=False)
    cfg = write_config(tmp_path, "http://127.0.0.1:9/v1", tiny_gpt2_dir, **teacher)
    assert main(["traces", "teacher", cfg, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert main(["traces", "stats", str(tmp_path / "nothing.yaml")]) == 2
    assert main(["traces", "stats", cfg]) == 2  # no store yet
    assert "no trace store at" in capsys.readouterr().err


def test_traces_exit_3_with_the_servers_reason_when_prompts_fail(tmp_path, tiny_gpt2_dir, capsys):
    """Every prompt rejected (HTTP 400): exit 3 quoting the status and the server's message (was: exit 0).
    Some rejected: the others' traces are kept and reported, and the exit code is still 3."""
    with FakeOpenAIServer(reject_substring="fake-teacher") as srv:  # in every request body: all fail
        cfg = write_config(tmp_path, srv.base_url, tiny_gpt2_dir, max_retries=0)
        assert main(["traces", "teacher", cfg, "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert "every one of the 5 prompts to sample failed" in captured.err
    assert "5 x HTTP 400: this prompt is too long for the context window" in captured.err
    assert "5 prompts failed" in captured.out  # the report of what happened
    with FakeOpenAIServer(reject_substring="Finn has") as srv:  # 3 of the 5 questions
        cfg = write_config(tmp_path, srv.base_url, tiny_gpt2_dir, max_retries=0)
        assert main(["traces", "teacher", cfg, "--no-progress"]) == 3
        err = capsys.readouterr().err
        assert "3 of 5 prompts failed (3 x HTTP 400" in err and "6 new traces of the others are kept" in err
    with TraceStore(tmp_path / "run" / "traces.sqlite") as s:
        assert len(s) == 6
        runs = s.stats()["runs"]["teacher/teacher"]
        assert runs["calls"] == 2 and runs["aborted_calls"] == 2 and runs["sampled"] == 6
