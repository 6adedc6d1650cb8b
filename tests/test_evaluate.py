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
    p = write_predictions(tmp_path / "p.jsonl", r)
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    again = grade_completions(task, qs, [[x["completion"]] for x in rows])
    assert (again.correct, again.wrong, again.unparsed) == (r.correct, r.wrong, r.unparsed) == (2, 1, 1)


def test_majority_vote_representative_prefers_a_correct_sample():
    q = Question(id="a", text="?", gold="4")
    grades = [Grade("wrong", "4"), Grade("correct", "4"), Grade("wrong", "5")]  # sample 0: ambiguous, says 4 too
    assert majority_vote(grades) == (1, {"4": 2, "5": 1})
    r = grade_completions(_ScriptedTask(grades), [q], [["s0", "s1", "s2"]], majority_k=3)
    assert r.correct == 1 and r.predictions[0]["completion"] == "s1"


class _ScriptedTask(NumTask):
    def __init__(self, grades):
        self.by_text = {f"s{i}": g for i, g in enumerate(grades)}

    def grade(self, q, completion):
        return self.by_text[completion]


def test_predictions_file_round_trips_through_the_score_path(tmp_path):
    """A real numeric task: `score`'s reader and grader give the same numbers from our predictions file."""
    from orpo_distill.tasks import NumericTask, load_questions_from
    from orpo_distill.tasks.scoring import read_predictions, score_predictions

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)), encoding="utf-8")
    task = NumericTask(name="numeric")
    qs = load_questions_from(str(data), task, {})
    samples = [["Adding: 0 + 0 = 0. The answer is 0.", "The answer is 1."],
               ["I think the answer is 3.", "The answer is 2."],
               ["Hmm.", "No idea."],
               ["The answer is $6.", "So 3 + 3 = 6. The answer is 6."]]
    for k in (1, 2):
        r = grade_completions(task, qs, [s[:k] for s in samples], majority_k=k)
        pred = write_predictions(tmp_path / f"pred{k}.jsonl", r)
        summary, rows = score_predictions(task, qs, read_predictions(pred))
        assert (summary["accuracy"], summary["n"], summary["correct"], summary["unparsed"]) == (
            r.accuracy, r.n, r.correct, r.unparsed)
        assert [x["verdict"] for x in rows] == [x["verdict"] for x in r.predictions]
    assert (r.correct, r.wrong, r.unparsed) == (2, 1, 1)


def test_eval_cli_end_to_end_on_a_tiny_model(tmp_path, tiny_llama_dir, capsys):
    from orpo_distill.cli import build_parser, main
    from orpo_distill.tasks import NumericTask, load_questions_from
    from orpo_distill.tasks.scoring import read_predictions, score_predictions

    data = tmp_path / "nums.jsonl"
    data.write_text("".join(json.dumps({"q": f"Tom has {i} apples and buys 4 more. How many?", "a": i + 4}) + "\n"
                            for i in range(5)), encoding="utf-8")
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tiny_llama_dir), "--task", "numeric", "--data", str(data),
            "--fields", "question=q,answer=a", "--limit", "4", "--max-new-tokens", "6", "--batch-size", "3",
            "--template", "plain", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics
    assert metrics["n"] == 4 and metrics["correct"] + metrics["wrong"] + metrics["unparsed"] == 4
    assert metrics["majority_k"] == 1 and metrics["temperature"] == 0.0 and metrics["generated_tokens"] > 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["completion"], str) for r in rows)
    task = NumericTask(name="numeric")
    qs = load_questions_from(str(data), task, {"question": "q", "answer": "a"}, limit=4)
    assert [r["id"] for r in rows] == [q.id for q in qs] and [r["gold"] for r in rows] == ["4", "5", "6", "7"]
    summary, _ = score_predictions(task, qs, read_predictions(out / "predictions.jsonl"))
    assert summary["accuracy"] == metrics["accuracy"] and summary["unparsed"] == metrics["unparsed"]
    # greedy is deterministic: a second run writes the same completions
    assert main(argv) == 0
    capsys.readouterr()
    assert [json.loads(x)["completion"] for x in (out / "predictions.jsonl").read_text().splitlines()] == [
        r["completion"] for r in rows]
    # the `score` command, when present, reads the file as it is
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "eval" in a.choices)
    if "score" in sub.choices:
        plain = tmp_path / "plain.jsonl"  # the score command's default field names
        plain.write_text("".join(json.dumps({"question": q.text, "answer": q.gold}) + "\n" for q in qs))
        assert main(["score", "--task", "numeric", "--data", str(plain), "--predictions",
                     str(out / "predictions.jsonl")]) == 0
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored["accuracy"] == metrics["accuracy"] and scored["n"] == 4
    # majority vote: k samples per question, written with their answers
    assert main([*argv[:-3], "--out", str(out / "mv"), "--majority-k", "3", "--temperature", "1.0",
                 "--no-progress"]) == 0
    capsys.readouterr()
    mrow = json.loads((out / "mv" / "predictions.jsonl").read_text().splitlines()[0])
    assert len(mrow["samples"]) == 3 and "votes" in mrow
    assert json.loads((out / "mv" / "metrics.json").read_text())["majority_k"] == 3
    # bad input: a clear message, exit code 2
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "numeric", "--data", str(tmp_path / "no.jsonl"),
                 "--no-progress"]) == 2
    assert "no.jsonl" in capsys.readouterr().err


def test_zero_new_tokens_is_an_error_not_a_zero_accuracy():
    from orpo_distill.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens must be >= 1, got 0"):
        evaluate(FakeGenerator({}), NumTask(), _questions(2), max_new_tokens=0, progress=False)
