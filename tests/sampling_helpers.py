"""Helpers shared by the sampling tests and their subprocess workers: a tiny arithmetic Task and its questions.

The tests do not depend on the real task module: this Task implements the same protocol in a few lines.
"""

from __future__ import annotations

import re

from orpo_distill.tasks.base import Grade, Question

_ANSWER = re.compile(r"answer is (-?\d+)")


class AddTask:
    name = "add"
    kind = "numeric"

    def user_message(self, q: Question) -> str:
        return f"What is {q.text}? Think step by step, then end with 'The answer is N.'"

    def answer_line(self, answer: str) -> str:
        return f"The answer is {answer}."

    def grade(self, q: Question, completion: str) -> Grade:
        found = _ANSWER.findall(completion)
        if not found:
            return Grade("unparsed", None)
        return Grade("correct" if found[-1] == q.gold else "wrong", found[-1])


def add_questions(n: int, start: int = 0) -> list[Question]:
    return [Question(id=f"q{i:04d}", text=f"{i} + {i % 7}", gold=str(i + i % 7)) for i in range(start, start + n)]


def comparable(traces) -> list[tuple]:
    """Trace content without wall-clock fields (created_at, latency_s), for run-vs-run equality."""
    out = []
    for t in traces:
        d = t.to_dict()
        d.pop("created_at")
        d.pop("latency_s")
        out.append(tuple(sorted((k, repr(v)) for k, v in d.items())))
    return out
