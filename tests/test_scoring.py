"""`score`: predictions pair with questions by id whenever they carry ids (a mismatch is refused with the file,
the line and the id), and by order only when they carry none (with a row-count check)."""

from __future__ import annotations

import json

import pytest

from orpo_distill.cli import main
from orpo_distill.errors import UserError
from orpo_distill.tasks import NumericTask, TaskDataError, load_questions_from
from orpo_distill.tasks.scoring import read_predictions, score_predictions


def _data(path, start: int, n: int = 4):
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)})
                            + "\n" for i in range(start, start + n)), encoding="utf-8")
    return path


def _preds(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_predictions_of_another_split_are_refused_not_scored_by_order(tmp_path, capsys):
    test = _data(tmp_path / "test.jsonl", 0)
    val = _data(tmp_path / "validation.jsonl", 100)
    # predictions made on the test split (ids q0..q3), all correct there
    preds = _preds(tmp_path / "pred.jsonl", [{"id": f"q{i}", "completion": f"The answer is {2 * i}."}
                                             for i in range(4)])
    args = ["score", "--task", "sums", "--kind", "numeric", "--predictions", str(preds)]
    assert main([*args, "--data", str(test)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert main([*args, "--data", str(val)]) == 2  # was: scored by order, accuracy 0.0, exit 0
    err = capsys.readouterr().err
    assert f"{preds}:1: id 'q0' is not a question of the data" in err and "another split" in err


def test_id_mismatches_name_the_line_and_the_id(tmp_path):
    task = NumericTask(name="numeric")
    qs = load_questions_from(str(_data(tmp_path / "d.jsonl", 0)), task, {})
    ok = [{"id": f"q{i}", "completion": f"The answer is {2 * i}."} for i in range(4)]
    # by id, in any order
    summary, rows = score_predictions(task, qs, read_predictions(_preds(tmp_path / "p.jsonl", ok[::-1])))
    assert summary["correct"] == 4 and [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    cases = [
        (ok[:2] + [{"id": "q9", "completion": "x"}] + ok[3:], r"p\.jsonl:3: id 'q9' is not a question"),
        (ok[:3] + [{"completion": "x"}], r"p\.jsonl:4: field 'id': missing"),
        (ok + [dict(ok[1])], r"p\.jsonl:5: id 'q1' repeats line 2"),
        (ok[:3], r"p\.jsonl: no prediction for 1 of the 4 questions \(first: id 'q3'\)"),
    ]
    for rows_, pattern in cases:
        with pytest.raises(TaskDataError, match=pattern) as ei:
            score_predictions(task, qs, read_predictions(_preds(tmp_path / "p.jsonl", rows_)),
                              where=str(tmp_path / "p.jsonl"))
        assert isinstance(ei.value, UserError) and ei.value.exit_code == 2


def test_rows_without_ids_pair_by_order_with_a_count_check(tmp_path):
    task = NumericTask(name="numeric")
    qs = load_questions_from(str(_data(tmp_path / "d.jsonl", 0)), task, {})
    rows = [{"completion": f"The answer is {2 * i}."} for i in range(4)]
    summary, _ = score_predictions(task, qs, read_predictions(_preds(tmp_path / "p.jsonl", rows)))
    assert summary["correct"] == 4
    with pytest.raises(TaskDataError, match="3 predictions for 4 questions"):
        score_predictions(task, qs, read_predictions(_preds(tmp_path / "p.jsonl", rows[:3])))


def test_score_out_is_strict_json_lines(tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl", 0)
    preds = _preds(tmp_path / "p.jsonl", [{"completion": "The answer is 0."}] * 4)
    out = tmp_path / "graded.jsonl"
    assert main(["score", "--task", "sums", "--kind", "numeric", "--data", str(data), "--predictions", str(preds),
                 "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["verdict"] == "correct"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
