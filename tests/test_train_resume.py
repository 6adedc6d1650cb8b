"""Exact resume after a real `kill -9`: the same command continues to the same weights as an uninterrupted run.

The student is a tiny GPT-2 (dropout on, so the RNG states must be restored too) trained with mixed-policy ORPO,
which samples the live student between epochs. Run A trains uninterrupted. Run B is killed with SIGKILL twice (the
trainer's test hook `ORPO_DISTILL_TEST_KILL_AT_STEP`): first after the first step of epoch 2 (its newest
checkpoint is the epoch-end one of epoch 1, so the resumed run rebuilds epoch 2's pool from the store), then in
the middle of epoch 2 (the newest checkpoint holds the pool, the batch plan and the position in it). Each child runs in its
own process with one thread. Every weight of B's final model must equal A's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def child(config_path: str, out_dir: str) -> None:
    """Entry point of the subprocess: train orpo_mixed from the prepared store."""
    import torch

    torch.set_num_threads(1)
    from test_train import ArithTask, make_questions

    from orpo_distill.config import load_config
    from orpo_distill.sampling.stage import store_path
    from orpo_distill.store import TraceStore
    from orpo_distill.train import train_variant

    cfg = load_config(config_path)
    qs = make_questions(8)
    with TraceStore(store_path(cfg)) as store:
        train_variant(cfg, "orpo_mixed", 0, out_dir, task=ArithTask(), train_questions=qs, eval_questions=qs[:2],
                      store=store, progress=False)


def _run(config_path: Path, out_dir: Path, kill_at: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ORPO_DISTILL_TEST_KILL_AT_STEP", None)
    if kill_at:
        env["ORPO_DISTILL_TEST_KILL_AT_STEP"] = str(kill_at)
    env["OMP_NUM_THREADS"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_train_resume as t; "
            f"t.child({str(config_path)!r}, {str(out_dir)!r})")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_kill_9_then_same_command_resumes_to_identical_weights(tmp_path, bpe_tokenizer):
    import torch
    import yaml
    from conftest import tiny_gpt2
    from test_train import ArithTask, make_questions, make_store, tiny_config

    from orpo_distill.checkpoint import list_checkpoints
    from orpo_distill.config import dump_config

    student = tmp_path / "student"
    m = tiny_gpt2(bpe_tokenizer)
    assert m.config.resid_pdrop > 0  # dropout draws from the RNG during training
    m.save_pretrained(student)
    bpe_tokenizer.save_pretrained(student)
    cfg = tiny_config(student, tmp_path / "run", **{"trainer.save_every_steps": 2, "trainer.epochs": 3,
                                                    "trainer.report_to": ["jsonl"]})
    store = make_store(cfg, make_questions(8), ArithTask(), student_all_right={"q7"})
    store.close()
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(cfg))
    assert yaml.safe_load(config_path.read_text())["trainer"]["save_every_steps"] == 2

    a = _run(config_path, tmp_path / "A", None)
    assert a.returncode == 0, a.stderr[-3000:]
    result_a = json.loads((tmp_path / "A" / "result.json").read_text())
    steps_per_epoch = result_a["per_epoch"][0]["steps"]
    assert steps_per_epoch >= 4

    b_dir = tmp_path / "B"
    # 1) killed after the first step of epoch 2: the newest checkpoint is the epoch-end one of epoch 1
    b1 = _run(config_path, b_dir, steps_per_epoch + 1)
    assert b1.returncode == -signal.SIGKILL, b1.stderr[-3000:]
    assert not (b_dir / "result.json").exists()
    assert list_checkpoints(b_dir / "checkpoints")[-1].name.endswith(f"{steps_per_epoch:09d}-1")
    # 2) resumed, then killed in the middle of epoch 2 (after sampling the student for its pool)
    kill2 = steps_per_epoch + 3
    b2 = _run(config_path, b_dir, kill2)
    assert b2.returncode == -signal.SIGKILL, b2.stderr[-3000:]
    last = list_checkpoints(b_dir / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 2 and 0 < state["step_in_epoch"] < steps_per_epoch and state["plan"]["pools"]
    # 3) the same command again finishes
    b3 = _run(config_path, b_dir, None)
    assert b3.returncode == 0, b3.stderr[-3000:]

    wa, wb = _weights(tmp_path / "A" / "model"), _weights(b_dir / "model")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    result_b = json.loads((b_dir / "result.json").read_text())
    assert [e["train_loss"] for e in result_b["per_epoch"]] == [e["train_loss"] for e in result_a["per_epoch"]]
    assert [e["pool"] for e in result_b["per_epoch"]] == [e["pool"] for e in result_a["per_epoch"]]
    # the metrics log has each step once, as in the uninterrupted run
    def rows(d):
        return [(r["global_step"], r.get("loss")) for r in map(json.loads, (d / "metrics.jsonl").open())
                if r["kind"] == "train"]
    assert rows(b_dir) == rows(tmp_path / "A")


@pytest.mark.slow
def test_kill_9_after_first_mid_epoch_checkpoint_with_capped_pairs(tmp_path, bpe_tokenizer):
    """pairs.max_pairs_per_question leaves negatives of the pool unpaired; the checkpoint's pool names them all,
    so the resume must find them all (it used to load only the paired ones and refuse to resume)."""
    import torch
    from conftest import tiny_gpt2
    from test_train import ArithTask, make_questions, make_store, tiny_config

    from orpo_distill.checkpoint import list_checkpoints
    from orpo_distill.config import dump_config

    student = tmp_path / "student"
    tiny_gpt2(bpe_tokenizer).save_pretrained(student)
    bpe_tokenizer.save_pretrained(student)
    cfg = tiny_config(student, tmp_path / "run", **{"trainer.save_every_steps": 2, "trainer.epochs": 2,
                                                    "trainer.batch_size": 2, "pairs.max_pairs_per_question": 1,
                                                    "trainer.report_to": ["jsonl"]})
    store = make_store(cfg, make_questions(8), ArithTask(), student_all_right={"q7"})
    store.close()
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(cfg))

    a = _run(config_path, tmp_path / "A", None)
    assert a.returncode == 0, a.stderr[-3000:]
    result_a = json.loads((tmp_path / "A" / "result.json").read_text())
    assert result_a["per_epoch"][0]["steps"] > 2
    b_dir = tmp_path / "B"
    b1 = _run(config_path, b_dir, 2)  # killed right after the first mid-epoch checkpoint (epoch 1, step 2)
    assert b1.returncode == -signal.SIGKILL, b1.stderr[-3000:]
    last = list_checkpoints(b_dir / "checkpoints")[-1]
    assert last.name.endswith("000000002-0")
    state = json.loads((last / "state.json").read_text())
    pool_keys = {k for d in state["plan"]["pools"].values() for k, _ in d["negatives"]}
    paired = {r[2] for r in state["plan"]["examples"] if r[2] is not None}
    assert paired < pool_keys  # the cap left negatives of the pool unpaired
    b2 = _run(config_path, b_dir, None)
    assert b2.returncode == 0, b2.stderr[-3000:]
    wa, wb = _weights(tmp_path / "A" / "model"), _weights(b_dir / "model")
    assert wa.keys() == wb.keys() and wa and all(torch.equal(wa[k], wb[k]) for k in wa)
    result_b = json.loads((b_dir / "result.json").read_text())
    assert [e["train_loss"] for e in result_b["per_epoch"]] == [e["train_loss"] for e in result_a["per_epoch"]]
    assert [e["pool"] for e in result_b["per_epoch"]] == [e["pool"] for e in result_a["per_epoch"]]


class _Killed(BaseException):
    pass


def test_interrupted_in_process_resumes_to_identical_weights(tmp_path, bpe_tokenizer, monkeypatch):
    """The fast, in-process twin of the test above (the kill hook raises instead of SIGKILL)."""
    import torch
    from conftest import tiny_gpt2
    from test_train import ArithTask, make_questions, make_store, tiny_config

    import orpo_distill.train as train

    student = tmp_path / "student"
    tiny_gpt2(bpe_tokenizer).save_pretrained(student)
    bpe_tokenizer.save_pretrained(student)
    cfg = tiny_config(student, tmp_path / "run", **{"trainer.save_every_steps": 2, "trainer.epochs": 2})
    qs, task = make_questions(8), ArithTask()
    store = make_store(cfg, qs, task, student_all_right={"q7"})

    def go(out):
        return train.train_variant(cfg, "orpo_mixed", 0, out, task=task, train_questions=qs, eval_questions=None,
                                   store=store, progress=False)

    res_a = go(tmp_path / "A")
    spe = res_a["per_epoch"][0]["steps"]

    def fake_kill(pid, sig):
        raise _Killed()

    monkeypatch.setattr(train.os, "kill", fake_kill)
    monkeypatch.setenv(train.KILL_ENV, str(spe + 3))
    with pytest.raises(_Killed):
        go(tmp_path / "B")
    monkeypatch.delenv(train.KILL_ENV)
    other = cfg.model_copy(deep=True)
    other.trainer.lr = 1e-4
    with pytest.raises(ValueError, match="another config"):  # a checkpoint is never resumed under another config
        train.train_variant(other, "orpo_mixed", 0, tmp_path / "B", task=task, train_questions=qs,
                            eval_questions=None, store=store, progress=False)
    res_b = go(tmp_path / "B")
    wa, wb = _weights(tmp_path / "A" / "model"), _weights(tmp_path / "B" / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [e["train_loss"] for e in res_b["per_epoch"]] == [e["train_loss"] for e in res_a["per_epoch"]]
    store.close()


def test_checkpoints_are_atomic_and_ordered(tmp_path):
    import torch

    from orpo_distill.checkpoint import (
        checkpoint_name,
        latest_checkpoint,
        load_checkpoint,
        rng_fork,
        save_checkpoint,
    )

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    root = tmp_path / "ck"
    save_checkpoint(root, checkpoint_name(6, True), model=model, optimizer=opt, state={"epoch": 2})
    save_checkpoint(root, checkpoint_name(6, False), model=model, optimizer=opt, state={"epoch": 1}, keep=2)
    assert latest_checkpoint(root).name == checkpoint_name(6, True)  # epoch end sorts after a step save
    (root / ".tmp-ckpt-000000099-0-123").mkdir()  # a save killed half-way is never picked
    (root / checkpoint_name(50, False)).mkdir()  # nor a folder without state.json
    assert latest_checkpoint(root).name == checkpoint_name(6, True)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    save_checkpoint(root, checkpoint_name(7, False), model=model, optimizer=opt, state={"epoch": 2})
    with rng_fork():
        torch.rand(100)  # sampling/eval inside a fork do not move the training stream
    torch.rand(5)
    w = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    state = load_checkpoint(latest_checkpoint(root), model=model, optimizer=opt)
    assert state["epoch"] == 2 and torch.equal(model.weight, w)
    assert torch.equal(torch.rand(3), expected)
    assert [p.name for p in root.iterdir() if p.name.startswith("ckpt-")].count(checkpoint_name(6, True)) == 0
