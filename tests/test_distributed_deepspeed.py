"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (DS_ACCELERATOR=cpu, gloo, torch AdamW) around
`loss.ORPOStudent`: the first step's full gradient equals the one-process gradient of the global batch (so the
world-size factor and `engine.backward(loss, scale_wrt_gas=False)` are right), and 4 steps' losses match DDP's.
ZeRO-3 runs with `uniform_chunks=True`: it gathers the head's weight on every chunk call, and ranks with different
numbers of chunks otherwise hang or abort in a mismatched all-gather. Skipped without deepspeed (`.[deepspeed]`)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed_workers import launch  # noqa: E402


@pytest.mark.slow  # ~15 s, plus ~45 s the first time DeepSpeed JIT-builds its CPU communication op
@pytest.mark.skipif(shutil.which("ninja") is None and shutil.which("gcc") is None,
                    reason="DeepSpeed's CPU accelerator JIT-builds a small communication op (needs a C++ compiler)")
def test_zero2_zero3_match_ddp(tmp_path_factory, tmp_path):
    ext = tmp_path_factory.getbasetemp() / "torch_extensions"  # the op built once per session
    for res in launch("deepspeed", tmp_path, {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}):
        want = torch.tensor(res["want_grad"])
        for stage in (2, 3):
            torch.testing.assert_close(torch.tensor(res[f"zero{stage}_grad"]), want, rtol=1e-5, atol=1e-7)
            assert res[f"zero{stage}"] == pytest.approx(res["ddp"], rel=1e-4)
