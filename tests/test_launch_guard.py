"""The one launcher the trainer cannot drive (FSDP version 1) is refused with a message naming the config key and
the engines to use instead, before anything is sampled or trained; DDP, FSDP2 and DeepSpeed ZeRO launches are
recognised and not refused."""

from __future__ import annotations

import pytest

from orpo_distill.config import config_from_dict
from orpo_distill.errors import UserError

ENGINE_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP", "FSDP_VERSION")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENGINE_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_fsdp_version_1_is_refused_before_training(clean_env, tmp_path):
    from orpo_distill.pipeline import preflight
    from orpo_distill.recipe import make_accelerator, unsupported_engine

    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "1")
    msg = unsupported_engine() or ""
    assert "FSDP version 1" in msg and "fsdp_version" in msg and "examples/accelerate/fsdp2.yaml" in msg
    cfg = config_from_dict({"teacher": {"model": "t", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                            "student": {"model": "s"}, "run": {"out_dir": str(tmp_path / "run")}})
    with pytest.raises(UserError, match="FSDP version 1"):
        make_accelerator(cfg)
    with pytest.raises(UserError, match="examples/accelerate/fsdp2.yaml"):
        preflight(cfg, stages=("train",), variants=["zero_shot"])


@pytest.mark.parametrize("env, fsdp2, stage", [
    ({}, False, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True, None),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False, 2),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, False, 3),
])
def test_ddp_fsdp2_and_deepspeed_launches_are_recognised_not_refused(clean_env, env, fsdp2, stage):
    from orpo_distill.recipe import deepspeed_stage, fsdp2_requested, unsupported_engine

    for k, v in env.items():
        clean_env.setenv(k, v)
    assert unsupported_engine() is None
    assert fsdp2_requested() is fsdp2
    assert deepspeed_stage() == stage


def test_divergence_message_says_whether_deepspeed_already_took_the_step(tmp_path):
    """ZeRO-3 in fp32 applies a non-finite gradient (its norm is known only after the engine's step): the error
    must not claim the step was skipped; everywhere else it was."""
    from orpo_distill.recipe import _diverged

    cfg = config_from_dict({"teacher": {"model": "t", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                            "student": {"model": "s"}, "run": {"out_dir": str(tmp_path / "run")}})
    skipped = str(_diverged(cfg, "orpo_mixed", 0, 3, 1, ("the gradient norm", float("nan")), tmp_path))
    taken = str(_diverged(cfg, "orpo_mixed", 0, 3, 1, ("the gradient norm", float("nan")), tmp_path, applied=True))
    assert "The step was not applied" in skipped and "already applied" not in skipped
    assert "DeepSpeed had already applied the step" in taken and "not applied" not in taken
    assert "no non-finite weights, checkpoint" in taken
