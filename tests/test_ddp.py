"""Data-parallel training under the standard launcher: `torchrun --nproc_per_node 2 -m orpo_distill run CONFIG`
on the CPU (gloo) equals one process with the same global batch, writes every output once, and resumes after a
`kill -9` of the whole job to the uninterrupted run's weights.

The run is the whole pipeline on the shipped demo models (synthetic task, teacher and initial-student sampling by
rank 0), two trained variants (sft_single and orpo_mixed) for two epochs, so the live student is refreshed
(sampled by both ranks, written by rank 0) and evaluated after each epoch. The global batch (5) leaves ragged
steps, one of a single example, which gives rank 1 nothing (its stand-in micro-batch has weight 0). One process
with grad_accum 2 and two processes with grad_accum 1 cut every step into the same micro-batches, and with two
ranks every share is exactly twice the one-process part (a power of two), so the averaged gradients, the
weights, the refreshed student's samples, the losses and the accuracies are bit-identical, not only close.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each launch of the pipeline takes 25-40 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The global batch: orpo_mixed's first epoch has 16 pairs (the shipped demo student's own negatives), so its last
# pair step holds a single example. Rebuilt demo assets change these counts: the assert below then says so.
BATCH = 5


def _config(path: Path) -> Path:
    import yaml

    from orpo_distill.demo import assets_dir

    a = assets_dir()
    cfg = {
        "run": {"seed": 0, "seeds": 1, "variants": ["sft_single", "orpo_mixed"]},
        "task": {"name": "synthetic", "synthetic": {"n_train": 12, "n_validation": 4, "n_test": 7, "min_steps": 2,
                                                    "max_steps": 3, "max_number": 20, "seed": 0}},
        "teacher": {"model": str(a / "teacher"), "template": "plain", "device": "cpu", "dtype": "float32",
                    "batch_size": 16},
        "student": {"model": str(a / "student"), "template": "plain", "device": "cpu", "dtype": "float32",
                    "batch_size": 16},
        "sampling": {"k": 4, "student_k": 2, "temperature": 0.8, "max_new_tokens": 40, "seed": 0},
        "pairs": {"strategy": "cycle", "max_pairs_per_question": 2, "max_length": 160, "max_prompt_length": 96},
        "policy": {"phi": 0.5},
        "trainer": {"epochs": 2, "lr": 3e-3, "batch_size": BATCH, "warmup_ratio": 0.1, "precision": "fp32",
                    "report_to": ["jsonl"], "save_every_steps": 2},
        "eval": {"split": "test", "max_new_tokens": 40, "batch_size": 3, "every_epoch": True},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, out: Path, procs: int, grad_accum: int, kill_at: int | None = None,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("ORPO_DISTILL_TEST_KILL_AT_STEP", None)
    if kill_at:
        env["ORPO_DISTILL_TEST_KILL_AT_STEP"] = str(kill_at)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = [sys.executable, "-m", "orpo_distill"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
        str(_free_port()), "-m", "orpo_distill"]
    cmd = [*launcher, "run", str(config), "--no-progress", f"run.out_dir={out}", f"trainer.grad_accum={grad_accum}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _rows(out: Path, variant: str) -> list[dict]:
    return [json.loads(line) for line in (out / "variants" / variant / "seed0" / "metrics.jsonl").open()]


def _weights(out: Path, variant: str) -> dict:
    from safetensors.torch import load_file

    w = {}
    for f in sorted((out / "variants" / variant / "seed0" / "model").glob("*.safetensors")):
        w.update(load_file(str(f)))
    return w


def _result(out: Path, variant: str) -> dict:
    return json.loads((out / "variants" / variant / "seed0" / "result.json").read_text())


VARIANTS = ("sft_single", "orpo_mixed")


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """The uninterrupted 2-process run (shared by both tests)."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = _config(tmp / "config.yaml")
    out = tmp / "two"
    r = _launch(config, out, 2, 1)
    assert r.returncode == 0, r.stderr[-4000:]
    return config, out, r


def test_torchrun_two_processes_equal_one_process_and_write_once(two_procs, tmp_path):
    import torch

    config, two, r2 = two_procs
    one = tmp_path / "one"
    r1 = _launch(config, one, 1, 2)
    assert r1.returncode == 0, r1.stderr[-4000:]
    for v in VARIANTS:
        res1, res2 = _result(one, v), _result(two, v)
        assert res1["processes"] == 1 and res2["processes"] == 2  # really two ranks
        # the same per-step training losses (bit-identical here; the issue asks rel 1e-3) and accuracies
        rows1, rows2 = _rows(one, v), _rows(two, v)
        steps1 = [(x["global_step"], x["loss"]) for x in rows1 if x["kind"] == "train"]
        steps2 = [(x["global_step"], x["loss"]) for x in rows2 if x["kind"] == "train"]
        assert len(steps1) == res1["costs"]["optimizer_steps"] >= 4
        assert [s for s, _ in steps1] == [s for s, _ in steps2]
        for (_, a), (_, b) in zip(steps1, steps2):
            assert b == pytest.approx(a, rel=1e-6)
        assert [e["eval"]["accuracy"] for e in res1["per_epoch"]] == [e["eval"]["accuracy"] for e in res2["per_epoch"]]
        assert [e["pool"] for e in res1["per_epoch"]] == [e["pool"] for e in res2["per_epoch"]]
        for e in (1, 2):
            p = Path("variants") / v / "seed0" / "predictions" / f"epoch{e}.jsonl"
            assert (one / p).read_text() == (two / p).read_text()
        w1, w2 = _weights(one, v), _weights(two, v)
        assert w1.keys() == w2.keys() and w1
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
        # every output once: one metrics row per step and epoch, nothing written twice
        keys = [(x["kind"], x["global_step"]) for x in rows2]
        assert len(keys) == len(set(keys)) == len(rows1)
    # a step of one example (pairs and SFT-only examples are cut into steps apart): rank 1 ran a stand-in
    counts = [(e["pairs"]["pairs"], e["pairs"]["sft_only"]) for e in _result(two, "orpo_mixed")["per_epoch"]]
    assert any(n % BATCH == 1 for c in counts for n in c), \
        f"no one-example step any more (pairs, sft_only per epoch: {counts}): choose a BATCH that leaves one"

    # the live student was refreshed (two epochs of orpo_mixed) and sampled once into the store
    assert _result(two, "orpo_mixed")["sampling"] and _result(two, "orpo_mixed")["per_epoch"][1]["pool"]["share_current"] > 0
    res_all1 = json.loads((one / "results.json").read_text())
    res_all2 = json.loads((two / "results.json").read_text())
    assert {v: e["accuracy"] for v, e in res_all1["variants"].items()} == \
           {v: e["accuracy"] for v, e in res_all2["variants"].items()}
    assert r2.stdout.count("wrote ") == 1 and r2.stdout.count("| variant") == r1.stdout.count("| variant")


def test_kill_9_of_the_two_process_job_resumes_to_the_uninterrupted_run(two_procs, tmp_path):
    import torch

    from orpo_distill.checkpoint import list_checkpoints

    config, two, _ = two_procs
    out = tmp_path / "killed"
    spe = {v: _result(two, v)["per_epoch"][0]["steps"] for v in VARIANTS}
    # 1) killed in epoch 2 of sft_single (after its mid-epoch checkpoint): every rank dies with SIGKILL
    kill1 = spe["sft_single"] + 1
    k1 = _launch(config, out, 2, 1, kill_at=kill1)
    assert k1.returncode != 0 and not (out / "results.json").exists(), k1.stderr[-3000:]
    assert "Signals.SIGKILL" in k1.stderr or f"exitcode  : -{int(signal.SIGKILL)}" in k1.stderr, k1.stderr[-3000:]
    assert list_checkpoints(out / "variants" / "sft_single" / "seed0" / "checkpoints")
    # 2) resumed; sft_single finishes, orpo_mixed is killed in epoch 2 (after the student refresh)
    kill2 = spe["orpo_mixed"] + 2
    assert kill2 > 2 * spe["sft_single"]  # sft_single never reaches it
    k2 = _launch(config, out, 2, 1, kill_at=kill2)
    assert k2.returncode != 0, k2.stderr[-3000:]
    assert (out / "variants" / "sft_single" / "seed0" / "result.json").exists()
    last = list_checkpoints(out / "variants" / "orpo_mixed" / "seed0" / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 2 and state["plan"]["pools"] and len(state["rng_by_rank"]) == 2
    # 3) the same command finishes, with the uninterrupted run's weights, losses and accuracies
    k3 = _launch(config, out, 2, 1)
    assert k3.returncode == 0, k3.stderr[-3000:]
    for v in VARIANTS:
        wa, wb = _weights(two, v), _weights(out, v)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), v
        ra, rb = _rows(two, v), _rows(out, v)
        assert [(x["kind"], x["global_step"], x.get("loss")) for x in ra] == \
               [(x["kind"], x["global_step"], x.get("loss")) for x in rb]
        assert [e["eval"] for e in _result(two, v)["per_epoch"]] != [] and \
            [e["eval"]["accuracy"] for e in _result(two, v)["per_epoch"]] == \
            [e["eval"]["accuracy"] for e in _result(out, v)["per_epoch"]]


def test_accelerate_launch_multi_gpu_on_cpu_equals_torchrun(two_procs, tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` starts two gloo ranks (without
    ACCELERATE_USE_CPU, --multi_gpu on a CPU machine starts two unrelated processes) and trains as torchrun does."""
    import shutil

    config, two, _ = two_procs
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed next to this python")
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("ORPO_DISTILL_TEST_KILL_AT_STEP", None)
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                        str(_free_port()), "-m", "orpo_distill", "run", str(config), "--no-progress",
                        f"run.out_dir={out}", "trainer.grad_accum=1"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for v in VARIANTS:
        assert _result(out, v)["processes"] == 2
        assert [(x["kind"], x["global_step"], x.get("loss"), x.get("eval_accuracy")) for x in _rows(out, v)] == \
               [(x["kind"], x["global_step"], x.get("loss"), x.get("eval_accuracy")) for x in _rows(two, v)]
    assert r.stdout.count("wrote ") == 1


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what an accelerate FSDP2 config sets


def test_fsdp2_two_processes_match_ddp_and_resume_after_kill_9(two_procs, tmp_path):
    """FSDP2 (`fully_shard` over the decoder layers and the ORPOStudent root, gloo): the same losses and
    accuracies as DDP within float tolerance; checkpoints are sharded (a file per rank), and a kill -9 of the job
    resumes to the uninterrupted FSDP2 run (bit-identical weights here)."""
    import torch

    config, two, _ = two_procs
    full, killed = tmp_path / "fsdp", tmp_path / "fsdp_killed"
    r = _launch(config, full, 2, 1, extra_env=FSDP2)
    assert r.returncode == 0, r.stderr[-4000:]
    spe = {v: _result(full, v)["per_epoch"][0]["steps"] for v in VARIANTS}
    for v in VARIANTS:
        res = _result(full, v)
        assert res["processes"] == 2 and res["engine"] == "fsdp2"
        assert _result(two, v)["engine"] == "ddp"
        ddp = [x for x in _rows(two, v) if x["kind"] == "train"]
        fsdp = [x for x in _rows(full, v) if x["kind"] == "train"]
        # the whole of sft_single; orpo_mixed's first epoch (the refreshed student's samples after it may differ
        # where float noise moves a sampled token)
        upto = len(ddp) if v == "sft_single" else spe[v]
        for a, b in list(zip(ddp, fsdp))[:upto]:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
                a["grad_norm"], rel=1e-4)
    assert [e["eval"]["accuracy"] for e in _result(full, "sft_single")["per_epoch"]] == \
           [e["eval"]["accuracy"] for e in _result(two, "sft_single")["per_epoch"]]
    # kill -9 of the FSDP2 job in epoch 2 of sft_single, then of orpo_mixed; the same command finishes
    k1 = _launch(config, killed, 2, 1, kill_at=spe["sft_single"] + 1, extra_env=FSDP2)
    assert k1.returncode != 0 and not (killed / "results.json").exists(), k1.stderr[-3000:]
    # the checkpoint is sharded: each rank wrote its own shards (torch.distributed.checkpoint), no full copy
    from orpo_distill.checkpoint import list_checkpoints

    ckpt = list_checkpoints(killed / "variants" / "sft_single" / "seed0" / "checkpoints")[-1]
    assert json.loads((ckpt / "state.json").read_text())["checkpoint_format"] == "dcp"
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2 and not (ckpt / "trainable.safetensors").exists()
    k2 = _launch(config, killed, 2, 1, kill_at=spe["orpo_mixed"] + 2, extra_env=FSDP2)
    assert k2.returncode != 0 and not (killed / "results.json").exists(), k2.stderr[-3000:]
    k3 = _launch(config, killed, 2, 1, extra_env=FSDP2)
    assert k3.returncode == 0, k3.stderr[-3000:]
    for v in VARIANTS:
        assert [(x["kind"], x["global_step"], x.get("loss")) for x in _rows(full, v)] == \
               [(x["kind"], x["global_step"], x.get("loss")) for x in _rows(killed, v)]
        wa, wb = _weights(full, v), _weights(killed, v)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), v


def test_accelerate_launch_with_the_fsdp2_config_shards_on_cpu(two_procs, tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp2.yaml` on a CPU machine: accelerate itself would
    run the ranks as plain MULTI_CPU (its FSDP plugin is GPU-only), but the launch sets FSDP_VERSION=2 and the
    trainer shards with `fully_shard` itself: two ranks, engine fsdp2, DDP's losses within float tolerance."""
    import shutil

    config, two, _ = two_procs
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed next to this python")
    out = tmp_path / "fsdp2_yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update({"OMP_NUM_THREADS": "1"})
    env.pop("ORPO_DISTILL_TEST_KILL_AT_STEP", None)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([accelerate, "launch", "--config_file", str(repo / "examples" / "accelerate" / "fsdp2.yaml"),
                        "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "orpo_distill", "run",
                        str(config), "--no-progress", f"run.out_dir={out}", "trainer.grad_accum=1"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=repo)
    assert r.returncode == 0, r.stderr[-4000:]
    for v in VARIANTS:
        res = _result(out, v)
        assert res["processes"] == 2 and res["engine"] == "fsdp2"
        ddp = [x for x in _rows(two, v) if x["kind"] == "train"]
        fsdp = [x for x in _rows(out, v) if x["kind"] == "train"]
        upto = len(ddp) if v == "sft_single" else res["per_epoch"][0]["steps"]
        assert len(fsdp) == len(ddp)
        for a, b in list(zip(ddp, fsdp))[:upto]:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert r.stdout.count("wrote ") == 1
