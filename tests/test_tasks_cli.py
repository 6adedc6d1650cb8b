"""`orpo-distill score` and `orpo-distill show-prompt`, end to end on the real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_distill.cli import main

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _write(path: Path, completions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"completion": c}) + "\n" for c in completions), encoding="utf-8")
    return path


def _score(capsys, *argv: str) -> dict:
    assert main(["score", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_score_arc_counts_correct_wrong_unparsed_and_writes_nothing(shared_data, tmp_path, capsys, monkeypatch):
    data = shared_data / "arc_challenge/validation.jsonl"
    rows = _rows(data)
    comps = []
    for i, r in enumerate(rows):
        labels = r["choices"]["label"]
        gold = "ABCDE"[labels.index(r["answerKey"])]
        wrong = "ABCDE"[(labels.index(r["answerKey"]) + 1) % len(labels)]
        comps.append([f"Thinking.\nThe answer is ({gold}).", f"The answer is ({wrong}).", "I am not sure."][i % 3])
    preds = _write(tmp_path / "preds.jsonl", comps)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    s = _score(capsys, "--task", "arc_challenge", "--data", str(data), "--predictions", str(preds))
    n = len(rows)
    assert s == {"task": "arc_challenge", "accuracy": pytest.approx(len(range(0, n, 3)) / n), "n": n,
                 "correct": len(range(0, n, 3)), "wrong": len(range(1, n, 3)), "unparsed": len(range(2, n, 3))}
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = tmp_path / "graded.jsonl"
    _score(capsys, "--task", "arc_challenge", "--data", str(data), "--predictions", str(preds), "--out", str(out))
    graded = _rows(out)
    assert len(graded) == n and graded[0]["verdict"] == "correct" and graded[2]["verdict"] == "unparsed"
    assert graded[1]["id"] == rows[1]["id"]


def test_score_gsm8k_gold_solutions_via_subprocess(shared_data, tmp_path):
    data = shared_data / "gsm8k/test.jsonl"
    preds = _write(tmp_path / "p.jsonl", [r["answer"] for r in _rows(data)])
    res = subprocess.run([sys.executable, "-m", "orpo_distill.cli", "score", "--task", "gsm8k", "--data", str(data),
                          "--predictions", str(preds)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"task": "gsm8k", "accuracy": 1.0, "n": 1319, "correct": 1319, "wrong": 0,
                                      "unparsed": 0}


def test_score_generic_kind_field_map_and_skip_invalid(tmp_path, capsys):
    data = tmp_path / "quiz.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "target": 4}) + "\n" + "{broken\n"
                    + json.dumps({"prompt": "", "target": 1}) + "\n" + json.dumps({"prompt": "3*3?", "target": 9}) + "\n")
    # One prediction per data row (bad rows included) lines up with the rows that loaded.
    preds = _write(tmp_path / "p.jsonl", ["The answer is 4.", "-", "-", "The answer is 10."])
    args = ["--task", "quiz", "--kind", "numeric", "--data", str(data), "--predictions", str(preds),
            "--fields", "question=prompt", "answer=target"]
    assert main(["score", *args]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: not valid JSON" in err
    s = _score(capsys, *args, "--skip-invalid")
    assert (s["n"], s["correct"], s["wrong"], s["unparsed"], s["skipped"]) == (2, 1, 1, 0, 2)
    # One prediction per loaded question works too.
    short = _write(tmp_path / "short.jsonl", ["The answer is 4.", "The answer is 9."])
    s = _score(capsys, *args[:-5], "--predictions", str(short), "--fields", "question=prompt,answer=target",
               "--skip-invalid")
    assert s["correct"] == 2


def test_score_errors_are_messages_not_tracebacks(shared_data, tmp_path, capsys):
    data = str(shared_data / "strategyqa/all.jsonl")
    few = _write(tmp_path / "few.jsonl", ["The answer is yes."] * 3)
    assert main(["score", "--task", "strategyqa", "--data", data, "--predictions", str(few)]) == 2
    assert "3 predictions for 2290 questions" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"completion": "x"}\n{"completion": 3}\n')
    assert main(["score", "--task", "strategyqa", "--data", data, "--predictions", str(bad)]) == 2
    assert f"{bad}:2: field 'completion': missing or not a string" in capsys.readouterr().err
    bad.write_bytes(b'{"completion": "\xff"}\n')
    assert main(["score", "--task", "strategyqa", "--data", data, "--predictions", str(bad)]) == 2
    assert f"{bad}:1: not UTF-8 text" in capsys.readouterr().err
    assert main(["score", "--task", "nope", "--data", data, "--predictions", str(bad)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_score_matches_predictions_by_id(shared_data, tmp_path, capsys):
    data = shared_data / "openbookqa/test.jsonl"
    rows = _rows(data)
    preds = [{"id": r["id"], "completion": f"The answer is ({r['answerKey']})."} for r in rows][::-1]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in preds))
    s = _score(capsys, "--task", "openbookqa", "--data", str(data), "--predictions", str(p))
    assert s["correct"] == 500


def test_show_prompt_plain_raw_and_chat(shared_data, tmp_path, capsys, bpe_tokenizer):
    data = str(shared_data / "medqa/test.jsonl")
    assert main(["show-prompt", "--task", "medqa", "--data", data, "--index", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== prompt (plain template; task medqa, question 3: ")
    assert "\nQuestion: A 39-year-old woman" in out and "(E) Gamma-hemolytic" in out
    assert 'as "The answer is (X).", where X is the letter' in out
    assert "=== answer line for the gold answer ===\nThe answer is (D).\n" in out
    assert main(["show-prompt", "--task", "medqa", "--data", data, "--index", "3", "--raw"]) == 0
    raw = capsys.readouterr().out
    assert raw.startswith("Question: A 39-year-old") and raw.endswith("letter of the correct option.\nAnswer:\n")
    tok_dir = tmp_path / "tok"
    bpe_tokenizer.save_pretrained(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    assert main(["show-prompt", "--task", "strategyqa", "--data", str(shared_data / "strategyqa/all.jsonl"),
                 "--model", str(tok_dir), "--system-prompt", "Be brief.", "--raw"]) == 0
    chat = capsys.readouterr().out
    assert chat.startswith("<|system|>Be brief.\n<|user|>Is it common to see frost") and \
        chat.endswith('"The answer is no."\n<|assistant|>')
    assert main(["show-prompt", "--task", "strategyqa", "--data", str(shared_data / "strategyqa/all.jsonl"),
                 "--model", str(tok_dir), "--template", "plain", "--raw"]) == 0
    assert capsys.readouterr().out.startswith("Question: Is it common")
    assert main(["show-prompt", "--task", "strategyqa", "--data", str(shared_data / "strategyqa/all.jsonl"),
                 "--template", "chat"]) == 2
    assert "--template chat needs --model" in capsys.readouterr().err
    assert main(["show-prompt", "--task", "gsm8k", "--data", str(shared_data / "gsm8k/test.jsonl"),
                 "--index", "5000"]) == 2
    assert "--index 5000 is out of range: there are 1319 questions" in capsys.readouterr().err


def test_show_prompt_gsm8k_includes_gold_rationale(shared_data, capsys):
    assert main(["show-prompt", "--task", "gsm8k", "--data", str(shared_data / "gsm8k/test.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "=== gold rationale ===\nJanet sells 16 - 3 - 4 = 9 duck eggs a day." in out
    assert out.endswith("The answer is 18.\n")
