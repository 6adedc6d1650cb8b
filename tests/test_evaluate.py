"""evaluate.py: greedy and majority-vote accuracy, unparsed counting, tie-breaking, the predictions file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from orpo_distill.evaluate import (
    EvalResult,
    evaluate,
    grade_completions,
    majority_vote,
    read_predictions,
    write_metrics,
    write_predictions,
)
from orpo_distill.sampling.base import Completion, SamplingParams
from orpo_distill.tasks.base import Grade, Question


class NumTask:
    """A tiny numeric task: the answer is the last 'The answer is N.' line."""

    name = "tiny_num"
    kind = "numeric"

    def user_message(self, q: Question) -> str:
        return f"{q.text}\nReason step by step, then end with 'The answer is N.'"

    def answer_line(self, answer: str) -> str:
        return f"The answer is {answer}."

    def grade(self, q: Question, completion: str) -> Grade:
        found = re.findall(r"The answer is (-?\d+)", completion)
        if not found:
            return Grade("unparsed", None)
        a = found[-1]
        return Grade("correct" if a == q.gold else "wrong", a)


@dataclass
class FakeGenerator:
    """Answers from a script: message -> list of texts (the first `n` are returned); records every call."""

    script: dict[str, list[str]]
    model_id: str = "fake"
    revision: str = "r0"
    calls: list[tuple[int, SamplingParams]] = field(default_factory=list)

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params))
        return [[Completion(text=t, n_tokens=len(t.split()), finish_reason="stop", prompt_tokens=3)
                 for t in self.script[p][: params.n]] for p in prompts]


def _questions(n: int) -> list[Question]:
    return [Question(id=f"q{i}", text=f"What is {i} + {i}?", gold=str(2 * i), source=f"mem:{i}") for i in range(n)]


def test_greedy_counts_correct_wrong_unparsed_and_batches():
    task, qs = NumTask(), _questions(5)
    texts = ["so The answer is 0.", "The answer is 3.", "no idea", "The answer is 5. wait, The answer is 6.",
             "The answer is 8."]
    gen = FakeGenerator({task.user_message(q): [t] for q, t in zip(qs, texts, strict=True)})
    r = evaluate(gen, task, qs, max_new_tokens=16, batch_size=2, progress=False, temperature=0.8)
    assert (r.n, r.correct, r.wrong, r.unparsed) == (5, 3, 1, 1)
    assert r.accuracy == pytest.approx(0.6)
    # greedy: one sample at temperature 0 whatever `temperature` says; batches of 2, 2, 1
    assert [c[0] for c in gen.calls] == [2, 2, 1]
    assert all(p.n == 1 and p.temperature == 0.0 and p.max_new_tokens == 16 for _, p in gen.calls)
    assert [p["id"] for p in r.predictions] == [q.id for q in qs]
    assert [p["verdict"] for p in r.predictions] == ["correct", "wrong", "unparsed", "correct", "correct"]
    assert r.predictions[2]["answer"] is None and r.predictions[3]["answer"] == "6"
    assert r.generated_tokens == sum(len(t.split()) for t in texts)
    assert r.model_id == "fake" and r.revision == "r0" and r.task == "tiny_num"


def test_majority_vote_unparsed_do_not_vote_and_ties_go_to_first_seen():
    task = NumTask()
    q = Question(id="a", text="?", gold="4")
    g = [task.grade(q, t) for t in ["x", "The answer is 3.", "zzz", "The answer is 4.", "yyy", "www"]]
    # 3 and 4 have one vote each; 4 unparsed samples do not outvote them; the tie goes to 3 (seen first)
    idx, votes = majority_vote(g)
    assert idx == 1 and votes == {"3": 1, "4": 1}
    idx, votes = majority_vote([task.grade(q, t) for t in ["The answer is 4.", "The answer is 3.",
                                                           "The answer is 3."]])
    assert idx == 1 and votes == {"4": 1, "3": 2}
    assert majority_vote([task.grade(q, "nothing")]) == (None, {})


def test_majority_vote_evaluate():
    task, qs = NumTask(), _questions(3)
    script = {
        task.user_message(qs[0]): ["The answer is 1.", "The answer is 0.", "The answer is 0.", "??", "extra"],
        task.user_message(qs[1]): ["The answer is 2.", "hmm", "The answer is 7.", "The answer is 7.", "x"],
        task.user_message(qs[2]): ["a", "b", "c", "d", "e"],
    }
    gen = FakeGenerator(script)
    r = evaluate(gen, task, qs, max_new_tokens=8, majority_k=4, temperature=0.7, seed=5, progress=False)
    assert all(p.n == 4 and p.temperature == 0.7 and p.seed == 5 for _, p in gen.calls)
    assert (r.correct, r.wrong, r.unparsed) == (1, 1, 1)
    p0, p1, p2 = r.predictions
    assert p0["answer"] == "0" and p0["verdict"] == "correct" and p0["completion"] == "The answer is 0."
    assert p0["votes"] == {"1": 1, "0": 2} and len(p0["samples"]) == 4
    assert [s["answer"] for s in p0["samples"]] == ["1", "0", "0", None]
    assert p1["answer"] == "7" and p1["verdict"] == "wrong"
    assert p2["verdict"] == "unparsed" and p2["answer"] is None and p2["completion"] == "a"
    assert r.metrics()["majority_k"] == 4


def test_bad_generator_output_and_arguments_are_errors():
    task, qs = NumTask(), _questions(2)
    gen = FakeGenerator({task.user_message(q): [] for q in qs})
    with pytest.raises(RuntimeError, match="0 completions for question 'q0'"):
        evaluate(gen, task, qs, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="no questions"):
        evaluate(gen, task, [], max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        evaluate(gen, task, qs, max_new_tokens=4, majority_k=3, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="2 questions"):
        grade_completions(task, qs, [["x"]])


def test_predictions_and_metrics_files(tmp_path):
    task, qs = NumTask(), _questions(3)
    r = grade_completions(task, qs, [["The answer is 0."], ["nope"], ["The answer is 4. \u00e9"]])
    assert isinstance(r, EvalResult)
    pred = write_predictions(tmp_path / "out" / "predictions.jsonl", r)
    lines = pred.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    rows = [json.loads(x) for x in lines]
    assert [x["completion"] for x in rows] == ["The answer is 0.", "nope", "The answer is 4. \u00e9"]
    assert read_predictions(pred) == rows
    # re-grading the file's completions gives the same numbers (what `score` does)
    again = grade_completions(task, qs, [[x["completion"]] for x in rows])
    assert again.metrics() == r.metrics()
    m = json.loads(write_metrics(tmp_path / "metrics.json", r).read_text())
    assert m["accuracy"] == pytest.approx(2 / 3) and (m["n"], m["correct"], m["wrong"], m["unparsed"]) == (3, 2, 0, 1)
    assert "predictions" not in m
    assert not list(tmp_path.glob("**/.*tmp*"))  # atomic writes leave no temporary files


def test_majority_predictions_rescore_to_same_accuracy(tmp_path):
    task, qs = NumTask(), _questions(4)
    samples = [["The answer is 0.", "The answer is 9.", "The answer is 0."],
               ["The answer is 5.", "The answer is 2.", "The answer is 2."],
               ["x", "y", "z"],
               ["The answer is 1.", "The answer is 6.", "q"]]
    r = grade_completions(task, qs, samples, majority_k=3)
    rows = read_predictions(write_predictions(tmp_path / "p.jsonl", r))
    again = grade_completions(task, qs, [[x["completion"]] for x in rows])
    assert (again.correct, again.wrong, again.unparsed) == (r.correct, r.wrong, r.unparsed) == (2, 1, 1)


def test_read_predictions_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"completion": "ok"}\n{"completion": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'completion'"):
        read_predictions(p)
    p.write_text('{"completion": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_predictions(p)
