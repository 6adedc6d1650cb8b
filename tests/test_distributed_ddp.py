"""DDP on 2 CPU processes (gloo, torchrun) around `loss.ORPOStudent`: one optimiser step with a ragged split over
the ranks (7 items over 2 ranks x grad_accum 2; 3 items, where one rank's second micro-batch is an empty stand-in
with weight 0) and `no_sync` on all but the last micro-batch gives the one-process gradient of the global batch
(ORPO and SFT, per-sequence and token-pooled NLL), also through `accelerate`'s prepare/no_sync/backward. Calling the loss around DDP's forward (today's functional path
on the bare model) does not: DDP never averages those gradients."""

from __future__ import annotations

import torch
from distributed_workers import launch


def test_ddp_step_equals_one_process_gradient(tmp_path):
    results = launch("ddp", tmp_path)
    for res in results:
        for name, case in res.items():
            if not isinstance(case, dict) or name == "bypass":
                continue
            want, got = torch.tensor(case["want"]), torch.tensor(case["got"])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
            assert abs(case["got_loss"] - case["want_loss"]) <= 1e-5 * abs(case["want_loss"])
            assert case["totals"][2] == 2
        assert res["accelerate"]["engine"] == "MULTI_CPU:DistributedDataParallel:2"
        assert res["orpo-3-empty-microbatch"]["micro"] == ([2, 2] if res["rank"] == 0 else [2, 0])
        want, got = torch.tensor(res["bypass"]["want"]), torch.tensor(res["bypass"]["got"])
        assert not torch.allclose(got, want, rtol=1e-3)  # around the wrapper: rank-local gradients only
    # after the step the ranks hold the same (averaged) gradient
    assert results[0]["orpo-7-seq"]["got"] == results[1]["orpo-7-seq"]["got"]
