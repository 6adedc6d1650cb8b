"""What the `score` and `show-prompt` commands do: grade a predictions file; show one question's exact prompt.

Both take a `TaskConfig` whose `test` split names the data (what the command line builds from --task/--data),
so they read data exactly as a run does.
"""

from __future__ import annotations

import os
from typing import Any

from ..files import atomic_write_jsonl
from . import load_questions, load_task
from .loading import LoadReport, TaskDataError
from .prompts import render_prompt, uses_chat_template
from .scoring import read_predictions, score_predictions


def score_file(cfg: Any, predictions: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
               ) -> dict[str, Any]:
    """Accuracy of a predictions JSONL against the `test` split of `cfg`; `out` gets one graded row per question.

    The summary has accuracy, n, correct, wrong, unparsed, and `skipped` (rows dropped by skip_invalid).
    """
    task = load_task(cfg)
    report = LoadReport()
    questions = load_questions(cfg, "test", report=report)
    preds = read_predictions(predictions)
    summary, rows = score_predictions(task, questions, preds, n_rows=report.rows or None, where=str(predictions))
    if cfg.skip_invalid:
        summary["skipped"] = len(report.skipped)
    if out is not None:
        atomic_write_jsonl(out, rows)
    return summary


def show_prompt(cfg: Any, index: int, model: str | None = None, template: str = "auto",
                system_prompt: str | None = None, raw: bool = False) -> str:
    """Question `index` (0-based) of the `test` split as a model would be prompted, plus its gold answer line.

    With `model` (a local folder or hub id), that model's tokenizer renders it (its chat template, unless
    `template` is "plain"); without one, the plain template for base models. `raw`: the prompt text only.
    """
    task = load_task(cfg)
    questions = load_questions(cfg, "test")
    if not 0 <= index < len(questions):
        raise TaskDataError(f"--index {index} is out of range: there are {len(questions)} questions (0-based)")
    q = questions[index]
    tokenizer = None
    if model:
        from ..config import ModelConfig
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(model=model))
    elif template == "chat":
        raise TaskDataError("--template chat needs --model (whose chat template to use)")
    try:
        prompt = render_prompt(tokenizer, task.user_message(q), template, system_prompt)
        chat = uses_chat_template(tokenizer, template)
    except ValueError as e:
        raise TaskDataError(f"{model}: {e}") from None
    if raw:
        return prompt
    how = f"chat template of {model}" if chat else "plain template"
    parts = [f"=== prompt ({how}; task {task.name}, question {index}: {q.source or q.id}, id {q.id}) ===",
             prompt,
             "=== answer line for the gold answer ===", task.answer_line(q.gold)]
    if q.rationale:
        parts += ["=== gold rationale ===", q.rationale]
    # Section breaks are newlines; `raw` shows whether the prompt itself ends in one.
    return "\n".join(p.rstrip("\n") for p in parts) + "\n"
