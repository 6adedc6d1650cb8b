"""The trace store: content keys, one transaction per batch, ignore-on-duplicate, filters, order, stats, export."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest

from orpo_distill.sampling.base import SamplingParams
from orpo_distill.store import Trace, TraceStore, format_stats, trace_key

P = SamplingParams(n=4, temperature=0.8, max_new_tokens=32, seed=3)


def make_trace(qid: str = "q1", i: int = 0, *, role: str = "teacher", source: str = "teacher",
               completion: str = "x", verdict: str = "correct", kept: bool = True, n_tokens: int = 5) -> Trace:
    prompt = f"question {qid}"
    key = trace_key(role, "m", "r1", source, prompt, P, i)
    params = P.as_dict()
    params.pop("n")
    return Trace(key=key, question_id=qid, role=role, source=source, model_id="m", revision="r1", checkpoint=None,
                 sample_index=i, seed=P.seed, params=params, prompt=prompt, completion=completion, n_tokens=n_tokens,
                 prompt_tokens=7, finish_reason="stop", latency_s=0.1, answer="1" if verdict != "unparsed" else None,
                 verdict=verdict, kept=kept, created_at=1.0)


def test_trace_key_is_content_addressed():
    base = trace_key("teacher", "m", "r", "teacher", "hello", P, 0)
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == trace_key("teacher", "m", "r", "teacher", "hello", replace(P, n=12), 0)  # n is not content
    variants = [
        trace_key("student", "m", "r", "teacher", "hello", P, 0),
        trace_key("teacher", "m2", "r", "teacher", "hello", P, 0),
        trace_key("teacher", "m", "r2", "teacher", "hello", P, 0),
        trace_key("teacher", "m", "r", "initial", "hello", P, 0),
        trace_key("teacher", "m", "r", "teacher", "hello!", P, 0),
        trace_key("teacher", "m", "r", "teacher", "hello", P, 1),
        trace_key("teacher", "m", "r", "teacher", "hello", replace(P, temperature=0.7), 0),
        trace_key("teacher", "m", "r", "teacher", "hello", replace(P, top_p=0.9), 0),
        trace_key("teacher", "m", "r", "teacher", "hello", replace(P, max_new_tokens=33), 0),
        trace_key("teacher", "m", "r", "teacher", "hello", replace(P, stop=("\n",)), 0),
        trace_key("teacher", "m", "r", "teacher", "hello", replace(P, seed=4), 0),
    ]
    assert len(set(variants)) == len(variants) and base not in variants


def test_add_is_insert_or_ignore_and_round_trips(tmp_path):
    path = tmp_path / "t.sqlite"
    traces = [make_trace("q1", i) for i in range(3)]
    with TraceStore(path) as s:
        assert s.add(traces) == 3
        assert s.add(traces + [make_trace("q2", 0)]) == 1  # only the new key
        assert len(s) == 4
        assert s.existing_keys([t.key for t in traces] + ["nope"]) == {t.key for t in traces}
        assert s.existing_keys([]) == set()
        assert s.add([]) == 0
    with TraceStore(path) as s:  # reopened: same content, same types
        got = s.traces(question_ids=["q1"])
        assert got == traces
        assert isinstance(got[0].kept, bool) and isinstance(got[0].params, dict)
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_a_failing_batch_writes_nothing(tmp_path):
    with TraceStore(tmp_path / "t.sqlite") as s:
        good = make_trace("q1", 0)
        bad = replace(make_trace("q1", 1), verdict="maybe")
        with pytest.raises(ValueError, match="verdict"):
            s.add([good, bad])
        assert len(s) == 0
        # A constraint failure inside the transaction rolls the whole batch back.
        s.add([good])
        with pytest.raises(sqlite3.IntegrityError):
            s.add([make_trace("q9", 0), replace(make_trace("q9", 1), question_id=None)])
        assert len(s) == 1 and s.existing_keys([make_trace("q9", 0).key]) == set()


def test_filters_and_deterministic_order(tmp_path):
    ts = [make_trace("q2", 1), make_trace("q1", 1, verdict="wrong"), make_trace("q1", 0),
          make_trace("q1", 0, role="student", source="initial", verdict="wrong"),
          make_trace("q1", 1, role="student", source="epoch:1", verdict="unparsed", kept=True),
          make_trace("q2", 0, kept=False)]
    with TraceStore(tmp_path / "t.sqlite") as s:
        s.add(ts)
        order = [(t.question_id, t.source, t.sample_index) for t in s.traces()]
        assert order == sorted(order)
        assert [t.sample_index for t in s.traces(role="teacher", question_ids=["q1"])] == [0, 1]
        assert len(s.traces(role="student")) == 2
        assert [t.source for t in s.traces(source="epoch:1")] == ["epoch:1"]
        assert len(s.traces(verdict="wrong")) == 2
        assert [t.question_id for t in s.traces(kept=False)] == ["q2"]
        assert len(s.traces(model_id="m")) == 6 and s.traces(model_id="other") == []
        assert s.traces(question_ids=[]) == []
        assert s.get([ts[0].key, "missing"]) == [ts[0]]


def test_stats_counts_rates_duplicates_and_cost(tmp_path):
    with TraceStore(tmp_path / "t.sqlite") as s:
        s.add([make_trace("q1", 0, completion="same"), make_trace("q1", 1, completion="same"),
               make_trace("q1", 2, completion="other", verdict="wrong", kept=False),
               make_trace("q2", 0, completion="same", verdict="unparsed"),
               make_trace("q1", 0, role="student", source="initial", verdict="wrong", n_tokens=9)])
        s.add_run(role="teacher", source="teacher", model_id="m", revision="r1", requested=4, existing=0, sampled=4,
                  errors=3, prompt_tokens=100, completion_tokens=20, seconds=2.0, cost_usd=0.25, status="ok")
        st = s.stats()
    t = st["groups"]["teacher/teacher"]
    assert (t["traces"], t["questions"], t["correct"], t["wrong"], t["unparsed"]) == (4, 2, 2, 1, 1)
    assert t["correct_rate"] == 0.5 and t["unparsed_rate"] == 0.25
    assert t["exact_duplicates"] == 1 and t["duplicate_rate"] == 0.25  # "same" twice for q1; q2 is another question
    assert t["dropped_by_diversity"] == 1 and t["kept"] == 3
    assert t["completion_tokens"] == 20
    assert st["groups"]["student/initial"]["completion_tokens"] == 9
    assert st["cost_usd"] == 0.25 and st["errors"] == 3 and st["traces"] == 5
    text = format_stats(st)
    assert "teacher/teacher" in text and "$0.2500" in text


def test_export_jsonl_and_dataset(tmp_path):
    ts = [make_trace("q2", 0), make_trace("q1", 0), make_trace("q1", 1, kept=False)]
    with TraceStore(tmp_path / "t.sqlite") as s:
        s.add(ts)
        n = s.export_jsonl(tmp_path / "out" / "t.jsonl")
        rows = [json.loads(x) for x in (tmp_path / "out" / "t.jsonl").read_text().splitlines()]
        ds = s.to_dataset()
        empty = s.to_dataset(role="student")
    assert n == 3 and [r["question_id"] for r in rows] == ["q1", "q1", "q2"]
    assert Trace(**rows[0]) == ts[1]
    assert len(ds) == 3 and ds[2]["question_id"] == "q2" and json.loads(ds[0]["params"])["seed"] == 3
    assert ds[1]["kept"] is False
    assert len(empty) == 0 and "completion" in empty.column_names


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a trace store"):
        TraceStore(junk)
    with pytest.raises(FileNotFoundError, match="not found"):
        TraceStore(tmp_path / "none.sqlite", readonly=True)
    with TraceStore(tmp_path / "ok.sqlite") as s:
        s.add([make_trace()])
    with TraceStore(tmp_path / "ok.sqlite", readonly=True) as s:
        assert len(s) == 1
