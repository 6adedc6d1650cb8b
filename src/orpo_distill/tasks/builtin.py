"""The built-in tasks: the paper's five benchmarks plus CommonsenseQA, each a task kind with the usual hub schema.

| name | kind | fields read (hub schema) | hub default |
| --- | --- | --- | --- |
| gsm8k | numeric | question, answer (worked solution ending "#### N") | openai/gsm8k (main) |
| arc_challenge, arc_easy, arc | multiple_choice | id, question, choices{text,label}, answerKey | allenai/ai2_arc |
| openbookqa | multiple_choice | id, question_stem, choices{text,label}, answerKey | allenai/openbookqa (main) |
| medqa | multiple_choice | question, options{A..E}, answer_idx (4 or 5 options) | GBaker/MedQA-USMLE-4-options |
| strategyqa | yes_no | qid, question, answer (bool), facts (-> rationale) | ChilleD/StrategyQA |
| commonsenseqa | multiple_choice | id, question, choices{label,text}, answerKey | tau/commonsense_qa |

`make_task(name, kind, grader)` is the one constructor: a built-in name, a generic kind name
(`multiple_choice`, `numeric`, `yes_no`, `exact`, `custom`), or a free name with an explicit kind.
"""

from __future__ import annotations

from collections.abc import Callable

from .kinds import KINDS, CustomTask, HubSource, MultipleChoiceTask, NumericTask, YesNoTask, _BaseTask

_ARC = {"id": ("id",), "question": ("question",), "options": ("choices",), "answer": ("answerKey",)}

BUILTIN: dict[str, Callable[[], _BaseTask]] = {
    "gsm8k": lambda: NumericTask(
        name="gsm8k", default_fields={"question": ("question",), "answer": ("answer",)},
        hub=HubSource("openai/gsm8k", "main")),
    "arc_challenge": lambda: MultipleChoiceTask(
        name="arc_challenge", default_fields=dict(_ARC), hub=HubSource("allenai/ai2_arc", "ARC-Challenge")),
    "arc_easy": lambda: MultipleChoiceTask(
        name="arc_easy", default_fields=dict(_ARC), hub=HubSource("allenai/ai2_arc", "ARC-Easy")),
    "arc": lambda: MultipleChoiceTask(name="arc", default_fields=dict(_ARC)),
    "openbookqa": lambda: MultipleChoiceTask(
        name="openbookqa", default_fields={**_ARC, "question": ("question_stem",)},
        hub=HubSource("allenai/openbookqa", "main")),
    "medqa": lambda: MultipleChoiceTask(
        name="medqa", default_fields={"question": ("question",), "options": ("options",),
                                      "answer": ("answer_idx",)},
        hub=HubSource("GBaker/MedQA-USMLE-4-options")),
    "strategyqa": lambda: YesNoTask(
        name="strategyqa", default_fields={"id": ("qid",), "question": ("question",), "answer": ("answer",),
                                           "rationale": ("facts",)},
        hub=HubSource("ChilleD/StrategyQA")),
    "commonsenseqa": lambda: MultipleChoiceTask(
        name="commonsenseqa", default_fields=dict(_ARC), hub=HubSource("tau/commonsense_qa")),
}


def task_names() -> list[str]:
    """Every name `make_task` accepts without an explicit kind."""
    return sorted([*BUILTIN, *KINDS, "synthetic"])


def make_task(name: str, kind: str = "auto", grader: str | None = None) -> _BaseTask:
    """A built-in task, a generic kind, or `name` graded as `kind`. Raises ValueError naming what is allowed."""
    if name in BUILTIN:
        task = BUILTIN[name]()
        if kind not in ("auto", task.kind):
            raise ValueError(f"task {name!r} is a {task.kind} task; kind={kind!r} does not apply (use kind: auto, "
                             f"or another task name for your own data)")
        return task
    if kind == "auto":
        if name not in KINDS:
            raise ValueError(f"unknown task {name!r}: use one of {', '.join(task_names())}, or set the task's kind "
                             f"({', '.join(KINDS)}) to grade your own data")
        kind = name
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind == "custom":
        if not grader:
            raise ValueError("kind custom needs a grader: `task.grader: module:function` (or --grader)")
        return CustomTask(name=name, grader=grader)
    if grader:
        raise ValueError(f"a grader applies to kind custom only (this task's kind is {kind})")
    return KINDS[kind](name=name)
