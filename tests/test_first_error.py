"""The first-error locators: GSM8K-style arithmetic (`answers.first_arithmetic_error`, the numeric kind) on
hand-made lines and on every gold solution of the real GSM8K test split, and the task hook's contract."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from orpo_distill.tasks.answers import arithmetic_errors, first_arithmetic_error
from orpo_distill.tasks.base import Question, first_error_offset
from orpo_distill.tasks.builtin import make_task

# Gold solutions of the GSM8K test split whose written arithmetic is wrong as written (found by this locator,
# checked by hand): "364 yards = 364 / 4 = <<3/4*364=273>>273" (364 / 4 is 91; the writer meant 3/4 of 364) and
# "$32 - $20 = $300 left" (a typo for $12).
GOLD_EXCEPTIONS = ("yards = 364 / 4 = ", "$32 - $20 = $300")


@pytest.mark.parametrize("text, wrong", [
    ("3 + 4 = 8", "8"),
    ("He pays 1,200 + 300 = $1,600 in total.", "1,600"),
    ("40*.2=8 and 2.5 * 4 = 11", "11"),
    ("12 x 3 = 36, then 36 × 2 = 70", "70"),
    ("5 + 5 + 5 = 16 pens", "16"),
    ("(3+4)*2 = 15", "15"),
    ("96 / 4 = 23", "23"),
    ("She makes 9 * 2 = $<<9*2=19>>19 a day.", "19>>"),
    ("She makes $<<9*2=18>>20 a day.", "20"),
    ("48/2 = 24 * 3 = 73", "73"),
    ("1/2 + 1/4 = 2/4", "2/4"),
])
def test_a_wrong_result_is_found_at_its_number(text, wrong):
    assert first_arithmetic_error(text) == text.index(wrong)


@pytest.mark.parametrize("text", [
    "3 + 4 = 7",
    "80,000+50,000=$<<80000+50000=130000>>130,000",
    "40*.2=8", "10/3 = 3.33", "10/3=3.3", "3.5 * 2 = 7.",
    "48/2 = 24 * 3 = 72",  # a running chain
    "10 - 3 = 3 + 4",  # the right side is an equal expression
    "0.2 * 100 = 20%", "1/5 = 20%", "50% * 40 = 20",
    "2 hours x 3 = 6 hours",  # the product starts in words: not checked
    "15 pages x 1/3 = 5 pages",
    "Alex: 5+(4x-13)=4x-8\n9x-21=339\n9x=360\nx=<<360/9=40>>40",  # algebra, not arithmetic
    "2^3 = 8", "x = 5", "5 = 5", "a <= 3, b >= 4, 3 == 3",
    "is <<3/4=3/4>>3/4",
    "120 – 80 - 15 = 25",  # an en dash as minus
    "(5*2 = 10)",
])
def test_correct_or_uncheckable_lines_are_not_flagged(text):
    assert arithmetic_errors(text) == []


def _gold(shared_data):
    path = shared_data / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"no GSM8K test split at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_no_error_in_the_gold_solutions_of_the_test_split(shared_data):
    rows = _gold(shared_data)
    task = make_task("gsm8k")
    flagged = []
    for i, row in enumerate(rows):
        q = task.question_from_row(row, None, f"test.jsonl:{i + 1}")
        for text in (row["answer"], q.rationale):  # with calculator notes, and the rationale without them
            off = task.first_error_offset(q, text)
            if off is not None:
                flagged.append(text[max(0, off - 40): off + 10])
    assert len(rows) == 1319
    unexpected = [f for f in flagged if not any(e in f for e in GOLD_EXCEPTIONS)]
    assert unexpected == []
    assert len({e for e in GOLD_EXCEPTIONS for f in flagged if e in f}) == len(GOLD_EXCEPTIONS)


_SIMPLE = re.compile(r"(?<![\d.,/])(\d+(?:\.\d+)?)\s*([-+*/])\s*(\d+(?:\.\d+)?)\s*=\s*\$?(\d+(?:\.\d+)?)(?![\d.,]\d)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_a_planted_error_in_a_gold_solution_is_found_at_its_offset(shared_data):
    """In every gold rationale, the first plain `a op b = c` (checked here independently) gets c + 1; the locator
    must name exactly that number. The raw solutions get the same change inside a calculator note."""
    rows = _gold(shared_data)
    task = make_task("gsm8k")
    planted = notes = 0
    for i, row in enumerate(rows):
        if any(e in row["answer"] for e in GOLD_EXCEPTIONS):
            continue
        q = task.question_from_row(row, None, f"test.jsonl:{i + 1}")
        text = q.rationale
        m = next((m for m in _SIMPLE.finditer(text)
                  if _OPS[m.group(2)](Fraction(m.group(1)), Fraction(m.group(3))) == Fraction(m.group(4))), None)
        if m is not None:
            bad = str(Fraction(m.group(4)) + 1) if "." not in m.group(4) else f"{float(m.group(4)) + 1:.2f}"
            wrong = text[: m.start(4)] + bad + text[m.end(4):]
            assert task.first_error_offset(q, wrong) == m.start(4), (i, wrong[: m.end(4) + 5])
            planted += 1
        n = re.search(r"<<(\d[^<>=]*[-+*/][^<>=]*)=(\d+)>>(\d+)", row["answer"])
        if n is not None and n.group(2) == n.group(3):
            raw = row["answer"]
            wrong = raw[: n.start(2)] + str(int(n.group(2)) + 7) + raw[n.end(2):]
            assert task.first_error_offset(q, wrong) is not None
            assert task.first_error_offset(q, wrong) <= n.start(2) + 1, (i, wrong[: n.end(3) + 5])
            notes += 1
    assert planted > 900 and notes > 1000


def test_the_task_hook_defaults_to_none_and_checks_offsets():
    q = Question("q1", "?", "7")

    class NoLocator:
        name = "plain"

    class Broken:
        name = "broken"

        def first_error_offset(self, q, completion):
            return len(completion) + 3

    assert first_error_offset(NoLocator(), q, "3 + 4 = 8") is None
    assert first_error_offset(make_task("multiple_choice"), q, "3 + 4 = 8") is None
    assert first_error_offset(make_task("numeric"), q, "So 3 + 4 = 8. The answer is 8.") == 11
    with pytest.raises(ValueError, match="first_error_offset"):
        first_error_offset(Broken(), q, "abc")
