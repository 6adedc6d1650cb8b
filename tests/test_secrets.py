"""secrets.py and its use everywhere: credentials in URLs (userinfo, `?api_key=`, `key=`, `token=`,
`access_token=`) and keys pasted where an environment variable NAME belongs are refused without being repeated,
and redacted from messages, logs, stored provenance and every file of a run directory."""

from __future__ import annotations

import logging

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer
from sampling_helpers import AddTask, add_questions

from orpo_distill.cli import main
from orpo_distill.config import ConfigError, ModelConfig, load_config
from orpo_distill.errors import UserError
from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.openai_api import OpenAIGenerator
from orpo_distill.sampling.stage import SamplingIncomplete, sample_to_store
from orpo_distill.secrets import check_env_var_name, check_url, redact_text, redact_url
from orpo_distill.store import TraceStore

SECRET = "Zq81SECRETvalue4412abcXYZ"  # key-shaped (mixed case and digits, 25 characters)
KEY = "sk-proj-" + SECRET


@pytest.mark.parametrize("url, shown", [
    ("http://localhost:8000/v1", "http://localhost:8000/v1"),
    ("https://api.example.com/v1?api-version=2024-06-01", "https://api.example.com/v1?api-version=2024-06-01"),
    (f"https://user:{SECRET}@api.example.com/v1", "https://***@api.example.com/v1"),
    (f"https://{KEY}@api.example.com/v1", "https://***@api.example.com/v1"),
    (f"https://h/v1?api_key={SECRET}&x=1", "https://h/v1?api_key=***&x=1"),
    (f"https://h/v1?key={SECRET}", "https://h/v1?key=***"),
    (f"https://h/v1?token={SECRET}", "https://h/v1?token=***"),
    (f"https://h/v1?access_token={SECRET}&api-version=1", "https://h/v1?access_token=***&api-version=1"),
    (f"https://h/v1?x-api-key={SECRET}", "https://h/v1?x-api-key=***"),
    (f"https://h/v1?q={KEY}", "https://h/v1?q=***"),
    (f"https://h/{KEY}/v1", "https://h/***/v1"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    if url != shown:
        with pytest.raises(UserError) as ei:
            check_url(url)
        assert SECRET not in str(ei.value) and shown in str(ei.value)
    else:
        assert check_url(url) == url


def test_redact_text_hides_urls_key_shapes_assignments_and_known_values():
    text = (f"POST https://u:{SECRET}@h/v1?token=abcd1234 failed; Authorization: Bearer {KEY}; api_key={SECRET}; "
            f"raw {KEY} and a custom one: plainvalue99; max_tokens=512 prompt_tokens: 7")
    out = redact_text(text, secrets=["plainvalue99"])
    assert SECRET not in out and "abcd1234" not in out and "plainvalue99" not in out
    assert "max_tokens=512" in out and "prompt_tokens: 7" in out and "https://***@h/v1?token=***" in out


@pytest.mark.parametrize("value", [KEY, SECRET, "hf_" + "a1B2" * 8, "1ABC", "MY KEY", "A-B", ""])
def test_a_key_or_a_non_name_where_a_variable_name_belongs_is_refused_unrepeated(value):
    with pytest.raises(UserError) as ei:
        check_env_var_name(value)
    msg = str(ei.value)
    assert "NAME of an environment variable" in msg and "not shown" in msg
    if value:
        assert value not in msg


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "_x", "Teacher_Key_2"])
def test_variable_names_are_accepted(name):
    assert check_env_var_name(name) == name


def _config(tmp_path, **teacher) -> str:
    cfg = {"run": {"out_dir": str(tmp_path / "run")}, "task": {"name": "synthetic", "train": {"limit": 3}},
           "teacher": {"model": "fake-teacher", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                       "max_retries": 0, "timeout_s": 5, **teacher},
           "student": {"model": "unused", "backend": "hf"}, "sampling": {"k": 2, "max_new_tokens": 8}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("teacher, overrides", [
    ({"base_url": f"http://127.0.0.1:9/v1?api_key={SECRET}"}, []),
    ({"base_url": f"http://127.0.0.1:9/v1?key={SECRET}"}, []),
    ({"base_url": f"http://127.0.0.1:9/v1?token={SECRET}"}, []),
    ({"base_url": f"http://127.0.0.1:9/v1?access_token={SECRET}"}, []),
    ({"base_url": f"http://admin:{SECRET}@127.0.0.1:9/v1"}, []),
    ({"api_key_env": KEY}, []),
    ({"api_key_env": SECRET}, []),
    ({"model": KEY}, []),
    ({}, [f"teacher.api_key_env={SECRET}"]),
    ({}, [f"teacher.base_url=http://127.0.0.1:9/v1?api_key={SECRET}"]),
])
def test_config_refuses_secrets_and_never_prints_them(tmp_path, capsys, teacher, overrides):
    path = _config(tmp_path, **teacher)
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    assert SECRET not in str(ei.value)
    assert "environment variable" in str(ei.value)
    for argv in (["config", "show", path, *overrides], ["traces", "teacher", path, *overrides, "--no-progress"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert SECRET not in out.out and SECRET not in out.err and "environment variable" in out.err
    assert not (tmp_path / "run").exists()  # nothing was written: no config.yaml holding the key


def test_the_generator_refuses_them_too(monkeypatch):
    with pytest.raises(UserError) as ei:
        OpenAIGenerator(model="m", base_url=f"http://127.0.0.1:9/v1?api_key={SECRET}")
    assert SECRET not in str(ei.value)
    with pytest.raises(UserError) as ei:
        OpenAIGenerator(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY)
    assert SECRET not in str(ei.value)
    with pytest.raises(ValueError):  # pydantic wraps it; the section is named, the value is not echoed
        ModelConfig(model="m", api_key_env=KEY)


def test_the_key_is_in_no_file_log_or_message_of_a_failing_run(tmp_path, monkeypatch, caplog, capsys):
    """A careless server that echoes the Authorization header in its 400 bodies: the stage's error quotes the
    server's message, with the key redacted; no file in the run dir, no log line and no output holds it."""
    monkeypatch.setenv("ORPO_TEST_TEACHER_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key=KEY, echo_auth=True, reject_substring="fake-teacher") as srv:
        path = _config(tmp_path, base_url=srv.base_url, api_key_env="ORPO_TEST_TEACHER_KEY")
        assert main(["traces", "teacher", path, "--no-progress"]) == 3
        assert all(h == f"Bearer {KEY}" for h in srv.stats.auth_headers)  # the key was really sent
        assert main(["config", "show", path]) == 0
        # and the store's provenance, for a generator built directly
        with TraceStore(tmp_path / "direct.sqlite") as store:
            g = OpenAIGenerator(model="fake-teacher", base_url=srv.base_url, api_key_env="ORPO_TEST_TEACHER_KEY",
                                max_retries=0)
            with pytest.raises(SamplingIncomplete) as ei:
                sample_to_store(g, AddTask(), add_questions(2), SamplingParams(n=1), store, role="teacher",
                                source="teacher", progress=False)
            assert ei.value.exit_code == 3 and "received Authorization: Bearer ***" in str(ei.value)
    out = capsys.readouterr()
    assert "HTTP 400" in out.err and "received Authorization: Bearer ***" in out.err
    texts = [out.out, out.err, caplog.text]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "traces.sqlite" for f in files)
    texts += [f.read_bytes().decode("utf-8", "replace") for f in files]
    for t in texts:
        assert SECRET not in t


@pytest.mark.parametrize("name", ["TinyLlama/TinyLlama-1.1B-Chat-v1.0", "org/model-sk-finetuned-version-two",
                                  "meta-llama/Llama-3.1-8B-Instruct", "/models/hf-internal-testing/tiny"])
def test_model_names_are_not_mistaken_for_keys(name):
    assert redact_text(name) == name
    assert ModelConfig(model=name).model == name
