"""The command line as a user meets it: help for every command and flag, one spelling of the task flags across
`eval`/`score`/`show-prompt`, the one error path (`--debug` for tracebacks; bugs keep theirs), and model loading
errors that name the path."""

from __future__ import annotations

import argparse
import json

import pytest

from orpo_distill import cli
from orpo_distill.cli import build_parser, main
from orpo_distill.config import ConfigError
from orpo_distill.errors import UserError


def _subparsers(p: argparse.ArgumentParser, prefix: str = "orpo-distill"):
    yield prefix, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _subparsers(sp, f"{prefix} {name}")


def test_help_is_for_users_every_command_and_flag():
    ap = build_parser()
    assert "No logic" not in (ap.description or "") and "distil" in ap.description.lower()
    commands = 0
    for name, p in _subparsers(ap):
        assert p.format_help()  # renders (a stray % in a help text would raise here)
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:  # each command's one-line summary
                    assert choice.help and len(choice.help) > 15, (name, choice.dest)
                    commands += 1
                continue
            assert a.help and len(a.help) > 10, (name, a.dest)
    assert commands >= 13  # run demo traces(4) config eval train report score show-prompt


def test_task_flags_are_spelled_the_same_in_eval_score_and_show_prompt():
    ap = build_parser()
    subs = dict(_subparsers(ap))
    shape = {}
    for cmd in ("eval", "score", "show-prompt"):
        acts = {a.dest: a for a in subs[f"orpo-distill {cmd}"]._actions}
        for dest in ("task", "data", "split", "kind", "grader", "fields", "skip_invalid"):
            assert dest in acts, (cmd, dest)
        f = acts["fields"]
        shape[cmd] = (type(f).__name__, f.nargs, f.help)
    assert len(set(shape.values())) == 1, shape
    # both spellings give the same map
    assert cli._parse_fields(["question=q", "answer=a"]) == cli._parse_fields(["question=q,answer=a"]) == {
        "question": "q", "answer": "a"}


def test_eval_takes_skip_invalid_and_space_separated_fields(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "nums.jsonl"
    rows = [json.dumps({"q": f"Tom has {i} apples and buys 4 more. How many?", "a": i + 4}) for i in range(3)]
    rows.insert(1, json.dumps({"q": "no answer here"}))
    data.write_text("\n".join(rows) + "\n")
    argv = ["eval", "--model", str(tiny_llama_dir), "--task", "numeric", "--data", str(data), "--fields",
            "question=q", "answer=a", "--max-new-tokens", "2", "--template", "plain", "--no-progress"]
    assert main(argv) == 2  # the bad row stops it, and the message says how to skip it
    assert "--skip-invalid" in capsys.readouterr().err
    assert main([*argv, "--skip-invalid"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 3


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing.yaml")
    assert main(["run", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orpo-distill: ") and "missing.yaml" in err and "Traceback" not in err
    for argv in (["--debug", "run", missing], ["run", missing, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "orpo-distill: config file not found" in err

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_config", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["config", "show"])


def test_user_errors_share_one_hierarchy():
    assert issubclass(ConfigError, UserError) and UserError.exit_code == 2


def test_config_reference_and_show(capsys):
    assert main(["config", "reference"]) == 0
    assert "`trainer.lr`" in capsys.readouterr().out
    assert main(["config", "reference", "x.yaml"]) == 2
    assert main(["config", "show", "trainer.lr=2e-5"]) == 0  # overrides of the defaults, no config file
    assert "lr: 2.0e-05" in capsys.readouterr().out
    # a secret in an override is refused without being repeated
    assert main(["config", "show", "teacher.base_url=https://u:sk-abcdefgh123456@x.example/v1"]) == 2
    err = capsys.readouterr().err
    assert "base_url" in err and "sk-abcdefgh123456" not in err


def test_report_of_several_runs_needs_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "a", "b"]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


# ---- models ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,local", [
    ("gpt2", False), ("HuggingFaceTB/SmolLM2-360M", False), ("./model", True), ("../m", True), ("/abs/m", True),
    ("~/m", True), ("runs/demo/variants/x", True), ("a\\b", True), ("org/name/", True),
])
def test_local_looking_paths_are_never_hub_ids(src, local):
    from orpo_distill.models import looks_local

    assert looks_local(src) is local


def test_loading_failures_name_the_path(tmp_path, tiny_llama_dir):
    import shutil

    from orpo_distill.config import ModelConfig
    from orpo_distill.models import load_model, load_tokenizer

    with pytest.raises(UserError, match=r"\./nope/model: no such model folder"):
        load_model(ModelConfig(model="./nope/model"))
    with pytest.raises(UserError, match="no such model folder"):
        load_tokenizer(ModelConfig(model=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "config.json").write_text("{oops")
    with pytest.raises(UserError, match=str(broken)):
        load_model(ModelConfig(model=str(broken)))


def test_overrides_may_follow_options(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 0.001\n")
    assert main(["config", "show", str(p), "policy.phi=0.25"]) == 0
    assert "phi: 0.25" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "none.yaml"), "--no-progress", "trainer.lr=1e-5"]) == 2
    assert "config file not found" in capsys.readouterr().err  # the override was taken, not refused
    assert main(["run", str(p), "--no-progress", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_permission_and_read_only_errors_are_messages(tmp_path, capsys, monkeypatch):
    import errno

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "results.json"))

    monkeypatch.setattr(cli, "cmd_config", denied)
    assert main(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Permission denied" in err and "Traceback" not in err

    def other(args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cli, "cmd_config", other)
    with pytest.raises(OSError):  # not the user's to fix: a traceback for the bug report
        main(["config", "show"])


def test_check_model_accepts_remote_code_architectures_only_when_trusted(tmp_path, tiny_llama_dir):
    import shutil

    from orpo_distill.config import ModelConfig
    from orpo_distill.models import check_model

    d = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, d)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "model_type": "mine",
                                               "auto_map": {"AutoConfig": "conf.MyConfig"}}))
    with pytest.raises(UserError, match="'mine' is not known"):
        check_model(ModelConfig(model=str(d)))
    check_model(ModelConfig(model=str(d), trust_remote_code=True))
    check_model(ModelConfig(model="org/hub-model"))  # hub ids are checked when they load, not here
