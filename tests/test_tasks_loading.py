"""Loading task data: every format, field maps, limits, stable ids, the config entry points, and bad input."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from orpo_distill.config import DataSplit, TaskConfig
from orpo_distill.tasks import (
    Grade,
    LoadReport,
    TaskDataError,
    has_split,
    load_questions,
    load_questions_from,
    load_task,
    make_task,
)

ARC_ROWS = [
    {"id": "q1", "question": "Which gas do plants take in?",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "q2", "question": "What do bees make?",
     "choices": {"text": ["honey", "milk", "silk"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q3", "question": "Which is a mammal?",
     "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
]


def write_jsonl(path: Path, rows, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Rows as JSONL; `raw_lines` replaces line N (1-based) with raw bytes."""
    lines = [json.dumps(r).encode() for r in rows]
    for n, raw in (raw_lines or {}).items():
        lines.insert(n - 1, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_builtin_tasks_read_their_real_files(shared_data):
    expect = {"gsm8k": ("gsm8k/test.jsonl", "numeric", "18"), "medqa": ("medqa/test.jsonl", "multiple_choice", "C"),
              "strategyqa": ("strategyqa/all.jsonl", "yes_no", "yes"),
              "openbookqa": ("openbookqa/test.jsonl", "multiple_choice", "B"),
              "commonsenseqa": ("commonsenseqa/validation.jsonl", "multiple_choice", "A"),
              "arc_challenge": ("arc_challenge/test.jsonl", "multiple_choice", "C")}
    for name, (rel, kind, gold0) in expect.items():
        task = make_task(name)
        assert task.kind == kind
        qs = load_questions_from(str(shared_data / rel), task, limit=3)
        assert len(qs) == 3 and qs[0].gold == gold0
        assert qs[0].source == f"{shared_data / rel}:1" and qs[1].meta["row"] == 1
    medqa = load_questions_from(str(shared_data / "medqa/test.jsonl"), make_task("medqa"), limit=1)[0]
    assert list(medqa.options) == ["A", "B", "C", "D", "E"] and "(E) Refuse to dictate" in medqa.text
    sqa = load_questions_from(str(shared_data / "strategyqa/all.jsonl"), make_task("strategyqa"), limit=1)[0]
    assert sqa.id == "bb0" and sqa.rationale.startswith("College commencement") and \
        sqa.rationale.endswith("The answer is yes.")
    gsm = load_questions_from(str(shared_data / "gsm8k/test.jsonl"), make_task("gsm8k"), limit=1)[0]
    assert "<<" not in gsm.rationale and gsm.rationale.endswith("\nThe answer is 18.")


def test_numeric_labels_become_letters_and_short_option_lists(tmp_path):
    qs = load_questions_from(str(write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)), make_task("arc_challenge"))
    assert [q.gold for q in qs] == ["B", "A", "B"]
    assert list(qs[1].options) == ["A", "B", "C"]
    assert qs[2].options == {"A": "shark", "B": "whale", "C": "trout", "D": "eel"}
    assert qs[2].meta["original_labels"] == ["1", "2", "3", "4"]
    assert "(B) whale" in qs[2].text


def _same(qs):
    return [(q.id, q.text, q.gold, q.options) for q in qs]


def test_every_file_format_gives_the_same_questions(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    task = make_task("arc_challenge")
    ref = _same(load_questions_from(str(write_jsonl(tmp_path / "d.jsonl", ARC_ROWS)), task))
    (tmp_path / "d.json").write_text(json.dumps(ARC_ROWS, indent=2))
    assert _same(load_questions_from(str(tmp_path / "d.json"), task)) == ref
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": ARC_ROWS}))
    assert _same(load_questions_from(str(tmp_path / "wrapped.json"), task)) == ref
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "question", "choices", "answerKey"])
        w.writeheader()
        for r in ARC_ROWS:
            w.writerow({**r, "choices": json.dumps(r["choices"])})
    assert _same(load_questions_from(str(tmp_path / "d.csv"), task)) == ref
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), tmp_path / "d.parquet")
    assert _same(load_questions_from(str(tmp_path / "d.parquet"), task)) == ref
    datasets.Dataset.from_list(ARC_ROWS).save_to_disk(str(tmp_path / "saved"))
    assert _same(load_questions_from(str(tmp_path / "saved"), task)) == ref
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ARC_ROWS),
                          "train": datasets.Dataset.from_list(ARC_ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert _same(load_questions_from(str(tmp_path / "dd"), task, split="test")) == ref
    assert len(load_questions_from(str(tmp_path / "dd"), task, split="train")) == 1
    with pytest.raises(TaskDataError, match=r"no split 'validation'; it has test, train"):
        load_questions_from(str(tmp_path / "dd"), task, split="validation")
    # A folder of data files goes through `datasets.load_dataset`, the same call as a hub name.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    hub = tmp_path / "hub_like"
    hub.mkdir()
    write_jsonl(hub / "test.jsonl", ARC_ROWS)
    qs = load_questions_from(str(hub), task, split="test")
    assert _same(qs) == ref and qs[0].source == f"{hub}[test]: row 1"


def test_hub_names_call_load_dataset_with_config(monkeypatch):
    import datasets

    monkeypatch.delenv("ORPO_DISTILL_DATA_DIR", raising=False)
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "missing/dataset":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list([{"question": "1 + 1?", "answer": "#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    qs = load_questions(TaskConfig(name="gsm8k"), "test")  # no path: the built-in's hub default
    assert qs[0].gold == "2" and calls[-1] == ("openai/gsm8k", "main", "test")
    load_questions_from("someone/data:cfg", make_task("numeric"), split="train")
    assert calls[-1] == ("someone/data", "cfg", "train")
    with pytest.raises(TaskDataError, match=r"missing/dataset\[test\]: could not load the dataset \(ConnectionError"):
        load_questions_from("missing/dataset", make_task("numeric"), split="test")


def test_field_maps_generic_kinds_and_option_columns(tmp_path):
    rows = [{"prompt": "2 + 2?", "target": "4", "uid": 7}, {"prompt": "3 x 3?", "target": "9.0", "uid": 8}]
    path = write_jsonl(tmp_path / "num.jsonl", rows)
    qs = load_questions_from(str(path), make_task("numeric"), fields={"question": "prompt", "answer": "target",
                                                                       "id": "uid"})
    assert [(q.id, q.text, q.gold) for q in qs] == [("7", "2 + 2?", "4"), ("8", "3 x 3?", "9")]
    with (tmp_path / "mc.csv").open("w", newline="") as f:
        f.write("q,A,B,C,key\nWhich is red?,sky,blood,grass,B\nWhich is green?,sky,blood,grass,grass\n")
    mc = load_questions_from(str(tmp_path / "mc.csv"), make_task("multiple_choice"),
                             fields={"question": "q", "options": "A,B,C", "answer": "key"})
    assert [q.gold for q in mc] == ["B", "C"] and mc[0].options == {"A": "sky", "B": "blood", "C": "grass"}
    yn = write_jsonl(tmp_path / "yn.jsonl", [{"question": "Is ice cold?", "answer": "True"},
                                             {"question": "Is fire cold?", "answer": 0}])
    assert [q.gold for q in load_questions_from(str(yn), make_task("yes_no"))] == ["yes", "no"]
    ex = write_jsonl(tmp_path / "ex.jsonl", [{"question": "Capital of France?", "answer": ["Paris", "Paris, France"]}])
    q = load_questions_from(str(ex), make_task("exact"))[0]
    assert q.gold == "Paris" and q.meta["aliases"] == ["Paris, France"]
    lst = write_jsonl(tmp_path / "lst.jsonl", [{"question": "Pick", "options": ["x", "y"], "answer": 1}])
    assert load_questions_from(str(lst), make_task("multiple_choice"))[0].gold == "B"  # 0-based index
    with pytest.raises(TaskDataError, match="fields: unknown name 'questoin'"):
        load_questions_from(str(path), make_task("numeric"), fields={"questoin": "prompt"})


def test_ids_are_stable_hashes_or_dataset_ids_and_duplicates_are_suffixed(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "2"}, {"question": "2 + 2?", "answer": "4"},
            {"question": "1 + 1?", "answer": "2"}]
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    a = load_questions_from(str(path), make_task("numeric"))
    b = load_questions_from(str(path), make_task("numeric"))
    assert [q.id for q in a] == [q.id for q in b]
    assert a[0].id.startswith("h") and a[2].id == a[0].id + "~2" and a[1].id != a[0].id
    # The hash depends on content only, not on position or file.
    moved = load_questions_from(str(write_jsonl(tmp_path / "m.jsonl", rows[1:2])), make_task("numeric"))
    assert moved[0].id == a[1].id


def test_limits_first_n_and_seeded_sample(tmp_path):
    rows = [{"question": f"{i} + 1?", "answer": str(i + 1)} for i in range(50)]
    path = str(write_jsonl(tmp_path / "n.jsonl", rows))
    task = make_task("numeric")
    assert [q.gold for q in load_questions_from(path, task, limit=3)] == ["1", "2", "3"]
    s1 = load_questions_from(path, task, limit=10, sample_seed=1)
    assert [q.id for q in s1] == [q.id for q in load_questions_from(path, task, limit=10, sample_seed=1)]
    assert [q.id for q in s1] != [q.id for q in load_questions_from(path, task, limit=10, sample_seed=2)]
    rows_idx = [q.meta["row"] for q in s1]
    assert rows_idx == sorted(rows_idx) and rows_idx != list(range(10))


def test_data_dir_variable_gives_builtin_tasks_a_local_copy_of_their_hub_default(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1 + 1?", "answer": "so #### 2"},
                                                    {"question": "2 + 2?", "answer": "#### 4"}])
    monkeypatch.setenv("ORPO_DISTILL_DATA_DIR", str(tmp_path))
    qs = load_questions(TaskConfig(name="gsm8k"), "test")  # no path: the hub default, read from the local copy
    assert [q.gold for q in qs] == ["2", "4"] and qs[0].source == f"{tmp_path / 'gsm8k' / 'test.jsonl'}:1"
    assert calls == []
    # an explicit path wins; a split without a local file goes to the hub, and its error says why
    other = write_jsonl(tmp_path / "mine.jsonl", [{"question": "3 + 3?", "answer": "#### 6"}])
    assert load_questions(TaskConfig(name="gsm8k", test=DataSplit(path=str(other))), "test")[0].gold == "6"
    with pytest.raises(TaskDataError, match=r"ORPO_DISTILL_DATA_DIR is set, but .*gsm8k/train\.jsonl does not "
                                            "exist"):
        load_questions(TaskConfig(name="gsm8k"), "train")
    assert calls == [("openai/gsm8k", "main", "train")]
    # without the variable: the hub
    monkeypatch.delenv("ORPO_DISTILL_DATA_DIR")
    with pytest.raises(TaskDataError, match=r"could not load the dataset \(ConnectionError"):
        load_questions(TaskConfig(name="gsm8k"), "test")


def test_task_config_entry_points(tmp_path, shared_data):
    cfg = TaskConfig(name="arc_challenge", test=DataSplit(path=str(shared_data / "arc_challenge/test.jsonl"),
                                                          limit=5),
                     validation=DataSplit(path=str(shared_data / "arc_challenge/validation.jsonl")))
    assert load_task(cfg).name == "arc_challenge"
    assert len(load_questions(cfg, "test")) == 5 and len(load_questions(cfg, "validation")) == 299
    with pytest.raises(TaskDataError, match="task.train.path is not set"):
        load_questions(TaskConfig(name="mine", kind="numeric"), "train")
    assert has_split(cfg, "test") and has_split(TaskConfig(name="gsm8k"), "train")
    assert not has_split(TaskConfig(name="mine", kind="numeric"), "train")
    with pytest.raises(TaskDataError, match="unknown task 'gsm9k'"):
        load_task(TaskConfig(name="gsm9k"))
    with pytest.raises(TaskDataError, match="is a numeric task"):
        load_task(TaskConfig(name="gsm8k", kind="yes_no"))
    own = TaskConfig(name="my_quiz", kind="multiple_choice", fields={"question": "question_stem"},
                     test=DataSplit(path=str(shared_data / "openbookqa/test.jsonl"), limit=2))
    qs = load_questions(own, "test")
    assert load_task(own).name == "my_quiz" and qs[0].gold == "B"


def test_synthetic_task_goes_through_its_module():
    cfg = TaskConfig(name="synthetic", synthetic={"n_test": 7, "seed": 3})
    task = load_task(cfg)
    assert task.name == "synthetic" and task.kind == "numeric"
    qs = load_questions(cfg, "test")
    assert len(qs) == 7
    assert all(task.grade(q, q.rationale).verdict == "correct" for q in qs)
    # Our numeric kind grades the synthetic questions too (the answer line is the same).
    assert all(make_task("numeric").grade(q, q.rationale).verdict == "correct" for q in qs)
    with pytest.raises(TaskDataError, match="task.synthetic.bogus"):
        load_questions(TaskConfig(name="synthetic", synthetic={"bogus": 1}), "test")
    with pytest.raises(TaskDataError, match="task.synthetic.bogus"):
        load_task(TaskConfig(name="synthetic", synthetic={"bogus": 1}))


def test_custom_grader_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_grader.py").write_text(
        "def grade(question, completion):\n"
        "    if 'answer' not in completion:\n"
        "        return None\n"
        "    return question.gold.lower() in completion.lower()\n"
        "def bad(question, completion):\n"
        "    return 'maybe'\n")
    data = write_jsonl(tmp_path / "c.jsonl", [{"question": "Name a colour", "answer": "Red"}])
    task = make_task("colours", "custom", f"{tmp_path / 'my_grader.py'}:grade")
    q = load_questions_from(str(data), task)[0]
    assert task.grade(q, "The answer is red") == Grade("correct", None)
    assert task.grade(q, "The answer is blue").verdict == "wrong"
    assert task.grade(q, "no idea").verdict == "unparsed"
    monkeypatch.syspath_prepend(str(tmp_path))
    task2 = load_task(TaskConfig(name="colours", kind="custom", grader="my_grader:grade"))
    assert task2.grade(q, "The answer is RED.").verdict == "correct"
    with pytest.raises(TypeError, match="returned 'maybe'"):
        make_task("c", "custom", "my_grader:bad").grade(q, "x")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        make_task("c", "custom", "my_grader:nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        make_task("c", "custom", "no_such_module_xyz:f")
    with pytest.raises(ValueError, match="kind custom needs a grader"):
        make_task("c", "custom")
    sys.modules.pop("my_grader", None)


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("rows,raw,task,field,line,msg", [
    (ARC_ROWS[:2], {2: b'{"id": "x", "question": '}, "arc_challenge", None, 2, "not valid JSON"),
    (ARC_ROWS[:2], {3: b"[1, 2]"}, "arc_challenge", None, 3, "a row must be a JSON object"),
    ([ARC_ROWS[0], {k: v for k, v in ARC_ROWS[1].items() if k != "question"}], None, "arc_challenge",
     "question", 2, "missing"),
    ([ARC_ROWS[0], {**ARC_ROWS[1], "answerKey": "F"}], None, "arc_challenge", "answerKey", 2,
     "'F' is not among the options A, B, C"),
    ([{**ARC_ROWS[0], "question": "   "}], None, "arc_challenge", "question", 1, "is empty"),
    ([{**ARC_ROWS[0], "choices": 4}], None, "arc_challenge", "choices", 1, "must be a list or mapping"),
    ([{**ARC_ROWS[0], "choices": {"text": ["only one"], "label": ["A"]}}], None, "arc_challenge", "choices", 1,
     "at least 2 options"),
    ([{"question": "How many?", "answer": "#### lots"}], None, "gsm8k", "answer", 1, "is not a number"),
    ([{"qid": "a", "question": "Is it?", "answer": "maybe"}], None, "strategyqa", "answer", 1, "is not yes/no"),
    ([{"question": "x", "options": {"A": "p", "B": "q"}, "answer_idx": ""}], None, "medqa", "answer_idx", 1,
     "is empty"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, raw, task, field, line, msg):
    path = write_jsonl(tmp_path / "bad.jsonl", rows, raw)
    with pytest.raises(TaskDataError) as e:
        load_questions_from(str(path), make_task(task))
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: ") and msg in text, text
    if field:
        assert f"field {field!r}" in text
    assert "--skip-invalid" in text


def test_non_utf8_is_an_error_with_its_line_in_every_text_format(tmp_path):
    task = make_task("numeric")
    jl = write_jsonl(tmp_path / "b.jsonl", [{"question": "1+1?", "answer": "2"}],
                     {2: b'{"question": "caf\xe9?", "answer": "3"}'})
    with pytest.raises(TaskDataError, match=rf"{jl}:2: not UTF-8 text \(byte 0xe9"):
        load_questions_from(str(jl), task)
    (tmp_path / "b.csv").write_bytes(b"question,answer\n1+1?,2\ncaf\xe9?,3\n")
    with pytest.raises(TaskDataError, match=r"b.csv:3: not UTF-8 text \(byte 0xe9 at column 4\)"):
        load_questions_from(str(tmp_path / "b.csv"), task)
    (tmp_path / "b.json").write_bytes(b'[\n{"question": "1+1?", "answer": "2"},\n{"question": "\xff", "answer": 1}]')
    with pytest.raises(TaskDataError, match=r"b.json:3: not UTF-8 text"):
        load_questions_from(str(tmp_path / "b.json"), task)
    # A UTF-8 byte-order mark is fine.
    (tmp_path / "bom.csv").write_bytes("\ufeffquestion,answer\n1+1?,2\n".encode())
    assert load_questions_from(str(tmp_path / "bom.csv"), task)[0].gold == "2"


def test_json_and_csv_structure_errors(tmp_path):
    task = make_task("numeric")
    (tmp_path / "a.json").write_text('[\n{"question": "1+1?", "answer": "2"}\n{"question": "x", "answer": 1}\n]')
    with pytest.raises(TaskDataError, match=r"a.json:3: not valid JSON \(expected ',' or '\]'"):
        load_questions_from(str(tmp_path / "a.json"), task)
    (tmp_path / "o.json").write_text('{"nothing": 1}')
    with pytest.raises(TaskDataError, match="must hold an array of row objects"):
        load_questions_from(str(tmp_path / "o.json"), task)
    (tmp_path / "c.csv").write_text("question,answer\n1+1?,2,extra\n")
    with pytest.raises(TaskDataError, match=r"c.csv:2: more values than the 2 header columns"):
        load_questions_from(str(tmp_path / "c.csv"), task)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(TaskDataError, match="not a readable Parquet file"):
        load_questions_from(str(tmp_path / "x.parquet"), task)
    with pytest.raises(TaskDataError, match="file not found"):
        load_questions_from(str(tmp_path / "missing.jsonl"), task)
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(TaskDataError, match="unknown data format '.txt'"):
        load_questions_from(str(tmp_path / "d.txt"), task)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="no questions \\(it has no rows\\)"):
        load_questions_from(str(tmp_path / "empty.jsonl"), task)


def test_skip_invalid_skips_counts_and_says_why(tmp_path, caplog):
    rows = [ARC_ROWS[0], {**ARC_ROWS[1], "answerKey": "Z"}, {**ARC_ROWS[2], "question": ""}, ARC_ROWS[1]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows, {3: b"{oops"})
    report = LoadReport()
    qs = load_questions_from(str(path), make_task("arc_challenge"), skip_invalid=True, report=report)
    assert [q.id for q in qs] == ["q1", "q2"] and [q.meta["row"] for q in qs] == [0, 4]
    assert report.rows == 5 and report.loaded == 2 and len(report.skipped) == 3
    assert report.skipped[0] == (f"{path}:2", "field 'answerKey': 'Z' is not among the options A, B, C")
    assert report.skipped[1][0] == f"{path}:3" and "not valid JSON" in report.skipped[1][1]
    assert "skipped 3 of 5 rows" in report.summary()
    assert "skipped 3 of 5 rows" in caplog.text
    with pytest.raises(TaskDataError, match="all 1 rows were skipped"):
        load_questions_from(str(write_jsonl(tmp_path / "all_bad.jsonl", [{"question": ""}])),
                            make_task("numeric"), skip_invalid=True)
    cfg = TaskConfig(name="arc_challenge", skip_invalid=True, test=DataSplit(path=str(path)))
    assert len(load_questions(cfg, "test")) == 2
    with pytest.raises(TaskDataError):
        load_questions(cfg, "test", skip_invalid=False)
