"""Several teachers and endpoint replicas: `teacher:` as a list (config parsing, located errors, unchanged hashes for
a single mapping), the pooled ROUGE-L filter across teachers, replica failover in the OpenAI backend, and a whole
run with a local teacher plus one behind the loopback OpenAI server with two replicas, one of them dead, with the
per-teacher stats checked against the store."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults

from orpo_distill.config import ConfigError, config_from_dict, dump_config, load_config, teachers_of


def _dead_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- config ------------------------------------------------------------------------------------------------------

def test_single_teacher_mapping_keeps_its_meaning_and_hashes():
    from orpo_distill.run_traces import model_revision, teacher_identity, teacher_queries, teacher_query
    from orpo_distill.train import HASH_CLASSES, _keys_of_class, config_leaves

    cfg = config_from_dict({"teacher": {"model": "org/t", "backend": "openai", "base_url": "http://127.0.0.1:1/v1"},
                            "student": {"model": "org/s"}})
    # what the hashes are computed from is what it was before teacher lists existed (the same keys with the same
    # scalar values, the same [model id, revision] identity), so existing stores, run folders and checkpoints of
    # single-teacher configs stay valid (checked against the old hash values when lists were added)
    weights = _keys_of_class(cfg, "weights")
    list_only = {"teacher.k", "teacher.temperature", "teacher.top_p", "teacher.max_new_tokens"}
    assert set(weights) == {k for k in config_leaves() if HASH_CLASSES[k] == "weights"} - list_only
    assert {k: v for k, v in weights.items() if k.startswith("teacher.")} == \
           {f"teacher.{k}": getattr(cfg.teacher, k) for k in ("model", "revision", "gguf_file", "template",
                                                             "system_prompt", "endpoint")}
    assert teacher_identity(cfg) == list(model_revision(cfg.teacher)) == ["org/t", "unpinned"]
    assert not isinstance(cfg.teacher, list) and cfg.teacher.model == "org/t"
    (t,) = teachers_of(cfg)
    assert t.model == "org/t" and t.k is None and t.base_urls == ["http://127.0.0.1:1/v1"]
    assert teacher_queries(cfg) == [teacher_query(cfg)] and teacher_query(cfg).k == cfg.sampling.k
    assert "\n  - " not in dump_config(cfg).split("teacher:")[1].split("student:")[0]  # still a mapping


def test_teacher_list_parses_with_own_k_and_params_and_round_trips(tmp_path):
    from orpo_distill.run_traces import teacher_queries
    from orpo_distill.train import config_hash

    data = {"teacher": [{"model": "org/a", "k": 2, "temperature": 0.5},
                        {"model": "b", "backend": "openai", "base_url": ["http://127.0.0.1:1/v1",
                                                                         "http://127.0.0.1:2/v1"]}],
            "sampling": {"k": 4}}
    cfg = config_from_dict(data)
    a, b = teachers_of(cfg)
    assert (a.k, a.temperature, b.k, b.base_urls) == (2, 0.5, None, ["http://127.0.0.1:1/v1",
                                                                     "http://127.0.0.1:2/v1"])
    qa, qb = teacher_queries(cfg)
    assert (qa.k, dict(qa.params)["temperature"], qb.k, dict(qb.params)["temperature"]) == (2, 0.5, 4, 0.8)
    assert cfg.teacher.model == "org/a + b"  # the label text naming "the teacher" uses (model card, results)
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    # each entry's K and sampling settings decide its traces, so they are part of the run's identity
    data["teacher"][0]["k"] = 3
    assert config_hash(config_from_dict(data)) != config_hash(cfg)
    data["teacher"][0]["k"] = 2
    data["teacher"][1]["concurrency"] = 1  # serving settings are not
    assert config_hash(config_from_dict(data)) == config_hash(cfg)


def test_model_card_names_each_teachers_k_and_temperature():
    from orpo_distill.export import model_card

    cfg = config_from_dict({"teacher": [{"model": "org/a", "k": 2, "temperature": 0.5}, {"model": "b", "name": "B"}],
                            "sampling": {"k": 4, "temperature": 0.8}})
    card = model_card(cfg, "orpo_mixed", 0, {})
    assert "org/a: k=2 at T=0.5; B: k=4 at T=0.8" in card and "`org/a + B`" in card
    one = model_card(config_from_dict({"teacher": {"model": "org/a"}, "sampling": {"k": 3}}), "sft_diverse", 0, {})
    assert "| teacher traces | k=3 at T=" in one


def test_overrides_index_the_teacher_list():
    from orpo_distill.config import apply_overrides

    data = {"teacher": [{"model": "a"}, {"model": "b"}]}
    cfg = config_from_dict(apply_overrides(data, ["teacher.1.k=4", "teacher.0.temperature=0.5"]))
    assert [(t.k, t.temperature) for t in teachers_of(cfg)] == [(None, 0.5), (4, None)]
    assert data == {"teacher": [{"model": "a"}, {"model": "b"}]}  # pure
    with pytest.raises(ConfigError, match=r"teacher is a list of 2 entries; index it with 0..1"):
        apply_overrides(data, ["teacher.k=4"])
    with pytest.raises(ConfigError, match="index it"):
        apply_overrides(data, ["teacher.2.k=4"])
    assert apply_overrides({"teacher": {"model": "a"}}, ["teacher.model=b"]) == {"teacher": {"model": "b"}}


def test_bad_teacher_entries_name_file_line_and_key(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("run:\n  out_dir: x\nteacher:\n  - model: a\n    k: 2\n  - model: b\n    backend: openai\n"
                 "    temprature: 0.5\n  - model: c\n    k: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "line 8: teacher[1].temprature: unknown key" in msg and "temperature" in msg
    assert "line 10: teacher[2].k: Input should be greater than or equal to 1" in msg
    # list-entry keys on a single mapping: unknown there (sampling.k is its K), with the allowed keys listed
    p.write_text("teacher:\n  model: a\n  k: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: teacher.k: unknown key; allowed here: api_key_env"):
        load_config(p)
    for bad, match in (([], "teacher: an empty list"),
                       ([{"model": "a"}, {"model": "a"}], r"entry \[1\] repeats entry \[0\]"),
                       ([{"model": "a", "base_url": ["http://u:sk-secret-1234567890@h/v1"]}], "credential")):
        with pytest.raises(ConfigError, match=match) as e:
            config_from_dict({"teacher": bad})
        assert "sk-secret" not in str(e.value)


# -- the pooled diversity filter -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _T:
    completion: str
    name: str


def test_pool_diverse_is_greedy_in_priority_order():
    from orpo_distill.run_traces import pool_diverse

    a = [_T("the answer is 5 because two plus three", "a0"), _T("completely other words here now", "a1")]
    b = [_T("the answer is 5 because two plus three", "b0"),  # a duplicate of a0: dropped, a0 came first
         _T("sum two three gives five so the answer is 5", "b1")]
    assert [t.name for t in pool_diverse([a, b], 0.8)] == ["a0", "a1", "b1"]
    assert [t.name for t in pool_diverse([b, a], 0.8)] == ["b0", "b1", "a1"]  # order decides who wins a tie
    assert [t.name for t in pool_diverse([a, b], 1.0)] == ["a0", "a1", "b0", "b1"]  # 1.0 drops nothing
    assert pool_diverse([a, b], 0.8) == pool_diverse([list(a), list(b)], 0.8)  # deterministic
    assert [t.name for t in pool_diverse([a, []], 0.0)] == ["a0", "a1"]  # no shared token: F1 0, kept


def test_pooled_chosen_reads_each_teacher_by_identity_and_filters_across(tmp_path):
    from orpo_distill.run_traces import pooled_chosen, teacher_queries
    from orpo_distill.sampling.base import SamplingParams
    from orpo_distill.store import Trace, TraceStore, trace_key
    from orpo_distill.train import teacher_chosen

    cfg = config_from_dict({"teacher": [{"model": "A", "revision": "r", "k": 2},
                                        {"model": "B", "revision": "r", "temperature": 0.5}],
                            "sampling": {"k": 3}, "run": {"out_dir": str(tmp_path)}})
    qa, qb = teacher_queries(cfg)
    texts = {("A", 0): "alpha route one two three answer 4", ("A", 1): "beta path four five six answer 4",
             ("B", 0): "alpha route one two three answer 4",  # = A's first: dropped by the pooled filter
             ("B", 1): "gamma way seven eight nine answer 4", ("B", 2): "delta wrong answer 9"}
    rows = []
    for (m, i), text in texts.items():
        q = qa if m == "A" else qb
        params = SamplingParams(n=q.k, **{k: (tuple(v) if k == "stop" else v) for k, v in q.params})
        p = params.as_dict()
        p.pop("n")
        rows.append(Trace(key=trace_key("teacher", m, "r", "teacher", "msg", params, i), question_id="q1",
                          role="teacher", source="teacher", model_id=m, revision="r", checkpoint=None,
                          sample_index=i, seed=0, params=p, prompt="msg", completion=text, n_tokens=5,
                          prompt_tokens=3, finish_reason="stop", latency_s=0.0, answer="9" if "9" in text else "4",
                          verdict="wrong" if "wrong" in text else "correct", kept=True, created_at=0.0))
    with TraceStore(tmp_path / "s.sqlite") as store:
        store.add(rows)
        pooled = pooled_chosen(store, cfg, ["q1"])
        assert [t.completion.split()[0] for t in pooled["q1"]] == ["alpha", "beta", "gamma"]
        assert [t.model_id for t in pooled["q1"]] == ["A", "A", "B"]
        assert [t.text for t in teacher_chosen(cfg, store, ["q1"])["q1"]] == \
               [t.completion for t in pooled["q1"]]
        # A alone (a single mapping): its own kept traces, unchanged
        one = config_from_dict({"teacher": {"model": "A", "revision": "r"}, "sampling": {"k": 2}})
        assert [t.completion.split()[0] for t in pooled_chosen(store, one, ["q1"])["q1"]] == ["alpha", "beta"]


# -- replicas ------------------------------------------------------------------------------------------------------

def test_replica_order_least_busy_and_cooldown():
    from orpo_distill.sampling.openai_api import _Replicas

    now = [100.0]
    r = _Replicas(["u0", "u1", "u2"], cooldown_s=10, clock=lambda: now[0])
    assert [r.order()[0] for _ in range(3)] == [0, 1, 2]  # idle replicas in turn
    r.busy[0] = 2
    assert r.order()[-1] == 0  # the busiest is tried last
    r.busy[0] = 0
    r.failed(1)
    assert 1 not in r.order()  # cooling down: skipped while others are healthy
    now[0] = 102.0
    r.failed(0)
    r.failed(2)
    now[0] = 105.0
    assert r.order() == [1]  # all cooling: the one whose cool-down ends first, alone
    now[0] = 113.0
    assert sorted(r.order()) == [0, 1, 2]


def _gen(urls, **kw):
    from orpo_distill.sampling.openai_api import OpenAIGenerator

    return OpenAIGenerator(model="fake", base_url=urls, max_retries=kw.pop("max_retries", 2), timeout_s=2.0,
                           backoff_base_s=0.01, backoff_max_s=0.05, concurrency=kw.pop("concurrency", 4), **kw)


def test_failing_replicas_are_skipped_and_results_do_not_depend_on_them():
    from orpo_distill.sampling.base import SamplingParams

    params = SamplingParams(n=2, temperature=0.8, top_p=1.0, max_new_tokens=20, stop=(), seed=1)
    prompts = [f"What is {i} + 3?" for i in range(8)]
    with FakeOpenAIServer() as good, FakeOpenAIServer(Faults(down=True)) as down:
        ref = _gen(good.base_url).generate(prompts, params)
        good_before = good.stats.requests
        # one request at a time: each failing replica fails once, then cools down for the rest of the call
        gen = _gen([_dead_url(), down.base_url, good.base_url], replica_cooldown_s=60.0, concurrency=1)
        got = gen.generate(prompts, params)
        assert [[c.text for c in cs] for cs in got] == [[c.text for c in cs] for cs in ref]
        stats = {s["base_url"]: s for s in gen.replicas.stats()}
        assert stats[down.base_url]["failures"] == 1 and down.stats.requests == 1
        assert good.stats.requests - good_before == len(prompts)
        assert gen.error_count == 2 and gen.errors_by_kind == {"connection": 1, "http_503": 1}
        # requests in flight together may each meet a failing replica before its first failure is known: at
        # most `concurrency` of them, and every prompt is still answered
        before_down, before_good = down.stats.requests, good.stats.requests
        gen = _gen([down.base_url, good.base_url], replica_cooldown_s=60.0, concurrency=4)
        got = gen.generate(prompts, params)
        assert [[c.text for c in cs] for cs in got] == [[c.text for c in cs] for cs in ref]
        assert 1 <= down.stats.requests - before_down <= 4 and good.stats.requests - before_good == len(prompts)
        assert gen.error_count == down.stats.requests - before_down


def test_all_replicas_failing_is_an_endpoint_error(tmp_path):
    from orpo_distill.errors import EndpointError
    from orpo_distill.sampling.base import GenerationFailed, SamplingParams

    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=5, stop=(), seed=0)
    with FakeOpenAIServer(Faults(down=True)) as down:
        gen = _gen([_dead_url(), down.base_url], max_retries=1, replica_cooldown_s=0.0)
        with pytest.raises(GenerationFailed, match="every replica") as e:
            gen.generate(["What is 1 + 1?"], params)
        assert gen.error_count == 4  # 2 rounds x 2 replicas
        assert issubclass(e.type, Exception)
    from orpo_distill.sampling.stage import SamplingAborted

    assert issubclass(SamplingAborted, EndpointError)


# -- a whole run: a local teacher plus an API teacher with a dead replica -----------------------------------------

def _write_arith(path: Path, start: int, n: int) -> None:
    with path.open("w") as f:
        for i in range(start, start + n):
            a, b = i % 17 + 2, (i * 7) % 23 + 1
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


def test_two_teachers_local_and_api_with_a_dead_replica(tmp_path, tiny_gpt2_dir, tiny_llama_dir, monkeypatch,
                                                        one_thread):
    from orpo_distill.cli import main
    from orpo_distill.run_traces import pooled_chosen, select, teacher_queries
    from orpo_distill.store import TraceStore

    monkeypatch.setenv("ORPO_TEST_KEY", "sk-test-secret-456")
    _write_arith(tmp_path / "train.jsonl", 0, 10)
    _write_arith(tmp_path / "test.jsonl", 100, 4)
    api = {"backend": "openai", "model": "fake-teacher", "api_key_env": "ORPO_TEST_KEY", "max_retries": 2,
           "concurrency": 2,
           "timeout_s": 2.0, "cost_per_1k_input": 1.0, "cost_per_1k_output": 2.0, "replica_cooldown_s": 60.0}
    base = {"run": {"out_dir": str(tmp_path / "run"), "variants": ["sft_diverse"]},
            "task": {"name": "arith", "kind": "numeric", "train": {"path": str(tmp_path / "train.jsonl")},
                     "test": {"path": str(tmp_path / "test.jsonl")}},
            "student": {"model": str(tiny_llama_dir), "template": "plain", "batch_size": 16},
            "sampling": {"k": 3, "max_new_tokens": 12},
            "trainer": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "report_to": ["jsonl"]},
            "eval": {"batch_size": 16}}
    with FakeOpenAIServer(api_key="sk-test-secret-456") as server:
        dead = _dead_url()
        # first the API teacher alone (a single mapping), then the list that adds a local teacher before it and a
        # second API model after it: the first one's traces are found, not paid for again
        one = tmp_path / "one.yaml"
        one.write_text(yaml.safe_dump({**base, "teacher": {**api, "base_url": [dead, server.base_url]}}))
        assert main(["traces", "teacher", str(one), "--no-progress"]) == 0
        first = server.stats.requests
        assert first == 10  # one request per question (n=3), none lost to the dead replica
        many = tmp_path / "many.yaml"
        teachers = [{"model": str(tiny_gpt2_dir), "template": "plain", "k": 2, "name": "local-gpt2",
                     "device": "cpu", "dtype": "float32"},
                    {**api, "base_url": [dead, server.base_url]},
                    {**api, "model": "fake-teacher-b", "base_url": server.base_url, "k": 2, "temperature": 0.7}]
        many.write_text(yaml.safe_dump({**base, "teacher": teachers}))
        assert main(["run", str(many), "--no-progress"]) == 0
        # the second API teacher: 10 requests; the first: none (its traces were in the store)
        assert server.stats.requests == first + 10
        cfg = load_config(many)

    out = tmp_path / "run"
    res = json.loads((out / "results.json").read_text())
    stats = res["teachers"]
    assert [s["teacher"] for s in stats] == ["local-gpt2", "fake-teacher", "fake-teacher-b"]
    with TraceStore(out / "traces.sqlite", readonly=True) as store:
        pooled = pooled_chosen(store, cfg)
        for s, q, k in zip(stats, teacher_queries(cfg), (2, 3, 2)):
            rows = select(store, q)
            assert s["k"] == k and s["traces"] == len(rows) == 10 * k
            assert s["correct"] == sum(r.verdict == "correct" for r in rows)
            assert s["correct_rate"] == pytest.approx(s["correct"] / (10 * k))
            assert s["completion_tokens"] == sum(r.n_tokens for r in rows)
            assert s["pooled_chosen"] == sum(t.model_id == q.model_id for ts in pooled.values() for t in ts)
        runs = store.run_totals(role="teacher", model_id="fake-teacher", revision=teacher_queries(cfg)[1].revision)
    local, api_a, api_b = stats
    assert local["backend"] == "hf" and local["cost_usd"] == 0 and local["replicas"] is None
    # the dead replica refused the requests in flight before its first failure was known (at most `concurrency`)
    assert api_a["replicas"] == 2 and api_a["correct"] > 0 and 1 <= api_a["errors"] <= 2
    assert api_a["cost_usd"] == pytest.approx(runs["prompt_tokens"] / 1000 * 1.0 + runs["completion_tokens"] / 1000
                                              * 2.0, abs=1e-6)
    # the fake server's texts do not depend on the model name: B's correct traces repeat A's, so the pooled
    # ROUGE-L filter keeps none of them (A comes first in the list), although B's own filter kept them
    assert api_b["kept_correct"] > 0 and api_b["pooled_chosen"] == 0
    assert api_a["pooled_chosen"] > 0
    # `traces stats CONFIG` shows the same per-teacher table; the secret is nowhere
    from orpo_distill.sampling.stage import traces_stats
    from orpo_distill.store import format_stats

    st = traces_stats(str(many))
    assert [t["traces"] for t in st["teachers"]] == [20, 30, 20]
    table = format_stats(st)
    assert "local-gpt2" in table and "fake-teacher-b" in table
    # a store alone (no config): one row per teacher identity it holds
    by_id = {t["model_id"]: t for t in traces_stats(str(out / "traces.sqlite"))["teachers"]}
    assert {k: v["traces"] for k, v in by_id.items()} == {str(tiny_gpt2_dir): 20, "fake-teacher": 30,
                                                          "fake-teacher-b": 20}
    assert by_id["fake-teacher"]["cost_usd"] == pytest.approx(api_a["cost_usd"])
    assert "fake-teacher-b" in format_stats(traces_stats(str(out / "traces.sqlite")))
    for p in out.rglob("*"):
        if p.is_file():
            assert b"sk-test-secret-456" not in p.read_bytes(), p
    assert res["variants"]["sft_diverse"]["n"] == 4
    md = (out / "results.md").read_text()
    assert "## Teachers" in md and "| local-gpt2 | hf | 2 | 20 |" in md and "| fake-teacher-b | openai | 2 | 20 |" in md
