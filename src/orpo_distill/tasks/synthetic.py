"""The synthetic reasoning task: seeded multi-step arithmetic word problems with gold step-by-step rationales.

A problem is a start amount followed by 2-4 operations (add, subtract, multiply by 2 or 3, divide by 2 or 3),
every value staying in 1..max_number; it is rendered as a short word problem ("Ann has 12 pens. She buys 7 more.
She loses 5. She doubles them. How many pens does she have now?") and solved by a rationale that writes one
equation per step, in one of several phrasings per step, ending in the answer line "The answer is N.". Splits
never overlap: a problem's split bucket is a fixed hash of its arithmetic (start and operations, not names or
wording), so a test problem's chain of computations never appears in train, validation or the models' build
split ("pretrain"), whatever the seed. The seed only chooses which problems of a bucket are drawn, in a stream, so
the first N questions of a split are the same for every requested size. The offline demo's tiny teacher and
student (`orpo_distill.demo.build`) are trained on the "pretrain" split.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

from .base import Grade, Question
from .kinds import NumericTask

# Split buckets over a fixed hash of the arithmetic (percent ranges). Independent of the seed on purpose: the
# shipped demo models were built on "pretrain" with one seed and must stay unseen-by-construction for every seed.
SPLIT_BUCKETS: dict[str, tuple[int, int]] = {
    "pretrain": (0, 50),
    "train": (50, 80),
    "validation": (80, 90),
    "test": (90, 100),
}
SPLIT_ALIASES = {"val": "validation", "dev": "validation"}

DEFAULT_OPTIONS: dict[str, Any] = {
    "n_pretrain": 50000,
    "n_train": 1000,
    "n_validation": 200,
    "n_test": 500,
    "min_steps": 2,
    "max_steps": 4,
    "max_number": 40,
    "seed": 0,
}

# (name, subject pronoun, object pronoun, possessive)
PEOPLE: tuple[tuple[str, str, str, str], ...] = (
    ("Ann", "She", "her", "her"), ("Ben", "He", "him", "his"), ("Cara", "She", "her", "her"),
    ("Dan", "He", "him", "his"), ("Eva", "She", "her", "her"), ("Finn", "He", "him", "his"),
    ("Gia", "She", "her", "her"), ("Hal", "He", "him", "his"), ("Ivy", "She", "her", "her"),
    ("Jon", "He", "him", "his"), ("Kim", "She", "her", "her"), ("Leo", "He", "him", "his"),
    ("Mia", "She", "her", "her"), ("Ned", "He", "him", "his"), ("Ola", "She", "her", "her"),
    ("Sam", "He", "him", "his"),
)
ITEMS: tuple[str, ...] = ("apples", "pens", "coins", "cards", "books", "eggs", "shells", "stamps", "marbles",
                          "cookies", "beads", "plums")

# Question wording per operation: {P} subject pronoun, {o} object pronoun, {n} operand.
Q_STEP: dict[str, tuple[str, ...]] = {
    "add": ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more.", "A friend gives {o} {n} more."),
    "sub": ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} uses {n}."),
    "mul2": ("{P} doubles them.", "Then the number doubles."),
    "mul3": ("{P} triples them.", "Then the number triples."),
    "div2": ("{P} keeps half of them.", "{P} gives away half of them."),
    "div3": ("{P} keeps a third of them.", "{P} keeps one third of them."),
}
Q_END: tuple[str, ...] = ("How many {item} does {p} have now?", "How many {item} are left?",
                          "How many {item} does {p} end with?")
# Rationale wording per operation: {a} before, {b} operand (or factor), {c} after, {item}.
R_START: tuple[str, ...] = ("{N} starts with {a} {item}.", "At first there are {a} {item}.", "Start with {a}.")
R_STEP: dict[str, tuple[str, ...]] = {
    "add": ("{a} + {b} = {c}.", "Adding {b} gives {a} + {b} = {c}.", "Then {a} + {b} = {c} {item}.",
            "{a} plus {b} is {c}."),
    "sub": ("{a} - {b} = {c}.", "Taking away {b} leaves {a} - {b} = {c}.", "Then {a} - {b} = {c} {item}.",
            "{a} minus {b} is {c}."),
    "mul": ("{a} * {b} = {c}.", "Multiplying by {b} gives {a} * {b} = {c}.", "Then {a} * {b} = {c} {item}.",
            "{a} times {b} is {c}."),
    "div": ("{a} / {b} = {c}.", "Dividing by {b} gives {a} / {b} = {c}.", "Then {a} / {b} = {c} {item}.",
            "{a} divided by {b} is {c}."),
}


class SyntheticOptionsError(ValueError):
    """Bad `task.synthetic` options; the message names the field."""


@dataclass(frozen=True)
class Problem:
    """The arithmetic of one problem: a start value and (op, operand) steps; op in add/sub/mul/div."""

    start: int
    steps: tuple[tuple[str, int], ...]

    def values(self) -> list[int]:
        """The running value after each step, the start included."""
        vals = [self.start]
        for op, n in self.steps:
            vals.append(apply_op(vals[-1], op, n))
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def key(self) -> str:
        return f"{self.start}|" + "|".join(f"{op}{n}" for op, n in self.steps)


def apply_op(a: int, op: str, n: int) -> int:
    if op == "add":
        return a + n
    if op == "sub":
        return a - n
    if op == "mul":
        return a * n
    if op == "div":
        if a % n:
            raise ValueError(f"{a} is not divisible by {n}")
        return a // n
    raise ValueError(f"unknown operation {op!r}")


def normalize_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in, types and ranges checked (errors name the `task.synthetic.<field>`)."""
    opts = dict(DEFAULT_OPTIONS)
    for k, v in (options or {}).items():
        if k not in DEFAULT_OPTIONS:
            raise SyntheticOptionsError(f"task.synthetic.{k}: unknown option; allowed: {', '.join(DEFAULT_OPTIONS)}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise SyntheticOptionsError(f"task.synthetic.{k}: must be an integer (got {v!r})")
        opts[k] = v
    for k in ("n_pretrain", "n_train", "n_validation", "n_test"):
        if opts[k] < 0:
            raise SyntheticOptionsError(f"task.synthetic.{k}: must be >= 0 (got {opts[k]})")
    if not 1 <= opts["min_steps"] <= opts["max_steps"] <= 12:
        raise SyntheticOptionsError(f"task.synthetic.min_steps/max_steps: need 1 <= min_steps <= max_steps <= 12 "
                                    f"(got {opts['min_steps']}, {opts['max_steps']})")
    if opts["max_number"] < 6:
        raise SyntheticOptionsError(f"task.synthetic.max_number: must be >= 6 (got {opts['max_number']})")
    return opts


def canonical_split(split: str) -> str:
    s = SPLIT_ALIASES.get(split, split)
    if s not in SPLIT_BUCKETS:
        raise SyntheticOptionsError(f"synthetic task: unknown split {split!r}; allowed: {', '.join(SPLIT_BUCKETS)}")
    return s


def split_of(problem: Problem) -> str:
    """The split a problem belongs to: a fixed hash of its arithmetic only."""
    h = int(hashlib.sha256(("synthetic-split|" + problem.key()).encode()).hexdigest()[:8], 16) % 100
    for name, (lo, hi) in SPLIT_BUCKETS.items():
        if lo <= h < hi:
            return name
    raise AssertionError("split buckets must cover 0..99")


def _draw_problem(rng: random.Random, min_steps: int, max_steps: int, max_number: int) -> Problem:
    n_steps = rng.randint(min_steps, max_steps)
    start = value = rng.randint(2, max_number)
    steps: list[tuple[str, int]] = []
    for _ in range(n_steps):
        choices: list[tuple[str, int]] = []
        if value < max_number:
            choices.append(("add", 0))
        if value > 1:
            choices.append(("sub", 0))
        for k in (2, 3):
            if value * k <= max_number:
                choices.append(("mul", k))
            if value % k == 0 and value >= k:
                choices.append(("div", k))
        op, k = rng.choice(choices)
        if op == "add":
            n = rng.randint(1, max_number - value)
        elif op == "sub":
            n = rng.randint(1, value - 1)
        else:
            n = k
        steps.append((op, n))
        value = apply_op(value, op, n)
    return Problem(start, tuple(steps))


def _step_template_key(op: str, n: int) -> str:
    if op in ("mul", "div"):
        return f"{op}{n}"
    return op


def render_question(problem: Problem, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The word problem's text and the wording choices (person, item) that the rationale reuses."""
    name, subj, obj, _poss = rng.choice(PEOPLE)
    item = rng.choice(ITEMS)
    parts = [f"{name} has {problem.start} {item}."]
    for op, n in problem.steps:
        parts.append(rng.choice(Q_STEP[_step_template_key(op, n)]).format(P=subj, o=obj, n=n))
    parts.append(rng.choice(Q_END).format(item=item, p=subj.lower()))
    return " ".join(parts), {"name": name, "item": item}


def render_rationale(problem: Problem, name: str, item: str, rng: random.Random) -> str:
    """One gold rationale, its phrasing drawn from `rng`; every rendering is correct."""
    vals = problem.values()
    parts = [rng.choice(R_START).format(N=name, a=problem.start, item=item)]
    for (op, n), a, c in zip(problem.steps, vals[:-1], vals[1:]):
        parts.append(rng.choice(R_STEP[op]).format(a=a, b=n, c=c, item=item))
    parts.append(answer_line(str(problem.answer)))
    return " ".join(parts)


def answer_line(answer: str) -> str:
    return f"The answer is {answer}."


def _question_from_problem(problem: Problem, split: str, rng: random.Random) -> Question:
    text, wording = render_question(problem, rng)
    rationale = render_rationale(problem, wording["name"], wording["item"], rng)
    qid = "syn-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    meta = {"split": split, "start": problem.start, "steps": [list(s) for s in problem.steps], **wording}
    return Question(id=qid, text=text, gold=str(problem.answer), rationale=rationale, source=f"synthetic:{split}",
                    meta=meta)


def problem_of(q: Question) -> Problem:
    """The arithmetic behind a synthetic question (from its meta)."""
    return Problem(int(q.meta["start"]), tuple((str(op), int(n)) for op, n in q.meta["steps"]))


def rationale_variant(q: Question, rng: random.Random) -> str:
    """A freshly worded gold rationale for `q` (the demo build trains on many wordings of each problem)."""
    return render_rationale(problem_of(q), q.meta["name"], q.meta["item"], rng)


def load_questions(split: str, options: dict[str, Any] | None = None, limit: int | None = None) -> list[Question]:
    """The first `limit` (default: `n_<split>`) questions of a split; the same seed gives the same list."""
    opts = normalize_options(options)
    split = canonical_split(split)
    if limit is not None and limit < 0:
        raise SyntheticOptionsError(f"synthetic task: limit must be >= 0 (got {limit})")
    n = opts[f"n_{split}"] if limit is None else min(limit, opts[f"n_{split}"])
    rng = random.Random(f"synthetic|{opts['seed']}|{split}")
    seen: set[str] = set()
    out: list[Question] = []
    misses = 0
    while len(out) < n:
        problem = _draw_problem(rng, opts["min_steps"], opts["max_steps"], opts["max_number"])
        # Word choices come from the same stream, so a problem's wording is fixed by the seed and its position.
        wording_rng = random.Random(rng.getrandbits(64))
        if split_of(problem) != split or problem.key() in seen:
            misses += 1
            if misses > 200 * (n + 100):
                raise SyntheticOptionsError(
                    f"synthetic task: cannot draw {n} distinct {split} problems with max_number="
                    f"{opts['max_number']}, steps {opts['min_steps']}-{opts['max_steps']}; ask for fewer")
            continue
        seen.add(problem.key())
        out.append(_question_from_problem(problem, split, wording_rng))
    return out


class SyntheticTask:
    """The synthetic arithmetic task (numeric kind): questions, the plain prompt message, grading."""

    name = "synthetic"
    kind = "numeric"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = normalize_options(options)
        # Grading is the numeric kind's (last answer statement wins; "17 or 18" is wrong; no answer: unparsed).
        self._numeric = NumericTask(name=self.name)

    def load_questions(self, split: str, limit: int | None = None) -> list[Question]:
        return load_questions(split, self.options, limit)

    def user_message(self, q: Question) -> str:
        # Only the problem: tiny models have a short context, and the answer line is learned from the traces.
        return q.text

    def answer_line(self, answer: str) -> str:
        return answer_line(answer)

    def grade(self, q: Question, completion: str) -> Grade:
        return self._numeric.grade(q, completion)

    def first_error_offset(self, q: Question, completion: str) -> int | None:
        return first_error_offset(q, completion)


# One written step: "12 + 7 = 19", "12 plus 7 is 19", "Multiplying by 2 gives 12 * 2 = 24" (the equation part).
_STEP = re.compile(r"(-?\d+)\s*([-+*/x×]|plus|minus|times|divided by)\s*(-?\d+)\s*(?:=|is)\s*(-?\d+)")
_STEP_OPS = {"+": "add", "plus": "add", "-": "sub", "minus": "sub", "*": "mul", "x": "mul", "×": "mul",
             "times": "mul", "/": "div", "divided by": "div"}
_ANSWER = re.compile(r"(?:the\s+)?answer is\s*(-?\d+)", re.IGNORECASE)
_INT = re.compile(r"-?\d+")


def first_error_offset(q: Question, completion: str) -> int | None:
    """Where the first wrong step of a synthetic rationale starts (a character offset), or None.

    The completion's steps are read in order (`a op b = c` or its worded forms) and held against the problem's
    chain: the first number that differs from what the problem needs is the error, in the order the text states
    it: a wrong start amount, then per step a wrong running value `a` (a copying slip, or a skipped step), a
    wrong operation, a wrong operand `b`, a wrong result `c` (wrong arithmetic, or a result the chain does not
    reach); a step beyond the last one is wrong from its first number; after the last step, an answer line that
    differs from the gold answer is wrong at its number, and an answer line that comes before the chain is
    complete is wrong from its start ("The answer is", where the next step should have been). None when
    nothing is wrong or nothing can be read (no step and no answer line)."""
    problem = problem_of(q)
    vals = problem.values()
    steps = list(_STEP.finditer(completion))
    first_num = _INT.search(completion)
    if first_num is not None and (not steps or first_num.start() < steps[0].start()):
        if int(first_num.group()) != problem.start:  # the start sentence names the wrong amount
            return first_num.start()
    for i, m in enumerate(steps):
        if i >= len(problem.steps):
            return m.start()
        a, op, b, c = int(m.group(1)), _STEP_OPS[m.group(2)], int(m.group(3)), int(m.group(4))
        want_op, want_n = problem.steps[i]
        if a != vals[i]:
            return m.start(1)
        if op != want_op:
            return m.start(2)
        if b != want_n:
            return m.start(3)
        if c != vals[i + 1]:
            return m.start(4)
    answers = [m for m in _ANSWER.finditer(completion) if not steps or m.start() > steps[-1].end()]
    if not answers:
        return None
    ans = answers[-1]
    if len(steps) < len(problem.steps):
        return ans.start()
    if int(ans.group(1)) != problem.answer:
        return ans.start(1)
    return None
