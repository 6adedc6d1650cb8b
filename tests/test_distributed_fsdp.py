"""FSDP2 (`torch.distributed.fsdp.fully_shard` on the decoder layers and the `ORPOStudent` root) on 2 CPU
processes: 4 AdamW steps give DDP's losses within float tolerance; the trained student used outside the root's
forward (`distributed.unsharded`, as generation does) gives DDP's logits; a full-state checkpoint written by rank 0
after step 2 (gathered on rank 0 only), or a sharded one (torch.distributed.checkpoint, one file per rank), loaded
into a student with other initial weights resumes exactly like continuing."""

from __future__ import annotations

import pytest
from distributed_workers import launch


def test_fsdp2_trains_like_ddp_and_resumes(tmp_path):
    for res in launch("fsdp", tmp_path):
        assert res["sharded"] > 0  # the parameters really are split over the ranks
        assert res["fsdp"] == pytest.approx(res["ddp"], rel=1e-5)
        assert res["resumed"] == res["fsdp"][2:]  # resume == continue, bit for bit on CPU
        assert res["resumed_sharded"] == res["fsdp"][2:]  # from the one-shard-per-rank checkpoint
        assert sum(f.endswith(".distcp") for f in res["dcp_files"]) == 2
        assert (res["full_state_keys"] > 0) == (res["rank"] == 0)  # gathered on rank 0 only
        assert res["logits_diff"] < 1e-4
        assert res["ckpt_keys_hf"][0].startswith("model.")  # full (unsharded) keys of the ORPOStudent
