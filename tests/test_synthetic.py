"""The synthetic reasoning task: seeded, disjoint splits; correct gold rationales; several wordings; grading."""

from __future__ import annotations

import random

import pytest

from orpo_distill.tasks.synthetic import (
    SPLIT_BUCKETS,
    Problem,
    SyntheticOptionsError,
    SyntheticTask,
    load_questions,
    problem_of,
    rationale_variant,
    split_of,
)

SMALL = {"n_train": 300, "n_validation": 120, "n_test": 150, "seed": 0}


def test_splits_are_deterministic_and_prefix_stable():
    a = load_questions("train", SMALL)
    b = load_questions("train", SMALL)
    assert [(q.id, q.text, q.gold, q.rationale) for q in a] == [(q.id, q.text, q.gold, q.rationale) for q in b]
    assert len(a) == 300
    # Asking for fewer gives the same first questions (a run's `limit` never reshuffles a split).
    assert [q.id for q in load_questions("train", SMALL, limit=50)] == [q.id for q in a[:50]]
    assert [q.id for q in load_questions("train", {**SMALL, "n_train": 40})] == [q.id for q in a[:40]]


def test_seed_changes_the_questions():
    a = {q.id for q in load_questions("test", SMALL)}
    b = {q.id for q in load_questions("test", {**SMALL, "seed": 1})}
    assert len(a & b) < 0.2 * len(a)


def test_splits_never_overlap_in_text_or_arithmetic():
    by_split = {s: load_questions(s, SMALL, limit=150) for s in ("pretrain", "train", "validation", "test")}
    # Another seed's test split must not meet this seed's train either (buckets do not depend on the seed).
    by_split["test_seed7"] = load_questions("test", {**SMALL, "seed": 7}, limit=150)
    keys = {s: {problem_of(q).key() for q in qs} for s, qs in by_split.items()}
    texts = {s: {q.text for q in qs} for s, qs in by_split.items()}
    names = ["pretrain", "train", "validation", "test"]
    for i, s in enumerate(names):
        assert len(keys[s]) == len(by_split[s]), f"duplicate problems inside {s}"
        for t in names[i + 1:]:
            assert not keys[s] & keys[t], (s, t)
            assert not texts[s] & texts[t], (s, t)
        if s != "test":
            assert not keys[s] & keys["test_seed7"]
    for s in names:
        assert all(split_of(problem_of(q)) == s for q in by_split[s])
        assert all(q.meta["split"] == s for q in by_split[s])


def test_buckets_cover_the_hash_range_once():
    covered = sorted(r for lo, hi in SPLIT_BUCKETS.values() for r in range(lo, hi))
    assert covered == list(range(100))


def test_problems_respect_the_options():
    opts = {**SMALL, "min_steps": 2, "max_steps": 4, "max_number": 40}
    qs = load_questions("train", opts)
    lengths = {len(q.meta["steps"]) for q in qs}
    assert lengths == {2, 3, 4}
    ops = set()
    for q in qs:
        p = problem_of(q)
        assert all(1 <= v <= 40 for v in p.values()), p
        assert q.gold == str(p.answer)
        ops.update(op for op, _ in p.steps)
    assert ops == {"add", "sub", "mul", "div"}
    short = load_questions("train", {**SMALL, "min_steps": 1, "max_steps": 1, "max_number": 20}, limit=30)
    assert all(len(q.meta["steps"]) == 1 and all(v <= 20 for v in problem_of(q).values()) for q in short)
    # A space too small for the request is a clear error, not an endless loop.
    with pytest.raises(SyntheticOptionsError, match="cannot draw"):
        load_questions("train", {**SMALL, "min_steps": 1, "max_steps": 1, "max_number": 6})


def test_gold_rationales_grade_correct_and_end_in_the_answer_line():
    task = SyntheticTask(SMALL)
    for split in ("pretrain", "train", "validation", "test"):
        for q in task.load_questions(split, limit=150):
            assert q.rationale.endswith(f"The answer is {q.gold}.")
            assert task.grade(q, q.rationale).verdict == "correct", q.rationale
            assert task.answer_line(q.gold) == f"The answer is {q.gold}."


def test_every_rewording_is_correct_and_wordings_differ():
    """Correct traces can differ in wording: many distinct rationales per problem, each one right, and
    different enough that the ROUGE-L near-duplicate filter (0.8) keeps several of them."""
    from rouge_score import rouge_scorer

    task = SyntheticTask(SMALL)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    qs = task.load_questions("train", limit=40)
    rng = random.Random(0)
    kept_counts = []
    for q in qs:
        variants = [rationale_variant(q, rng) for _ in range(8)]
        assert all(task.grade(q, v).verdict == "correct" for v in variants)
        kept: list[str] = []
        for v in variants:
            if all(scorer.score(k, v)["rougeL"].fmeasure <= 0.8 for k in kept):
                kept.append(v)
        kept_counts.append(len(kept))
        assert len(set(variants)) >= 3, variants
    assert sum(kept_counts) / len(kept_counts) >= 2.5, kept_counts
    # Question wordings vary too (verbs, endings, people, items).
    assert len({q.text.split(". ", 1)[1].split(" ")[1] for q in qs if ". " in q.text}) >= 3


def test_grading_wrong_and_unparsed():
    task = SyntheticTask(SMALL)
    q = task.load_questions("test", limit=1)[0]
    wrong = str(int(q.gold) + 1)
    assert task.grade(q, f"Some steps. The answer is {wrong}.").verdict == "wrong"
    assert task.grade(q, "I do not know how many there are.").verdict == "unparsed"
    assert task.grade(q, f"The answer is {q.gold} or {wrong}.").verdict == "wrong"
    assert task.grade(q, f"12 + 3 = 15. The answer is {q.gold}").verdict == "correct"
    assert task.kind == "numeric" and task.name == "synthetic"


def test_user_message_is_the_short_problem_and_renders_in_the_plain_template():
    from orpo_distill.tasks.prompts import render_prompt

    task = SyntheticTask(SMALL)
    for q in task.load_questions("validation", limit=50):
        msg = task.user_message(q)
        assert msg == q.text and len(msg) < 260
        assert render_prompt(None, msg, "plain") == f"Question: {msg}\nAnswer:\n"


def test_ids_are_stable_and_unique():
    qs = load_questions("validation", SMALL)
    assert len({q.id for q in qs}) == len(qs)
    assert all(q.id.startswith("syn-") for q in qs)


def test_problem_arithmetic():
    p = Problem(12, (("add", 7), ("sub", 5), ("mul", 2), ("div", 4)))
    assert p.values() == [12, 19, 14, 28, 7] and p.answer == 7


@pytest.mark.parametrize("opts, field", [
    ({"n_tests": 5}, "n_tests"),
    ({"max_number": "forty"}, "max_number"),
    ({"min_steps": 5, "max_steps": 2}, "min_steps"),
    ({"n_train": -1}, "n_train"),
    ({"max_number": 3}, "max_number"),
])
def test_bad_options_name_the_field(opts, field):
    with pytest.raises(SyntheticOptionsError, match=field):
        load_questions("train", opts)


def test_unknown_split_and_aliases():
    with pytest.raises(SyntheticOptionsError, match="split"):
        load_questions("holdout", SMALL)
    assert [q.id for q in load_questions("val", SMALL, limit=5)] == [q.id for q in load_questions("validation",
                                                                                                SMALL, limit=5)]


def test_config_route_loads_the_same_questions():
    from orpo_distill.config import config_from_dict
    from orpo_distill.tasks import load_questions as load_from_cfg
    from orpo_distill.tasks import load_task

    cfg = config_from_dict({"task": {"name": "synthetic", "synthetic": SMALL, "test": {"limit": 20}}})
    task = load_task(cfg.task)
    assert isinstance(task, SyntheticTask) and task.options["n_test"] == 150
    assert [q.id for q in load_from_cfg(cfg.task, "test")] == [q.id for q in load_questions("test", SMALL, 20)]


# ---------------------------------------------------------------- the first-error locator

def test_first_error_finds_nothing_in_any_gold_wording():
    task = SyntheticTask(SMALL)
    for q in task.load_questions("train")[:200]:
        for k in range(4):
            assert task.first_error_offset(q, rationale_variant(q, random.Random(k))) is None


def _plain_question():
    # Ann has 12 pens; +7 -> 19; *2 -> 38; -8 -> 30
    from orpo_distill.tasks.base import Question

    return Question("syn-x", "Ann has 12 pens. She buys 7 more. She doubles them. She loses 8. How many?", "30",
                    meta={"start": 12, "steps": [["add", 7], ["mul", 2], ["sub", 8]], "name": "Ann",
                          "item": "pens"})


GOOD = "Ann starts with 12 pens. 12 + 7 = 19. Multiplying by 2 gives 19 * 2 = 38. 38 minus 8 is 30. The answer is 30."


@pytest.mark.parametrize("bad, at", [
    (GOOD.replace("with 12", "with 13"), "13 pens"),  # wrong start amount
    (GOOD.replace("19 * 2", "18 * 2"), "18 * 2"),  # copied the running value wrongly
    (GOOD.replace("19 * 2 = 38", "19 + 2 = 21"), "+ 2"),  # wrong operation
    (GOOD.replace("12 + 7 = 19", "12 + 6 = 18"), "6 = 18"),  # wrong operand
    (GOOD.replace("= 38. 38", "= 36. 36").replace("is 30. The answer is 30", "is 28. The answer is 28"),
     "36. 36"),  # wrong arithmetic, the rest consistent with it
    (GOOD.replace(" The answer is 30.", " 30 + 1 = 31. The answer is 31."), "30 + 1"),  # a step too many
    ("Ann starts with 12 pens. 12 + 7 = 19. 19 * 2 = 38. The answer is 38.", "The answer is 38"),  # stopped early
    (GOOD.replace("The answer is 30", "The answer is 31"), "31."),  # wrong answer line
])
def test_first_error_is_located_at_the_first_wrong_number(bad, at):
    task = SyntheticTask(SMALL)
    q = _plain_question()
    assert task.first_error_offset(q, GOOD) is None
    assert task.first_error_offset(q, bad) == bad.index(at)


def test_first_error_of_unreadable_text_is_none():
    task = SyntheticTask(SMALL)
    assert task.first_error_offset(_plain_question(), "pens pens pens") is None
