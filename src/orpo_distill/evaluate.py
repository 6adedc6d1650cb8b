"""Evaluation: a generator answers a task's questions; we grade them into accuracy and a predictions file.

Greedy decoding (temperature 0, one sample) by default; with `majority_k > 1`, k samples per question at the
given temperature and a majority vote over their parsed answers (unparsed samples do not vote; ties go to the
answer that appears first in sample order, so the vote is deterministic given the samples). Generation is the
only impure step (`evaluate`); grading and voting (`grade_completions`, `majority_vote`) are pure functions of
their inputs. The predictions file has one JSON row per question in question order with a `completion` field,
and the question's `id`, which is exactly what `orpo-distill score --predictions` reads
(`tasks.scoring.read_predictions`), so re-scoring it gives the same accuracy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ModelConfig, TaskConfig
from .errors import UserError
from .files import atomic_write_text
from .sampling.base import Completion, Generator, SamplingParams
from .tasks.base import Grade, Question, Task


@dataclass
class EvalResult:
    """Accuracy of one model on one list of questions, with every prediction.

    `predictions[i]` belongs to `questions[i]`: `id`, `gold`, `completion` (the graded text; for majority vote
    a sample that gave the voted answer, so re-scoring the file reproduces `accuracy`), `answer`
    (the extracted answer, None when unparsed), `verdict`; for majority vote also `votes` (answer -> count)
    and `samples` (each sample's `completion`, `answer`, `verdict`).
    """

    accuracy: float  # correct / n, in 0..1
    n: int
    correct: int
    wrong: int
    unparsed: int
    predictions: list[dict[str, Any]]
    majority_k: int = 1
    temperature: float = 0.0
    seed: int = 0
    max_new_tokens: int | None = None
    task: str = ""
    model_id: str = ""
    revision: str = ""
    generated_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Everything but the predictions: what `metrics.json` holds and `eval` prints."""
        d = asdict(self)
        d.pop("predictions")
        extra = d.pop("extra")
        d.update(extra)
        return d


def majority_vote(grades: Sequence[Grade]) -> tuple[int | None, dict[str, int]]:
    """The index of the sample whose answer wins the vote, and the vote counts.

    Only parsed samples (answer not None, verdict not "unparsed") vote. The winner has the most votes; a tie
    goes to the answer seen first in sample order. The index is the first sample with the winning answer (a
    "correct" one if any). Returns (None, {}) when no sample parsed.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, g in enumerate(grades):
        if g.verdict == "unparsed" or g.answer is None:
            continue
        counts[g.answer] = counts.get(g.answer, 0) + 1
        first.setdefault(g.answer, i)
    if not counts:
        return None, {}
    # max over (votes, -first index): most votes, then earliest first appearance.
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    # The representative sample: the first with the winning answer, preferring a "correct" one (a sample that
    # states the gold answer but also another one grades "wrong" with the same extracted answer).
    for i, g in enumerate(grades):
        if g.answer == winner and g.verdict == "correct":
            return i, counts
    return first[winner], counts


def grade_completions(task: Task, questions: Sequence[Question], completions: Sequence[Sequence[str]],
                      *, majority_k: int = 1) -> EvalResult:
    """Grade `completions[i]` (one text, or `majority_k` texts) against `questions[i]`; pure.

    With one completion per question its grade is the prediction; with several, the majority vote picks it.
    """
    if len(completions) != len(questions):
        raise ValueError(f"{len(completions)} completion lists for {len(questions)} questions")
    preds: list[dict[str, Any]] = []
    tally = {"correct": 0, "wrong": 0, "unparsed": 0}
    for q, texts in zip(questions, completions, strict=True):
        if not texts:
            raise ValueError(f"question {q.id!r} ({q.source or 'no source'}): no completion to grade")
        grades = [task.grade(q, t) for t in texts]
        row: dict[str, Any] = {"id": q.id, "gold": q.gold}
        if len(texts) == 1 and majority_k == 1:
            g = grades[0]
            row.update(completion=texts[0], answer=g.answer, verdict=g.verdict)
        else:
            idx, votes = majority_vote(grades)
            if idx is None:
                # Nothing parsed: keep the first sample so that re-scoring the file also says "unparsed".
                row.update(completion=texts[0], answer=None, verdict="unparsed")
            else:
                row.update(completion=texts[idx], answer=grades[idx].answer, verdict=grades[idx].verdict)
            row["votes"] = votes
            row["samples"] = [{"completion": t, "answer": g.answer, "verdict": g.verdict}
                              for t, g in zip(texts, grades, strict=True)]
        tally[row["verdict"]] += 1
        preds.append(row)
    n = len(questions)
    return EvalResult(accuracy=tally["correct"] / n if n else 0.0, n=n, correct=tally["correct"],
                      wrong=tally["wrong"], unparsed=tally["unparsed"], predictions=preds,
                      majority_k=majority_k, task=getattr(task, "name", ""))


def evaluate(generator: Generator, task: Task, questions: Sequence[Question], *, max_new_tokens: int,
             majority_k: int = 1, temperature: float = 0.8, seed: int = 0, batch_size: int = 32,
             progress: bool = True, stop: Sequence[str] = ()) -> EvalResult:
    """Generate answers for `questions` with `generator` and grade them with `task`.

    `majority_k == 1` is greedy decoding (temperature 0, one sample; `temperature` is ignored).
    `majority_k > 1` samples k completions per question at `temperature` and takes the majority vote.
    Questions are sent to the generator `batch_size` at a time (the backend may batch further inside).
    """
    # Bad arguments are the user's (command-line values, config keys): UserError, a ValueError, exit 2.
    if not questions:
        raise UserError("no questions to evaluate (the split is empty: check its path, limit or n_<split>)")
    if majority_k < 1:
        raise UserError(f"majority_k must be >= 1, got {majority_k}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:  # 0 would "answer" nothing and report 0% accuracy as if it were a result
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if majority_k > 1 and temperature <= 0:
        raise UserError("majority vote needs temperature > 0 (at temperature 0 all k samples are the same)")
    temp = 0.0 if majority_k == 1 else float(temperature)
    params = SamplingParams(n=majority_k, temperature=temp, max_new_tokens=max_new_tokens, stop=tuple(stop),
                            seed=seed)
    messages = [task.user_message(q) for q in questions]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), desc=f"eval {getattr(task, 'name', '')}".strip(), unit="q")
    outs: list[list[Completion]] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(messages), batch_size):
            chunk = messages[start:start + batch_size]
            got = generator.generate(chunk, params)
            if len(got) != len(chunk):
                raise RuntimeError(f"generator returned {len(got)} results for {len(chunk)} prompts")
            for i, comps in enumerate(got):
                if len(comps) != majority_k:
                    q = questions[start + i]
                    raise RuntimeError(f"generator returned {len(comps)} completions for question {q.id!r}, "
                                       f"expected {majority_k}")
            outs.extend(got)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    result = grade_completions(task, questions, [[c.text for c in comps] for comps in outs],
                               majority_k=majority_k)
    result.temperature = temp
    result.seed = seed
    result.max_new_tokens = max_new_tokens
    result.model_id = getattr(generator, "model_id", "")
    result.revision = getattr(generator, "revision", "")
    result.generated_tokens = sum(c.n_tokens for comps in outs for c in comps)
    result.prompt_tokens = sum(c.prompt_tokens for comps in outs for c in comps)
    result.seconds = seconds
    return result


def write_predictions(path: str | os.PathLike[str], result: EvalResult) -> Path:
    """One JSON row per question, in question order, each with a `completion` field (the `score` format)."""
    p = Path(path)
    atomic_write_text(p, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions))
    return p


def write_metrics(path: str | os.PathLike[str], result: EvalResult) -> Path:
    """`result.metrics()` as pretty JSON."""
    p = Path(path)
    atomic_write_text(p, json.dumps(result.metrics(), indent=2, ensure_ascii=False) + "\n")
    return p


def evaluate_with_config(generator: Generator, task: Task, questions: Sequence[Question], cfg: Config, *,
                         progress: bool = True) -> EvalResult:
    """`evaluate` with a run config's evaluation settings (the trainer's per-epoch eval, the sweeps' validation)."""
    return evaluate(generator, task, list(questions), max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                    majority_k=cfg.eval.majority_k, temperature=cfg.sampling.temperature, seed=cfg.sampling.seed,
                    batch_size=cfg.eval.batch_size, progress=progress, stop=tuple(cfg.sampling.stop))


def run_eval(model: ModelConfig, task_cfg: TaskConfig, out_dir: str | os.PathLike[str] | None, *,
             split: str = "test", max_new_tokens: int = 512, majority_k: int = 1, temperature: float = 0.8,
             seed: int = 0, batch_size: int = 32, progress: bool = True) -> EvalResult:
    """The `eval` command: load the task's `split` and the model (HF backend), evaluate, and write
    `out_dir/predictions.jsonl` and `out_dir/metrics.json` (nothing is written when `out_dir` is None)."""
    from .sampling.hf import HFGenerator
    from .tasks import load_questions, load_task

    task = load_task(task_cfg)
    questions = load_questions(task_cfg, split)
    generator = HFGenerator.from_config(model)
    result = evaluate(generator, task, questions, max_new_tokens=max_new_tokens, majority_k=majority_k,
                      temperature=temperature, seed=seed, batch_size=batch_size, progress=progress)
    split_cfg = getattr(task_cfg, split)
    result.extra.update(data=split_cfg.path, split=split)
    if out_dir is not None:
        write_predictions(Path(out_dir) / "predictions.jsonl", result)
        write_metrics(Path(out_dir) / "metrics.json", result)
    return result
