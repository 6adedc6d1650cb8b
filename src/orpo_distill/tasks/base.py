"""The task interface: a dataset row becomes a `Question`; a model's completion becomes a graded `Grade`.

Every task kind (multiple choice, numeric, yes/no, exact match, custom) implements `Task`. A task knows how to
phrase the "reason, then answer" instruction for a question (`user_message`), what its one fixed answer line
looks like (`answer_line`), and how to extract and grade the final answer of a completion (`grade`). How the user
message is wrapped for a particular model (chat template or plain) lives in `tasks/prompts.py`, because teacher
and student format their own prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Verdict = Literal["correct", "wrong", "unparsed"]


@dataclass(frozen=True)
class Question:
    """One question. `id` is stable across runs (the dataset's id, else a content hash)."""

    id: str
    text: str  # the question as shown to the model, options included for multiple choice
    gold: str  # canonical gold answer: "C", "18", "yes", or the normalised exact string
    options: dict[str, str] | None = None  # letter -> option text, multiple choice only
    rationale: str | None = None  # gold step-by-step rationale, when the dataset has one
    source: str = ""  # "file:line" provenance, for error messages
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Grade:
    verdict: Verdict
    answer: str | None  # the extracted (normalised) final answer, None when unparsed


class Task(Protocol):
    name: str
    kind: str

    def user_message(self, q: Question) -> str:
        """The instruction + question, asking for reasoning then the task's answer line."""
        ...

    def answer_line(self, answer: str) -> str:
        """The one fixed final line for an answer, e.g. 'The answer is (C).'"""
        ...

    def grade(self, q: Question, completion: str) -> Grade:
        """Extract the final answer of `completion` and compare it with `q.gold`."""
        ...

    # Optional: `first_error_offset(q, completion) -> int | None`, the character offset in `completion` where its
    # first wrong step starts (None: not located). Tasks that can check their steps implement it (the synthetic
    # task, the numeric kind's arithmetic); `objective.rejected_scope: after_first_error` reads it through
    # `first_error_offset` below, so a task without it (a custom grader, multiple choice) simply has none.


def first_error_offset(task: object, q: Question, completion: str) -> int | None:
    """The task's first-error locator applied to `completion`, or None when the task has none (the default).

    An offset outside 0..len(completion) is a bug in the task and raises ValueError.
    """
    locate = getattr(task, "first_error_offset", None)
    if locate is None:
        return None
    off = locate(q, completion)
    if off is None:
        return None
    if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= len(completion):
        raise ValueError(f"task {getattr(task, 'name', task)!r}: first_error_offset returned {off!r} for a "
                         f"completion of {len(completion)} characters; expected None or an offset in it")
    return off
