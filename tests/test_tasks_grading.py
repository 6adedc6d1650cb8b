"""Grading on the real rows of ../shared/data, answer extraction on what models write, and property tests."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo_distill.tasks import Grade, Question, load_questions_from, make_task
from orpo_distill.tasks import answers as A

REASON = ("Let me think about this step by step.\nFirst, consider what the question asks. "
          "Then check each possibility against the facts.")

MC_FILES = [("arc_challenge", "arc_challenge/test.jsonl"), ("arc_challenge", "arc_challenge/validation.jsonl"),
            ("openbookqa", "openbookqa/test.jsonl"), ("openbookqa", "openbookqa/validation.jsonl"),
            ("medqa", "medqa/test.jsonl"), ("commonsenseqa", "commonsenseqa/validation.jsonl")]
ROWS = {"arc_challenge/test.jsonl": 1172, "arc_challenge/validation.jsonl": 299, "openbookqa/test.jsonl": 500,
        "openbookqa/validation.jsonl": 500, "medqa/test.jsonl": 1273, "commonsenseqa/validation.jsonl": 1221,
        "gsm8k/test.jsonl": 1319, "strategyqa/all.jsonl": 2290}


def _run(task, q, cases):
    """The (case name, completion, want, got) of every case whose verdict is not the wanted one."""
    bad = []
    for name, completion, want in cases:
        g = task.grade(q, completion)
        if g.verdict != want:
            bad.append((q.source, name, completion[-160:], want, g))
    return bad


def _unique_text(q: Question, label: str) -> bool:
    """Whether an option's text alone names it (no other option has the same text, and it is not a letter)."""
    t = q.options[label]
    same = [k for k, v in q.options.items() if A.normalize_option(v) == A.normalize_option(t)]
    return same == [label] and A.whole_option(t, q.options) == label


def _mc_cases(q: Question):
    g = q.gold
    text = q.options[g]
    cases = [
        ("paren", f"{REASON}\nThe answer is ({g}).", "correct"),
        ("letter-paren-text", f"{REASON} So the correct answer is {g}) {text}", "correct"),
        ("answer-colon", f"{REASON}\nAnswer: {g}", "correct"),
        ("markdown-option", f"{REASON}\n**Final answer:** option {g}.", "correct"),
        ("letter-dot-text", f"{REASON}\nThe answer is {g}. {text}", "correct"),
        ("reverse", f"{REASON}\nTherefore, ({g}) is the correct answer.", "correct"),
        ("boxed", f"{REASON}\nThe answer is $\\boxed{{{g}}}$.", "correct"),
        ("bare-last-line", f"{REASON}\n({g})", "correct"),
        ("last-wins", f"The answer is ({'A' if g != 'A' else 'B'}).\nWait, let me re-check.\nThe answer is ({g}).",
         "correct"),
        ("no-answer", REASON, "unparsed"),
    ]
    if _unique_text(q, g):
        cases.append(("option-text", f"{REASON}\nThe answer is {text}", "correct"))
    wrong = [k for k in q.options if not A.same_option(k, g, q.options)]
    w = wrong[0]
    cases += [("wrong-letter", f"{REASON}\nThe answer is ({w}).", "wrong"),
              ("two-letters", f"{REASON}\nThe answer is ({g}) or ({w}).", "wrong")]
    texts = [k for k in wrong if _unique_text(q, k) and not A.normalize_text(q.options[k]).startswith("not ")]
    if texts:
        cases.append(("wrong-text", f"{REASON}\nThe answer is {q.options[texts[0]]}", "wrong"))
    return cases


@pytest.mark.parametrize("name,rel", MC_FILES)
def test_multiple_choice_every_row(shared_data, name, rel):
    task = make_task(name)
    questions = load_questions_from(str(shared_data / rel), task)
    assert len(questions) == ROWS[rel]
    bad, n_text = [], 0
    for q in questions:
        assert q.gold in q.options and all(k in "ABCDE" for k in q.options)
        cases = _mc_cases(q)
        n_text += any(c[0] == "option-text" for c in cases)
        bad += _run(task, q, cases)
    assert not bad, f"{len(bad)} misgraded, e.g. {bad[:3]}"
    assert n_text >= 0.98 * len(questions)  # the option-text phrasing is skipped only for repeated options


def test_gsm8k_every_row_and_all_gold_solutions(shared_data):
    task = make_task("gsm8k")
    questions = load_questions_from(str(shared_data / "gsm8k/test.jsonl"), task)
    assert len(questions) == 1319
    import json

    raw = [json.loads(line)["answer"] for line in (shared_data / "gsm8k/test.jsonl").open(encoding="utf-8")]
    bad = []
    for q, solution in zip(questions, raw):
        v = int(q.gold)
        cases = [
            ("gold-solution", solution, "correct"),  # the dataset's own worked solution, "#### N" and all
            ("gold-rationale", q.rationale, "correct"),  # the same, rewritten to end in our answer line
            ("plain", f"{REASON}\nThe answer is {v}.", "correct"),
            ("dollars-commas", f"{REASON}\nThe answer is ${v:,}.", "correct"),
            ("units", f"{REASON}\nFinal answer: {v:,} dollars", "correct"),
            ("bold", f"{REASON}\nThe answer is: **{v}**", "correct"),
            ("decimal", f"{REASON}\nThe answer is {v}.00.", "correct"),
            ("boxed", f"{REASON}\nThe final answer is $\\boxed{{{v}}}$", "correct"),
            ("equation", f"{REASON}\nThe answer is 2 + 3 = {v}.", "correct"),
            ("explained", f"{REASON}\nThe answer is {v} (that is 5 x 2 more), as computed.", "correct"),
            ("last-wins", f"The answer is {v + 7}.\nHmm, I made a mistake.\nThe answer is {v}.", "correct"),
            ("wrong", f"{REASON}\nThe answer is {v + 1}.", "wrong"),
            ("wrong-sign", f"{REASON}\nThe answer is {-v if v else 1}.", "wrong"),
            ("two-numbers", f"{REASON}\nThe answer is {v} or {v + 1}.", "wrong"),
            ("no-answer", REASON, "unparsed"),
        ]
        bad += _run(task, q, cases)
    assert not bad, f"{len(bad)} misgraded, e.g. {bad[:3]}"
    assert any(int(q.gold) < 0 for q in questions) and any(int(q.gold) >= 1000 for q in questions)


def test_strategyqa_every_row(shared_data):
    task = make_task("strategyqa")
    questions = load_questions_from(str(shared_data / "strategyqa/all.jsonl"), task)
    assert len(questions) == 2290
    bad = []
    for q in questions:
        g = q.gold
        w = "no" if g == "yes" else "yes"
        cases = [
            ("gold-rationale", q.rationale, "correct"),
            ("plain", f"{REASON}\nThe answer is {g}.", "correct"),
            ("capital", f"{REASON}\nAnswer: {g.capitalize()}", "correct"),
            ("true-false", f"{REASON}\nThe answer is {'True' if g == 'yes' else 'False'}.", "correct"),
            ("bold", f"{REASON}\nSo the final answer is: **{g}**", "correct"),
            ("bare-last-line", f"{REASON}\n{g.capitalize()}.", "correct"),
            ("because", f"{REASON}\nThe answer is {g}, because that is how it is.", "correct"),
            ("wrong", f"{REASON}\nThe answer is {w}.", "wrong"),
            ("both", f"{REASON}\nThe answer is yes or no.", "wrong"),
            ("no-answer", REASON, "unparsed"),
        ]
        bad += _run(task, q, cases)
    assert not bad, f"{len(bad)} misgraded, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------------ extraction cases

OPTS = {"A": "oxygen", "B": "carbon dioxide", "C": "helium", "D": "neon"}
MCQ = Question("q", "Which gas?", "B", options=OPTS)


@pytest.mark.parametrize("completion,verdict,answer", [
    ("The answer is (B).", "correct", "B"),
    ("The answer is (b).", "correct", "B"),
    ("the answer is: b", "correct", "B"),
    ("The answer is B) carbon dioxide", "correct", "B"),
    ("The answer is B. Carbon dioxide is what plants take in.", "correct", "B"),
    ("The correct option is B", "correct", "B"),
    ("Option A is wrong, so (B) is the correct answer.", "correct", "B"),
    ("Answer: carbon dioxide, since plants use it", "correct", "B"),
    ("The answer is Carbon Dioxide.", "correct", "B"),
    ("The answer is clearly B", "correct", "B"),
    ("The answer is (B), not (A).", "correct", "B"),
    ("The answer is B because A is wrong.", "correct", "B"),
    ("**Answer:** (B)\n\nExplanation: plants need it; option A is not used.", "correct", "B"),
    ("The answer is (A).\n\nQuestion: Which gas do we breathe out?\nAnswer:\nThe answer is (B).", "wrong", "A"),
    ("The answer is (B) or (A).", "wrong", "B or A"),
    ("The answer is (E).", "wrong", "E"),
    ("The answer is helium.", "wrong", "C"),
    ("Plants need carbon dioxide.", "unparsed", None),
    ("", "unparsed", None),
    ("The answer is", "unparsed", None),
])
def test_multiple_choice_extraction(completion, verdict, answer):
    g = make_task("multiple_choice").grade(MCQ, completion)
    assert (g.verdict, g.answer) == (verdict, answer)


@pytest.mark.parametrize("completion,gold,verdict", [
    ("The answer is 18.", "18", "correct"),
    ("The answer is $1,450,000.", "1450000", "correct"),
    ("The answer is 18 eggs per day.", "18", "correct"),
    ("The answer is -10 degrees.", "-10", "correct"),
    ("The answer is −10.", "-10", "correct"),
    ("The answer is 3.5 hours.", "3.5", "correct"),
    ("The answer is 7/2.", "3.5", "correct"),
    ("The answer is \\frac{3}{4}.", "0.75", "correct"),
    ("The answer is $\\dfrac{1}{3}$.", "1/3", "correct"),
    ("The answer is 50%.", "50", "correct"),
    ("The answer is eighteen.", "18", "correct"),
    ("The answer is 16 - 3 - 4 = 9 eggs, so 9 * $2 = $18", "18", "wrong"),  # first clause: 9
    ("The answer is 9 * $2 = $18.", "18", "correct"),
    ("#### 18", "18", "correct"),
    ("So the answer is \\boxed{18}", "18", "correct"),
    ("The answer is $2^{3}$.", "8", "correct"),  # math-verify fallback
    ("The answer isn't 17. The answer is 18.", "18", "correct"),
    ("The answer is not 17", "17", "unparsed"),
    ("The answer is 17 or 18.", "18", "wrong"),
    ("She makes $18 a day.", "18", "unparsed"),
    ("$18.", "18", "correct"),
    ("The answer is 18.5", "18", "wrong"),
])
def test_numeric_extraction(completion, gold, verdict):
    assert make_task("numeric").grade(Question("q", "x", gold), completion).verdict == verdict


@pytest.mark.parametrize("completion,verdict", [
    ("The answer is No.", "correct"), ("Answer: false", "correct"), ("So, the answer is: **No**.", "correct"),
    ("The answer is no, it is not true that frost is rare.", "correct"), ("No.", "correct"),
    ("No is the correct answer.", "correct"), ("The answer is yes.", "wrong"), ("The answer is True", "wrong"),
    ("The answer is yes or no.", "wrong"), ("It depends on the weather.", "unparsed"),
])
def test_yes_no_extraction(completion, verdict):
    assert make_task("yes_no").grade(Question("q", "x", "no"), completion).verdict == verdict


def test_exact_match_and_aliases():
    task = make_task("exact")
    q = Question("q", "Capital of France?", "Paris", meta={"aliases": ["Paris, France"]})
    assert task.grade(q, "I think about it.\nThe answer is paris.").verdict == "correct"
    assert task.grade(q, "The answer is Paris, the capital of France.").verdict == "correct"
    assert task.grade(q, "The answer is Paris, France.").verdict == "correct"
    assert task.grade(q, "Paris").verdict == "correct"
    assert task.grade(q, "The answer is London.") == Grade("wrong", "london")
    assert task.grade(q, "France is a country.\nIts capital is big.").verdict == "unparsed"


def test_answer_lines_and_instructions_per_kind():
    assert make_task("multiple_choice").answer_line("C") == "The answer is (C)."
    assert make_task("numeric").answer_line("18") == "The answer is 18."
    assert make_task("yes_no").answer_line("yes") == "The answer is yes."
    for kind, gold, options in [("multiple_choice", "C", {"A": "x", "B": "y", "C": "z"}), ("numeric", "18", None),
                                ("yes_no", "yes", None), ("exact", "Paris", None)]:
        task = make_task(kind)
        q = Question("q", "Some question?", gold, options=options)
        msg = task.user_message(q)
        assert msg.startswith("Some question?") and "step by step" in msg
        # The task's own answer line for the gold grades correct: the format we ask for is the format we read.
        assert task.grade(q, "Reasoning here.\n" + task.answer_line(gold)).verdict == "correct"


def test_numeric_task_reusable_on_given_questions():
    qs = [Question(f"s{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(5)]
    task = make_task("numeric")
    assert [task.grade(q, f"{i} + {i} = {2 * i}. The answer is {2 * i}.").verdict for i, q in enumerate(qs)] == \
        ["correct"] * 5


# ------------------------------------------------------------------------------------------ properties

_values = st.one_of(
    st.integers(-10**9, 10**9).map(Fraction),
    st.tuples(st.integers(-10**6, 10**6), st.integers(1, 4)).map(lambda t: Fraction(t[0], 10 ** t[1])),
    st.tuples(st.integers(-500, 500), st.integers(1, 12)).map(lambda t: Fraction(t[0], t[1])),
)


def _render(v: Fraction, style: int) -> str:
    """`v` written the way models write numbers; every style must read back as `v`."""
    neg = "-" if v < 0 else ""
    a = abs(v)
    if a.denominator != 1 and style in (0, 1, 2, 3, 6) and A.format_number(a).count("/"):
        style = 4  # a repeating decimal: only a fraction writes it exactly
    plain = A.format_number(a)
    if style == 0:
        return neg + plain
    if style == 1:  # thousands separators and currency
        if a.denominator == 1:
            return f"{neg}${int(a):,}"
        ip, fp = plain.split(".")
        return f"{neg}${int(ip):,}.{fp}"
    if style == 2:  # trailing zeros and a unit
        return f"{neg}{plain}{'' if '.' in plain else '.'}000 apples"
    if style == 3:  # bold markdown
        return f"**{neg}{plain}**"
    if style == 4:
        return f"{neg}{a.numerator}/{a.denominator}"
    if style == 5:
        return f"{neg}\\frac{{{a.numerator}}}{{{a.denominator}}}"
    return f"\\boxed{{{neg}{plain}}}"


@settings(max_examples=300, deadline=None)
@given(v=_values, style=st.integers(0, 6),
       lead=st.sampled_from(["The answer is ", "Final answer: ", "So the answer is: ", "#### "]))
def test_numbers_round_trip(v, style, lead):
    gold = A.format_number(v)
    assert A.to_number(gold) == v
    task = make_task("numeric")
    text = f"We compute it carefully.\n{lead}{_render(v, style)}."
    g = task.grade(Question("q", "x", gold), text)
    assert g.verdict == "correct", (text, g)
    assert A.to_number(g.answer) == v
    assert task.grade(Question("q", "x", A.format_number(v + 1)), text).verdict == "wrong"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 10), data=st.data())
def test_letters_round_trip(n, data):
    labels = "ABCDEFGHIJ"[:n]
    options = {k: f"choice number {i} text" for i, k in enumerate(labels)}
    gold = data.draw(st.sampled_from(labels))
    form = data.draw(st.sampled_from(["({})", "{}", "{})", "option {}", "**{}**", "\\boxed{{{}}}", "[{}]"]))
    q = Question("q", "x", gold, options=options)
    task = make_task("multiple_choice")
    assert task.grade(q, f"Reasoning.\nThe answer is {form.format(gold)}.").verdict == "correct"
    other = labels[(labels.index(gold) + 1) % n]
    assert task.grade(q, f"Reasoning.\nThe answer is {form.format(other)}.").verdict == "wrong"
