"""The trainer on tiny models: every variant lowers its loss, the policies sample what they should, fallbacks,
outputs (model, card, logs, result.json as done-marker), LoRA, and the CLI's error when traces are missing.

The helpers here (`ArithTask`, `make_store`, `tiny_config`) are also used by test_train_resume.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import set_dotted

from orpo_distill.config import Config
from orpo_distill.tasks.base import Grade, Question


@dataclass
class ArithTask:
    """A tiny task: 'What is a + b?'; a completion is correct when it ends with the right answer line, and any
    other completion is wrong (so a random tiny student produces usable negatives)."""

    name: str = "arith"
    kind: str = "numeric"

    def user_message(self, q: Question) -> str:
        return f"{q.text}\nReason step by step, then end with 'The answer is X.'"

    def answer_line(self, answer: str) -> str:
        return f"The answer is {answer}."

    def grade(self, q: Question, completion: str) -> Grade:
        import re

        m = re.findall(r"The answer is (-?\d+)", completion)
        if not m:
            return Grade("wrong", None)
        return Grade("correct" if m[-1] == q.gold else "wrong", m[-1])


def make_questions(n: int, seed: int = 0) -> list[Question]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(Question(id=f"q{i}", text=f"What is {a} + {b}?", gold=str(a + b),
                            rationale=f"{a} + {b} = {a + b}.\nThe answer is {a + b}."))
    return out


def tiny_config(student_dir: Path, out_dir: Path, **over) -> Config:
    from orpo_distill.config import config_from_dict

    d = {
        "run": {"out_dir": str(out_dir), "seed": 0},
        "teacher": {"model": "tiny-teacher", "backend": "openai"},
        "student": {"model": str(student_dir), "device": "cpu", "batch_size": 8},
        "sampling": {"k": 4, "student_k": 2, "temperature": 1.0, "max_new_tokens": 8, "seed": 0},
        "pairs": {"max_length": 96, "max_prompt_length": 64},
        "objective": {"lam": 1.0},
        "trainer": {"epochs": 3, "lr": 3e-3, "batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.1,
                    "max_grad_norm": 1.0, "report_to": ["jsonl"], "group_by_length": True},
        "eval": {"max_new_tokens": 8, "batch_size": 8, "every_epoch": True},
    }
    return config_from_dict(set_dotted(d, over))


def make_store(cfg: Config, questions: list[Question], task: ArithTask, *, teacher_correct=3, teacher_wrong=1,
               student_all_right=(), no_teacher_correct=()):
    """A real TraceStore with the teacher's traces (k per question: correct ones first, then wrong) and the
    initial student's traces (all wrong, except for the questions in `student_all_right`)."""
    from orpo_distill.sampling.stage import model_identity, params_from_config, store_path
    from orpo_distill.store import Trace, TraceStore, trace_key

    store = TraceStore(store_path(cfg))
    rows = []
    for role, source, mcfg in (("teacher", "teacher", cfg.teacher), ("student", "initial", cfg.student)):
        params = params_from_config(cfg, role)
        pd = params.as_dict()
        pd.pop("n")
        model_id, rev = model_identity(mcfg)
        for q in questions:
            msg = task.user_message(q)
            a, b = q.text.removeprefix("What is ").removesuffix("?").split(" + ")
            for i in range(params.n):
                if role == "teacher":
                    good = i < teacher_correct and q.id not in no_teacher_correct
                    text = (f"{a} + {b} = {q.gold}. The answer is {q.gold}." if good
                            else f"{a} + {b} = {int(q.gold) + 1 + i}. The answer is {int(q.gold) + 1 + i}.")
                else:
                    good = q.id in student_all_right
                    text = f"The answer is {q.gold}." if good else f"{a} {b} The answer is {int(q.gold) - 1 - i}."
                g = task.grade(q, text)
                rows.append(Trace(key=trace_key(role, model_id, rev, source, msg, params, i), question_id=q.id,
                                  role=role, source=source, model_id=model_id, revision=rev, checkpoint=None,
                                  sample_index=i, seed=params.seed, params=pd, prompt=msg, completion=text,
                                  n_tokens=len(text.split()), prompt_tokens=0, finish_reason="stop",
                                  latency_s=0.0, answer=g.answer, verdict=g.verdict, kept=True, created_at=0.0))
    store.add(rows)
    return store


@pytest.fixture
def setup(tmp_path, tiny_llama_dir):
    task = ArithTask()
    qs = make_questions(8)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "run")
    store = make_store(cfg, qs, task, student_all_right={"q7"})
    yield cfg, task, qs, store
    store.close()


def _train(cfg, variant, task, qs, store, out=None, **kw):
    from orpo_distill.train import train_variant, variant_dir

    return train_variant(cfg, variant, 0, out or variant_dir(cfg, variant, 0), task=task, train_questions=qs,
                         eval_questions=kw.pop("eval_questions", qs[:4]), store=store, progress=False, **kw)


# ---------------------------------------------------------------- every variant trains

@pytest.mark.parametrize("variant", ["sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on",
                                     "orpo_mixed"])
def test_each_variant_reduces_its_loss(setup, variant):
    cfg, task, qs, store = setup
    res = _train(cfg, variant, task, qs, store)
    losses = [e["train_loss"] for e in res["per_epoch"]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    assert res["final_eval"]["n"] == 4 and all("eval" in e for e in res["per_epoch"])
    if variant.startswith("orpo"):
        odds = [e["train_log_odds"] for e in res["per_epoch"]]
        assert odds[-1] > odds[0], odds  # the chosen traces pull ahead of the rejected ones
        assert res["lam"] == 1.0
    else:
        assert "train_log_odds" not in res["per_epoch"][0]
    pairs = res["per_epoch"][0]["pairs"]
    if variant == "sft_single":
        assert (pairs["pairs"], pairs["sft_only"]) == (0, 8)  # one teacher trace per question
    elif variant == "sft_diverse":
        assert (pairs["pairs"], pairs["sft_only"]) == (0, 24)  # all 3 kept correct traces
    elif variant == "orpo_teacher_neg":
        assert (pairs["pairs"], pairs["sft_only"]) == (24, 0)
        assert res["per_epoch"][0]["pool"]["from_teacher"] == 8
    else:  # student negatives: cycle 3 positives x 2 negatives -> 3 pairs; q7 has none -> teacher fallback
        assert res["per_epoch"][0]["pool"]["fallback_teacher"] == 1 and pairs["pairs"] == 24


def test_policies_sample_the_live_student_as_phi_says(setup):
    cfg, task, qs, store = setup
    calls = []

    def counting(model, tokenizer, trained, questions):
        from orpo_distill.train import default_sampler

        calls.append((trained, sorted(q.id for q in questions)))
        return default_sampler(cfg, current, 0, task, store, Path("."), False)(model, tokenizer, trained, questions)

    for current in ("orpo_off", "orpo_on"):
        calls.clear()
        res = _train(cfg, current, task, qs, store, sampler=counting, eval_questions=None)
        stats = [e["pool"] for e in res["per_epoch"]]
        if current == "orpo_off":
            assert calls == [] and all(s["sampled_questions"] == 0 for s in stats)
            assert all(s["share_current"] == 0.0 for s in stats[1:]) and stats[2]["mean_age"] == 2
        else:
            assert calls == [(1, [q.id for q in qs]), (2, [q.id for q in qs])]
            assert [s["sampled_questions"] for s in stats] == [0, 8, 8]
            # the fresh traces are in the store under this variant's revision, with their source
            from orpo_distill.train import student_revision

            fresh = store.traces(role="student", source="epoch:2")
            assert len(fresh) == 16 and {t.revision for t in fresh} == {student_revision(cfg, current, 0, 2)}
            assert stats[2]["share_current"] > 0.5 and stats[2]["mean_age"] < 1
            assert res["costs"]["student_sampled_questions"] == 16


def test_outputs_done_marker_and_model_card(setup, tmp_path):
    cfg, task, qs, store = setup
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={
        "epochs": 2, "report_to": ["jsonl", "tensorboard"]})})
    out = tmp_path / "v"
    res = _train(cfg, "orpo_mixed", task, qs, store, out=out)
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(res))
    card = (out / "model" / "README.md").read_text()
    assert "tiny-teacher" in card and "phi 0.5" in card and "lambda | 1.0" in card and "accuracy" in card
    assert list((out / "model").glob("*.safetensors")) and (out / "model" / "tokenizer.json").exists()
    assert not (out / "checkpoints").exists()  # checkpoints are removed once the final model is saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"train", "epoch"} and all("loss" in r for r in rows if r["kind"] == "train")
    assert list((out / "tensorboard").iterdir()) and (out / "predictions" / "epoch2.jsonl").exists()
    # every negative's source is on record per epoch
    pool2 = json.loads((out / "pools" / "epoch2.json").read_text())
    assert pool2["stats"] == res["per_epoch"][1]["pool"] and len(pool2["questions"]) == 8
    sources = {src for q in pool2["questions"] for _, src in q["negatives"]}
    assert sources <= {"initial", "epoch:1", "teacher"} and "teacher" in sources
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    # done: a second call returns the stored result without touching the store or the model
    assert _train(cfg, "orpo_mixed", task, qs, None, out=out) == res


def test_lora_merged_on_save_and_gold_rationale_fallback(tmp_path, tiny_llama_dir):
    task = ArithTask()
    qs = make_questions(6)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "run", **{"trainer.epochs": 1, "trainer.lora.enabled": True,
                                                          "trainer.lora.r": 4, "trainer.lr": 1e-2,
                                                          "policy.gold_rationale_fallback": True})
    store = make_store(cfg, qs, task, no_teacher_correct={"q0", "q1"})
    res = _train(cfg, "orpo_off", task, qs, store, eval_questions=None)
    assert res["questions_without_chosen"] == 0 and res["gold_rationale_questions"] == 2
    saved = tmp_path / "run" / "variants" / "orpo_off" / "seed0" / "model"
    from safetensors import safe_open

    names = [n for f in saved.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]
    assert names and not any("lora" in n for n in names)  # merged into the base weights
    cfg2 = tiny_config(tiny_llama_dir, tmp_path / "run2", **{"trainer.epochs": 1})
    store2 = make_store(cfg2, qs, task, no_teacher_correct={"q0", "q1"})
    res2 = _train(cfg2, "sft_diverse", task, qs, store2, eval_questions=None)
    assert res2["questions_without_chosen"] == 2 and res2["per_epoch"][0]["pairs"]["sft_only"] == 12
    store.close()
    store2.close()


def test_hardest_negatives_bf16_autocast_and_gradient_checkpointing(setup):
    cfg, task, qs, store = setup
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.epochs, cfg.trainer.precision, cfg.trainer.gradient_checkpointing = 1, "bf16", True
    cfg.pairs.strategy, cfg.pairs.max_pairs_per_question = "hardest", 2
    res = _train(cfg, "orpo_off", task, qs, store, eval_questions=None)
    pairs = res["per_epoch"][0]["pairs"]
    assert pairs["pairs"] == 16 and res["per_epoch"][0]["train_loss"] == res["per_epoch"][0]["train_loss"]  # finite
    cfg.trainer.precision = "fp32"  # the next accelerator in this process switches back
    _train(cfg, "sft_single", task, qs, store, eval_questions=None)


def test_lr_schedule():
    from orpo_distill.train import lr_factor

    assert [round(lr_factor(s, 10, 2, "linear"), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625,
                                                                           0.5, 0.375, 0.25, 0.125]
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_cli_train_names_the_missing_traces_command(tmp_path, tiny_llama_dir, capsys):
    from orpo_distill.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run: {{out_dir: {tmp_path / 'run'}}}\nstudent: {{model: {tiny_llama_dir}}}\n"
                        "teacher: {model: t}\ntask: {name: synthetic}\n")
    assert main(["train", str(cfg_path), "--variant", "orpo_mixed"]) != 0
    assert "orpo-distill traces teacher" in capsys.readouterr().err


def test_check_traces_names_what_is_missing(tmp_path, tiny_llama_dir):
    from orpo_distill.store import TraceStore
    from orpo_distill.train import MissingTraces, check_traces

    task, qs = ArithTask(), make_questions(4)
    ids = [q.id for q in qs]
    cfg = tiny_config(tiny_llama_dir, tmp_path / "a")
    with TraceStore(tmp_path / "a" / "traces.sqlite") as empty:
        with pytest.raises(MissingTraces, match="orpo-distill traces teacher"):
            check_traces(cfg, empty, ["sft_single"], ids)
        check_traces(cfg, empty, ["zero_shot"], ids)  # evaluation needs no traces
    store = make_store(cfg, qs, task, teacher_correct=0)
    with pytest.raises(MissingTraces, match="gold_rationale_fallback"):
        check_traces(cfg, store, ["sft_diverse"], ids)
    gold = cfg.model_copy(deep=True)
    gold.policy.gold_rationale_fallback = True
    check_traces(gold, store, ["sft_diverse"], ids)
    store.close()
    cfg_b = tiny_config(tiny_llama_dir, tmp_path / "b")
    store_b = make_store(cfg_b, qs, task)
    check_traces(cfg_b, store_b, ["orpo_teacher_neg", "sft_single"], ids)
    other = cfg_b.model_copy(deep=True)
    other.student.model = str(tmp_path / "another-student")  # the store holds another student's traces
    with pytest.raises(MissingTraces, match="orpo-distill traces student"):
        check_traces(other, store_b, ["orpo_mixed"], ids)
    store_b.close()


# ---------------------------------------------------------------- divergence

def _strict_rows(path):
    def no_constant(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("clip", [None, 1.0])
def test_huge_lr_stops_the_variant_before_any_non_finite_weight_is_written(setup, tmp_path, clip):
    import torch
    from safetensors.torch import load_file

    from orpo_distill.checkpoint import list_checkpoints
    from orpo_distill.errors import TrainingDiverged

    cfg, task, qs, store = setup
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.lr, cfg.trainer.max_grad_norm, cfg.trainer.save_every_steps = 1e30, clip, 1
    cfg.trainer.warmup_ratio = 0.0
    out = tmp_path / "v"
    with pytest.raises(TrainingDiverged) as err:
        _train(cfg, "orpo_mixed", task, qs, store, out=out, eval_questions=None)
    msg = str(err.value)
    assert "orpo_mixed seed 0" in msg and "trainer.lr" in msg and "max_grad_norm" in msg and "step" in msg
    assert err.value.exit_code == 4
    assert not (out / "result.json").exists() and not (out / "model").exists()
    for ck in list_checkpoints(out / "checkpoints"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ck / "trainable.safetensors")).values())
        json.loads((ck / "state.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    rows = _strict_rows(out / "metrics.jsonl")
    assert rows[-1]["kind"] == "diverged"


# ---------------------------------------------------------------- a finished variant folder and other settings

def test_finished_variant_is_reused_only_for_its_own_settings(setup, tmp_path):
    from orpo_distill.errors import UserError

    cfg, task, qs, store = setup
    cfg = cfg.model_copy(deep=True)
    cfg.trainer.epochs = 1
    out = tmp_path / "v"
    res = _train(cfg, "sft_single", task, qs, store, out=out)
    assert res["config_hash"] and res["eval_fingerprint"] and res["identity_hash"]

    def again(**changes):
        c = cfg.model_copy(deep=True)
        for key, value in changes.items():
            section, name = key.split(".")
            setattr(getattr(c, section), name, value)
        return _train(c, "sft_single", task, qs, None, out=out)

    assert again(**{"trainer.report_to": ["jsonl", "tensorboard"], "trainer.log_every_steps": 3,
                    "eval.batch_size": 2, "student.batch_size": 3}) == res  # cosmetic: reused
    with pytest.raises(UserError, match="trainer.lr") as err:
        again(**{"trainer.lr": 1e-4})
    assert str(out) in str(err.value) and "another run.out_dir" in str(err.value)
    with pytest.raises(UserError, match="eval.split") as err:
        again(**{"eval.split": "validation"})
    assert "evaluat" in str(err.value) and str(out) in str(err.value)
    # zero-shot: the untouched student; training settings do not matter, evaluation settings do
    zs = tmp_path / "zs"
    z = _train(cfg, "zero_shot", task, qs, store, out=zs)
    other = cfg.model_copy(deep=True)
    other.trainer.lr = 1e-4
    assert _train(other, "zero_shot", task, qs, None, out=zs) == z
    other.eval.max_new_tokens = 3
    with pytest.raises(UserError, match="eval.max_new_tokens"):
        _train(other, "zero_shot", task, qs, None, out=zs)


# ---------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("variant,reduction", [("sft_single", "sequence"), ("orpo_teacher_neg", "sequence"),
                                               ("orpo_teacher_neg", "token")])
def test_grad_accum_equals_one_batch_with_a_ragged_last_micro_batch(tmp_path, tiny_llama_dir, monkeypatch,
                                                                   variant, reduction):
    """7 examples in one optimiser step (trainer.batch_size is the step's global batch): micro-batches of 2, 2,
    2, 1 (grad_accum 4) must give the gradients and weights of one batch of 7 (grad_accum 1)."""
    import torch

    import orpo_distill.train as train

    grads: dict[str, list[torch.Tensor]] = {}
    after: dict[str, list[torch.Tensor]] = {}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            grads.setdefault(self.tag, [p.grad.detach().clone() for p in params])
            out = super().step(closure)
            after.setdefault(self.tag, [p.detach().clone() for p in params])
            return out

    task, qs = ArithTask(), make_questions(7)
    runs = {}
    for tag, batch, accum in (("one", 8, 1), ("accum", 8, 4)):
        cfg = tiny_config(tiny_llama_dir, tmp_path / tag, **{
            "trainer.epochs": 1, "trainer.batch_size": batch, "trainer.grad_accum": accum,
            "trainer.max_grad_norm": None, "pairs.max_pairs_per_question": 1, "objective.nll_reduction": reduction})
        store = make_store(cfg, qs, task)
        Recording.tag = tag
        monkeypatch.setattr(train.torch.optim, "AdamW", Recording)
        runs[tag] = _train(cfg, variant, task, qs, store, eval_questions=None)
        store.close()
        assert runs[tag]["costs"]["optimizer_steps"] == 1
    ga, gb = torch.cat([g.flatten() for g in grads["one"]]), torch.cat([g.flatten() for g in grads["accum"]])
    assert float((ga - gb).norm() / ga.norm()) < 1e-5
    assert runs["one"]["per_epoch"][0]["train_loss"] == pytest.approx(runs["accum"]["per_epoch"][0]["train_loss"],
                                                                      rel=1e-5)
    # the weights after the step: Adam's first update is about lr * sign(gradient), so an element whose gradient
    # is float noise (|g| ~ 1e-8) may go either way; every other element must match
    for g, wa, wb in zip(grads["one"], after["one"], after["accum"]):
        sure = g.abs() > 1e-4 * float(ga.abs().max())
        assert torch.allclose(wa[sure], wb[sure], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the schedule object

@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_object_gives_lr_factor_values_and_follows_a_reestimated_length(kind):
    """The LR schedule is a torch scheduler (an engine such as DeepSpeed can step it) with exactly
    peak x lr_factor(step) at every optimiser step, also after its length is re-estimated at an epoch start."""
    import torch

    from orpo_distill.recipe import DistillSchedule
    from orpo_distill.train import lr_factor

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = DistillSchedule(opt, kind)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    sched.set_length(10, 2, 0)
    got = []
    for step in range(10):
        if step == 5:
            sched.set_length(14, 2, 5)  # the next epoch has more pairs: a longer schedule
        got.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert got == [2e-3 * lr_factor(k, 10 if k < 5 else 14, 2, kind) for k in range(10)]
