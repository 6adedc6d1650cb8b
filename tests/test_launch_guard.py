"""Launchers the trainer cannot drive correctly yet (DeepSpeed, FSDP version 1) are refused with a message naming
the supported ones, before anything is sampled or trained, instead of training with another loss scale or
gradient clipping than the config says."""

from __future__ import annotations

import pytest

from orpo_distill.config import config_from_dict
from orpo_distill.errors import UserError


@pytest.mark.parametrize("env, named", [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
                                        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1")])
def test_unsupported_engines_are_refused_before_training(monkeypatch, tmp_path, env, named):
    from orpo_distill.pipeline import preflight
    from orpo_distill.recipe import make_accelerator, unsupported_engine

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert named in (unsupported_engine() or "")
    cfg = config_from_dict({"teacher": {"model": "t", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                            "student": {"model": "s"}, "run": {"out_dir": str(tmp_path / "run")}})
    with pytest.raises(UserError, match=named):
        make_accelerator(cfg)
    with pytest.raises(UserError, match="examples/accelerate/ddp.yaml"):
        preflight(cfg, stages=("train",), variants=["zero_shot"])


def test_ddp_and_fsdp2_launches_are_not_refused(monkeypatch):
    from orpo_distill.recipe import unsupported_engine

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert unsupported_engine() is None
