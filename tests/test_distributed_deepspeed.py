"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (DS_ACCELERATOR=cpu, gloo) around `loss.ORPOStudent`.

Raw engines (torch AdamW, no compiled op): the first step's full gradient equals the one-process gradient of the
global batch (so the world-size factor and `engine.backward(loss, scale_wrt_gas=False)` are right) and 4 steps'
losses match DDP's. ZeRO-3 through accelerate's own loop (the launch config's plugin completed
by `distributed.apply_trainer_settings`, `accumulate`, `backward(loss, scale_wrt_gas=False)`) with SGD, whose
update is proportional to the gradient, matches DDP with SGD. ZeRO-3 runs with `uniform_chunks=True`: it gathers
the head's weight on every chunk call, and ranks with different numbers of chunks otherwise abort in a mismatched
all-gather (seen here). Skipped without deepspeed (`pip install -e .[deepspeed]`, see pyproject.toml)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed_workers import launch  # noqa: E402


@pytest.mark.slow  # ~15-40 s, plus ~45 s the first time DeepSpeed JIT-builds its CPU communication op
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="DeepSpeed's CPU accelerator JIT-builds a small communication op (needs a C++ compiler)")
def test_zero2_zero3_match_ddp(tmp_path):
    # the op lands in torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): built once
    for res in launch("deepspeed", tmp_path, {"DS_ACCELERATOR": "cpu"}):
        want = torch.tensor(res["want_grad"])
        for stage in (2, 3):
            torch.testing.assert_close(torch.tensor(res[f"zero{stage}_grad"]), want, rtol=1e-5, atol=1e-7)
            assert res[f"zero{stage}"] == pytest.approx(res["ddp"], rel=1e-5)
        assert res["accelerate_zero3"] == pytest.approx(res["ddp_sgd"], rel=1e-5)
        assert res["ddp_sgd"][1:] != pytest.approx(res["ddp"][1:], rel=1e-3)  # the two optimisers do differ
