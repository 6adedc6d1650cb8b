"""The OpenAI-compatible backend against a real HTTP server on loopback that injects faults.

Checks: correct results with 429/500/timeouts/malformed/truncated/dropped responses (identical to a fault-free
run) and an error count equal to what the server injected; a clear stop with the work kept when the endpoint stays
down, and a resume that completes it; the API key never in the store, the export, logs, output or errors; request
budgets; servers that ignore `n`; the completions endpoint; per-prompt 400s; usage and cost.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from fake_openai_server import FAULT_KINDS, FakeOpenAIServer, Faults, fake_completion, free_port
from sampling_helpers import AddTask, add_questions, comparable

from orpo_distill.config import ModelConfig
from orpo_distill.sampling.base import GenerationFailed, SamplingParams, sample_seed
from orpo_distill.sampling.openai_api import OpenAIGenerator, _Bucket
from orpo_distill.sampling.stage import SamplingAborted, SamplingIncomplete, make_generator, sample_to_store
from orpo_distill.store import TraceStore
from orpo_distill.tasks.prompts import render_prompt

pytest.importorskip("openai")

P = SamplingParams(n=3, temperature=0.8, max_new_tokens=64, seed=5)
KEY = "sk-test-Zq81SECRETvalue4412"


def client(url: str, **kw) -> OpenAIGenerator:
    args = dict(model="fake", base_url=url, concurrency=4, max_retries=3, timeout_s=5.0, backoff_base_s=0.01,
                backoff_max_s=0.05)
    args.update(kw)
    return OpenAIGenerator(**args)


def run_stage(gen, store, questions, **kw):
    return sample_to_store(gen, AddTask(), questions, P, store, role="teacher", source="teacher", progress=False,
                           **kw)


@pytest.fixture(scope="module")
def clean_traces(tmp_path_factory):
    """The traces of a fault-free run: what every faulty run must end with."""
    path = tmp_path_factory.mktemp("clean") / "t.sqlite"
    with FakeOpenAIServer() as srv, TraceStore(path) as store:
        r = run_stage(client(srv.base_url), store, add_questions(24))
        assert r.errors == 0 and r.sampled == 72 and srv.stats.injected == 0
        return comparable(store.traces())


def test_clean_run_results_grading_usage_and_cost(tmp_path, clean_traces):
    qs = add_questions(4)
    with FakeOpenAIServer() as srv, TraceStore(tmp_path / "t.sqlite") as store:
        g = client(srv.base_url, cost_per_1k_input=2.0, cost_per_1k_output=10.0)
        r = run_stage(g, store, qs)
        ts = store.traces()
        # One request per question (n=3 in it), seeded from the run seed, the message and sample index 0.
        assert srv.stats.requests == 4 and all(b["n"] == 3 for b in srv.stats.bodies)
        msg = AddTask().user_message(qs[0])
        seed0 = sample_seed(P.seed, msg, 0) & 0x7FFFFFFF
        assert [t.completion for t in ts[:3]] == [fake_completion(msg, seed0, i) for i in range(3)]
        body = next(b for b in srv.stats.bodies if b["messages"][0]["content"] == msg)  # concurrent: any order
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["model"]) == (0.8, 1.0, 64, "fake")
        assert body["messages"] == [{"role": "user", "content": msg}]
        for t in ts:
            expected = t.completion.split("The answer is ")[1].rstrip(".")
            assert t.answer == expected
            assert t.verdict == ("correct" if expected == next(q.gold for q in qs if q.id == t.question_id)
                                 else "wrong")
        assert {t.verdict for t in ts} == {"correct", "wrong"}
        prompt_tokens = 4 * len(msg.split())
        completion_tokens = sum(len(t.completion.split()) for t in ts)
        assert (r.prompt_tokens, r.completion_tokens) == (prompt_tokens, completion_tokens)
        assert sum(t.n_tokens for t in ts) == completion_tokens
        assert r.cost_usd == pytest.approx(prompt_tokens / 1000 * 2.0 + completion_tokens / 1000 * 10.0)
        assert store.stats()["cost_usd"] == pytest.approx(r.cost_usd)
        assert comparable(ts) == clean_traces[:12]
        # A second identical run makes zero requests.
        r2 = run_stage(g, store, qs)
        assert r2.sampled == 0 and srv.stats.requests == 4


def test_faults_are_survived_with_identical_results_and_honest_counts(tmp_path, clean_traces):
    faults = Faults(rate=0.35, seed=11, slow_s=2.5)
    with FakeOpenAIServer(faults) as srv, TraceStore(tmp_path / "t.sqlite") as store:
        g = client(srv.base_url, timeout_s=1.0, max_retries=12)
        r = run_stage(g, store, add_questions(24))
        assert comparable(store.traces()) == clean_traces
        injected = dict(srv.stats.faults)
    assert set(injected) == set(FAULT_KINDS), injected  # every kind happened at least once
    assert r.errors == srv.stats.injected == sum(injected.values()) and r.failed_prompts == 0
    expected_kinds = {"http_429": injected["429"], "http_500": injected["500"], "timeout": injected["timeout"],
                      "malformed": injected["malformed"] + injected["truncated"] + injected["no_choices"],
                      "connection": injected["disconnect"]}
    assert g.errors_by_kind == expected_kinds
    assert srv.stats.requests == 24 + srv.stats.injected  # each fault cost exactly one retry
    with TraceStore(tmp_path / "t.sqlite") as store:
        assert store.stats()["errors"] == r.errors


def test_endpoint_down_stops_clearly_keeps_work_and_resumes(tmp_path, clean_traces):
    path = tmp_path / "t.sqlite"
    qs = add_questions(24)
    with FakeOpenAIServer(Faults(down_after=10)) as srv, TraceStore(path) as store:
        g = client(srv.base_url, max_retries=2, chunk_prompts=8)
        with pytest.raises(SamplingAborted) as ei:
            run_stage(g, store, qs)
        msg = str(ei.value)
        assert f"the endpoint {srv.base_url} (model 'fake') failed 3 times in a row" in msg
        assert "HTTP 503" in msg and "Run the same command again" in msg
        kept = len(store)
        assert kept == 30  # 10 answered requests x 3 samples, the partial chunk included
        assert ei.value.report.sampled == 30
    # Nothing listening at all: connection errors, same clear stop, nothing lost.
    with TraceStore(path) as store:
        dead = client(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
        with pytest.raises(SamplingAborted, match=r"failed 2 times in a row; last error: connection error"):
            run_stage(dead, store, qs)
        assert len(store) == kept
    with FakeOpenAIServer() as srv, TraceStore(path) as store:
        r = run_stage(client(srv.base_url), store, qs)
        assert (r.existing, r.sampled) == (30, 42) and srv.stats.requests == 14
        assert comparable(store.traces()) == clean_traces
        assert store.stats()["runs"]["teacher/teacher"]["aborted_calls"] == 2


def test_api_key_never_leaks(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", KEY)
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "t.sqlite"
    faults = Faults(rate=0.5, kinds=("429", "500"), seed=3, down_after=12)
    # A careless server: it requires the key and echoes the Authorization header in every error body.
    with FakeOpenAIServer(faults, api_key=KEY, echo_auth=True) as srv, TraceStore(path) as store:
        cfg = ModelConfig(model="fake", backend="openai", base_url=srv.base_url, api_key_env="TEACHER_KEY_FOR_TEST",
                          max_retries=2, concurrency=2)
        g = make_generator(cfg, backoff_base_s=0.01, backoff_max_s=0.02)
        with pytest.raises(SamplingAborted) as ei:
            run_stage(g, store, add_questions(10))
        assert all(h == f"Bearer {KEY}" for h in srv.stats.auth_headers)  # the key was really used
        assert len(store) > 0 and g.error_count > 0
        store.export_jsonl(tmp_path / "export.jsonl")
        texts = [str(ei.value), repr(ei.value), repr(g), repr(cfg), caplog.text, str(store.stats()),
                 str(g.errors_by_kind)]
    # A wrong key: a clear message naming the variable, not the value.
    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", KEY + "-wrong")
    with FakeOpenAIServer(api_key=KEY, echo_auth=True) as srv:
        g = client(srv.base_url, api_key_env="TEACHER_KEY_FOR_TEST")
        with pytest.raises(GenerationFailed, match="check the key in the environment variable "
                                                   "'TEACHER_KEY_FOR_TEST'") as e2:
            g.generate(["hello"], P)
        texts += [str(e2.value)]
    out = capsys.readouterr()
    texts += [out.out, out.err]
    for f in tmp_path.rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("utf-8", "replace"))
    assert any("sqlite" in str(f) for f in tmp_path.rglob("*"))
    for t in texts:
        assert KEY not in t and "Zq81SECRET" not in t


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="'NO_SUCH_KEY_VAR', which is not set"):
        OpenAIGenerator(model="m", base_url="http://127.0.0.1:1/v1", api_key_env="NO_SUCH_KEY_VAR")


def test_server_that_ignores_n_is_asked_again(tmp_path, clean_traces):
    with FakeOpenAIServer(honour_n=False) as srv, TraceStore(tmp_path / "t.sqlite") as store:
        r = run_stage(client(srv.base_url), store, add_questions(2))
        assert r.sampled == 6 and srv.stats.requests == 6
        # Each follow-up request is seeded from the first sample index it still needs.
        msg = AddTask().user_message(add_questions(1)[0])
        got = [t.completion for t in store.traces(question_ids=["q0000"])]
        assert got == [fake_completion(msg, sample_seed(P.seed, msg, i) & 0x7FFFFFFF, 0) for i in range(3)]


def test_completions_endpoint_uses_the_plain_template(tmp_path):
    with FakeOpenAIServer() as srv:
        g = client(srv.base_url, endpoint="completions")
        res = g.generate(["What is 2 + 3?"], SamplingParams(n=2, max_new_tokens=4, stop=("plus",)))
        body = srv.stats.bodies[0]
    assert body["prompt"] == "Question: What is 2 + 3?\nAnswer:\n" and body["stop"] == ["plus"]
    assert len(res[0]) == 2 and all("plus" not in c.text for c in res[0])
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        client("http://x/v1", endpoint="completions", template="chat")


def test_completions_endpoint_sends_the_system_prompt_before_the_question():
    # A base model served behind /v1/completions gets its instructions / worked examples as the in-process
    # backend renders them (render_prompt, plain template), not silently dropped.
    shots = "Question: What is 1 + 1?\nAnswer:\n2\n"
    with FakeOpenAIServer() as srv:
        client(srv.base_url, endpoint="completions", system_prompt=shots).generate(
            ["What is 2 + 3?"], SamplingParams(n=1, max_new_tokens=4))
        body = srv.stats.bodies[0]
    assert body["prompt"] == render_prompt(None, "What is 2 + 3?", "plain", shots)
    assert body["prompt"] == shots + "\nQuestion: What is 2 + 3?\nAnswer:\n"


def test_a_prompt_that_cannot_succeed_keeps_the_others_and_is_reported(tmp_path):
    qs = add_questions(5)
    poison = AddTask().user_message(qs[2]).split("?")[0]
    with FakeOpenAIServer(reject_substring=poison) as srv, TraceStore(tmp_path / "t.sqlite") as store:
        # by default a partial failure is an error (exit 3) that keeps the others' traces and gives the reason
        with pytest.raises(SamplingIncomplete) as ei:
            run_stage(client(srv.base_url), store, qs)
        msg = str(ei.value)
        assert "1 of 5 prompts failed" in msg and "HTTP 400: this prompt is too long" in msg
        assert ei.value.exit_code == 3 and ei.value.report.sampled == 12
        assert len(store) == 12 and "q0002" not in {t.question_id for t in store.traces()}
        assert store.stats()["runs"]["teacher/teacher"]["aborted_calls"] == 1
        # tolerated when asked: the same call returns its report
        r = run_stage(client(srv.base_url), store, qs, allow_failed_prompts=True)
        assert r.failed_prompts == 1 and r.sampled == 0 and r.errors == 1 and r.existing == 12
        assert store.stats()["runs"]["teacher/teacher"]["calls"] == 2  # the second call paid: recorded too


def test_every_prompt_failing_is_an_endpoint_error_with_the_servers_reason(tmp_path):
    qs = add_questions(4)
    with FakeOpenAIServer(reject_substring="What is") as srv, TraceStore(tmp_path / "t.sqlite") as store:
        for allow in (False, True):  # nothing obtained is an error even when partial failures are tolerated
            with pytest.raises(SamplingIncomplete) as ei:
                run_stage(client(srv.base_url), store, qs, allow_failed_prompts=allow)
            msg = str(ei.value)
            assert "every one of the 4 prompts to sample failed" in msg
            assert "4 x HTTP 400: this prompt is too long for the context window" in msg
            assert ei.value.exit_code == 3 and len(store) == 0
        runs = store.stats()["runs"]["teacher/teacher"]
        assert runs["calls"] == 2 and runs["errors"] == 8 and runs["aborted_calls"] == 2


def test_token_bucket_paces_requests(monkeypatch):
    """Fake clock: 120 requests/minute = 2/s with a burst of 30; 34 requests need 2 s of waiting."""
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(s):
        slept.append(s)
        now[0] += s

    monkeypatch.setattr("orpo_distill.sampling.openai_api.time.monotonic", lambda: now[0])
    monkeypatch.setattr("orpo_distill.sampling.openai_api.asyncio.sleep", fake_sleep)

    async def go():
        b = _Bucket(120)
        for _ in range(34):
            await b.acquire(1)
        assert now[0] == pytest.approx(2.0)
        b.charge(10)  # a debt: the next request waits for it
        t = now[0]
        await b.acquire(1)
        assert now[0] - t == pytest.approx(5.5)
        assert await b.acquire(10**9) == b.capacity  # never asks for more than fits

    asyncio.run(go())
