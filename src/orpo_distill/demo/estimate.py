"""Estimate what a demo config costs on this machine, from measured unit costs of the shipped tiny models.

It times the project's own pieces on a few questions (the transformers sampler for teacher and student traces,
a greedy evaluation pass, an SFT step and an ORPO step with the project's losses and the config's batch size),
measures the shares that decide how much work there is (correct teacher traces kept after the ROUGE-L filter,
wrong student traces), and multiplies out the pipeline's work for the config: teacher and initial-student
traces, every variant x seed x epoch of training, the student refreshes of on/mixed-policy, and the per-epoch
evaluations. It is an estimate for choosing sizes, not a benchmark: the pipeline adds its own overheads (store
writes, checkpoints, plots), and other jobs on a shared CPU change everything.

    python -m orpo_distill.demo.estimate [CONFIG] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from . import assets_dir


def _demo_cfg(path: str | None, overrides: list[str]) -> Config:
    import yaml

    from ..config import apply_overrides

    p = Path(path) if path else Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    quick = data.pop("quick", None) or {}
    if "--quick" in overrides:
        overrides = [f"{k}={json.dumps(v)}" for k, v in quick.items()] + [o for o in overrides if o != "--quick"]
    for role in ("teacher", "student"):
        if not data.get(role, {}).get("model"):
            data.setdefault(role, {})["model"] = str(assets_dir() / role)
    return config_from_dict(apply_overrides(data, overrides), str(p))


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure_units(cfg: Config, n_questions: int = 24) -> dict[str, float]:
    """Seconds per unit of work and the shares that scale the work, measured on `n_questions` train questions."""
    from rouge_score import rouge_scorer

    from ..loss import ORPOLoss, SFTLoss
    from ..pairs import encode_completion, encode_prompt
    from ..sampling.base import SamplingParams
    from ..sampling.hf import HFGenerator
    from ..tasks import load_task
    from ..tasks.prompts import render_prompt

    task = load_task(cfg.task)
    qs = task.load_questions("train", limit=n_questions) if hasattr(task, "load_questions") else []
    msgs = [task.user_message(q) for q in qs]
    k = cfg.sampling.k
    params = SamplingParams(n=k, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.sampling.seed)
    teacher = HFGenerator.from_config(cfg.teacher, device=torch.device("cpu"))
    student = HFGenerator.from_config(cfg.student, device=torch.device("cpu"))
    t_out, t_s = _timed(teacher.generate, msgs, params)
    s_out, s_s = _timed(student.generate, msgs, params)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens or params.max_new_tokens)
    # Evaluation batches are full (eval.batch_size prompts), so time a full batch.
    eval_msgs = (msgs * math.ceil(cfg.eval.batch_size / max(1, len(msgs))))[:cfg.eval.batch_size]
    student.batch_size = cfg.eval.batch_size
    _, g_s = _timed(student.generate, eval_msgs, greedy)
    g_s *= len(msgs) / max(1, len(eval_msgs))

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    kept_pos, t_correct, s_wrong, pos_q = 0, 0, 0, 0
    chosen, rejected = [], []
    for q, tc, sc in zip(qs, t_out, s_out):
        kept: list[str] = []
        for c in tc:
            if task.grade(q, c.text).verdict == "correct":
                t_correct += 1
                if all(scorer.score(x, c.text)["rougeL"].fmeasure <= cfg.sampling.rouge_threshold for x in kept):
                    kept.append(c.text)
        wrong = [c.text for c in sc if task.grade(q, c.text).verdict == "wrong"]
        s_wrong += len(wrong)
        kept_pos += len(kept)
        pos_q += bool(kept)
        for i, pos in enumerate(kept):
            chosen.append((render_prompt(None, task.user_message(q), "plain"), pos))
            if wrong:
                rejected.append(wrong[i % len(wrong)])

    # Training steps with the project's losses on real traces, at the config's batch size.
    from ..models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.student)
    model = load_model(cfg.student, device=torch.device("cpu")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    b = cfg.trainer.batch_size

    def batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        t = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), t), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        comp = torch.zeros_like(ids)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            att[i, :len(p) + len(c)] = 1
            comp[i, len(p):len(p) + len(c)] = 1
        return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}

    enc_c = [(encode_prompt(tok, p), encode_completion(tok, c)) for p, c in chosen]
    enc_r = [(p, encode_completion(tok, r)) for (p, _), r in zip(enc_c, rejected)]
    n_pairs = min(len(enc_c), len(enc_r))
    sft, orpo = SFTLoss(), ORPOLoss(lam=cfg.objective.lam)

    def step(loss_fn, rows) -> None:
        loss, _ = loss_fn(model, batch(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reps = 3
    sft_rows = (enc_c * math.ceil(b / max(1, len(enc_c))))[:b]
    _, sft_s = _timed(lambda: [step(sft, sft_rows) for _ in range(reps)])
    pair_rows = ((enc_c[:n_pairs] + enc_r[:n_pairs]) if n_pairs else sft_rows)
    chosen_rows = (pair_rows[:n_pairs] * math.ceil(b / max(1, n_pairs)))[:b]
    rej_rows = (pair_rows[n_pairs:] * math.ceil(b / max(1, n_pairs)))[:b] if n_pairs else chosen_rows
    _, orpo_s = _timed(lambda: [step(orpo, chosen_rows + rej_rows) for _ in range(reps)])
    n = len(qs)
    return {
        "teacher_s_per_sample": t_s / (n * k), "student_s_per_sample": s_s / (n * k), "greedy_s_per_question": g_s / n,
        "sft_s_per_sequence": sft_s / (reps * b), "orpo_s_per_pair": orpo_s / (reps * b),
        "teacher_correct_share": t_correct / (n * k), "kept_positives_per_question": kept_pos / n,
        "questions_with_positive": pos_q / n, "student_wrong_share": s_wrong / (n * k),
        "mean_student_completion_tokens": sum(c.n_tokens for row in s_out for c in row) / (n * k),
    }


# Unit costs measured on this project's 2-core CPU with one torch thread and the shipped demo models (the
# pipeline's ETA starts from these and then follows what the run itself measures).
DEFAULT_UNITS: dict[str, float] = {
    "teacher_s_per_sample": 0.0066, "student_s_per_sample": 0.0034, "greedy_s_per_question": 0.01,
    "sft_s_per_sequence": 0.125 / 32, "orpo_s_per_pair": 0.245 / 32, "teacher_correct_share": 0.9,
    "kept_positives_per_question": 7.0, "questions_with_positive": 1.0, "student_wrong_share": 0.9}


def variant_seconds(cfg: Config, variant: str, u: dict[str, float]) -> float:
    """Seconds one seed of `variant` costs (training, refreshes, evaluations), from its spec and the unit costs;
    works for any variant in `train.SPECS` (a new row needs no entry here)."""
    from ..train import variant_spec

    spec = variant_spec(variant)
    syn = cfg.task.synthetic
    n = cfg.task.train.limit or syn.get("n_train", 1000)
    t = cfg.task.test.limit or syn.get("n_test", 500)
    if cfg.eval.split == "validation":
        t = cfg.task.validation.limit or syn.get("n_validation", 200)
    k, sk = cfg.sampling.k, cfg.sampling.student_k or cfg.sampling.k
    e = cfg.trainer.epochs
    if spec.objective == "none":
        return t * u["greedy_s_per_question"]
    evals = (e if cfg.eval.every_epoch else 1) * t * u["greedy_s_per_question"]
    pos = u["kept_positives_per_question"]
    if spec.objective == "sft":
        per_q = u["questions_with_positive"] if spec.chosen == "one" else pos
        return e * n * per_q * u["sft_s_per_sequence"] + evals
    cap = cfg.pairs.max_pairs_per_question or 10**9
    neg = (1 - u["teacher_correct_share"]) * k if spec.negatives == "teacher" else u["student_wrong_share"] * sk
    pairs_q = min(cap, max(pos, neg)) * u["questions_with_positive"]
    phi = cfg.policy.phi if spec.phi is None else spec.phi
    refresh = 0.0 if spec.negatives != "student" else (e - 1) * phi * n * sk * u["student_s_per_sample"]
    return e * n * pairs_q * u["orpo_s_per_pair"] + evals + refresh


def estimate(cfg: Config, u: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of `orpo-distill run` for `cfg`, from the unit costs `u` (all variants x seeds in
    sequence; with `run.workers` N they spread over N processes)."""
    syn = cfg.task.synthetic
    n = cfg.task.train.limit or syn.get("n_train", 1000)
    k, sk = cfg.sampling.k, cfg.sampling.student_k or cfg.sampling.k
    out = {"teacher_traces": n * k * u["teacher_s_per_sample"],
           "initial_student_traces": n * sk * u["student_s_per_sample"]}
    for v in cfg.run.variants:
        out[v] = cfg.run.seeds * variant_seconds(cfg, v, u)
    out["total"] = sum(out.values())
    return {key: round(val, 1) for key, val in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orpo_distill.demo.estimate", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=None, help="default: the shipped demo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted overrides; `--quick` applies the config's quick section")
    ap.add_argument("--questions", type=int, default=24, help="questions the unit costs are measured on")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while measuring")
    args, extra = ap.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _demo_cfg(args.config, list(args.overrides) + extra)
    units = measure_units(cfg, args.questions)
    print(json.dumps({"units": {k: round(v, 4) for k, v in units.items()}, "seconds": estimate(cfg, units),
                      "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
