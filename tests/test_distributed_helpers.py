"""One-process tests of the distributed building blocks: `loss.ORPOStudent` gives the functional losses' values,
the world-size factor of `StepTotals` makes the rank-averaged gradient the one-process gradient (ranks simulated
in one process), `split_step` shards a step, `deepspeed_config` writes what accelerate would otherwise default,
a checkpoint the ranks write together appears with one rename."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_llama
from distributed_workers import items  # noqa: E402

from orpo_distill.distributed import decoder_layers, deepspeed_config, dist_info, hf_state_dict, split_step
from orpo_distill.loss import (
    ORPOLoss,
    ORPOStudent,
    SFTLoss,
    StepTotals,
    chunked_head_ok,
    scored_positions,
    sequence_logps,
    step_totals,
)
from orpo_distill.pairs import collate


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.fixture()
def model(unigram_tokenizer):
    return tiny_llama(unigram_tokenizer, hidden=16, layers=1, vocab_size=97)


def test_student_module_equals_functional_losses(model):
    orpo = ORPOLoss(lam=0.7, nll_scope="all", nll_reduction="token", chunk_size=5)
    sft = SFTLoss(nll_scope="all", nll_reduction="token", chunk_size=5)
    student = ORPOStudent(model, orpo, sft)
    pair_batch, sft_batch = collate(items(5), 0), collate(items(4, pairs=False), 0)
    for b, fn in [(pair_batch, orpo), (sft_batch, sft)]:
        totals = step_totals([b], "all")
        want, wm = fn(model, b, totals)
        got, gm = student(b, totals)
        assert got.item() == want.item()  # bit-identical: the same code path
        assert {k: float(v) for k, v in gm.items()} == {k: float(v) for k, v in wm.items()}
        kw, _ = student(**b, totals=totals)  # keyword form, as `module(**batch)` calls it
        assert kw.item() == want.item()
    assert chunked_head_ok(model) is True  # checked once, inside the forward, on fixed ids
    zero, _ = student(pair_batch, weight=0.0)
    assert zero.item() == 0.0


def test_extra_empty_chunks_change_nothing(model):
    b = collate(items(3), 0)
    n = scored_positions(b["attention_mask"], b["completion_mask"], ("completion",))
    assert n == int(b["completion_mask"][:, 1:].sum())
    plain = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], chunk_size=4)
    padded = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], chunk_size=4,
                            min_chunks=-(-n // 4) + 3)
    assert torch.equal(plain["completion"].sum, padded["completion"].sum)
    padded["completion"].sum.sum().backward()  # the zero-row chunks are in the graph and backpropagate


@pytest.mark.parametrize("world", [2, 3])
def test_world_scaled_shares_average_to_the_one_process_gradient(model, world):
    """What DDP/FSDP/ZeRO do (average the ranks' gradients) applied by hand to `world` simulated ranks, each with
    its ragged shard of 7 pairs in 2 micro-batches, totals summed over ranks with `world` set."""
    xs = items(7, seed=3)
    loss = ORPOLoss(lam=0.7, chunk_size=5)
    model.zero_grad()
    loss(model, collate(xs, 0))[0].backward()
    want = _grads(model).clone()
    shards = [[[xs[i] for i in mb] for mb in split_step(range(7), world, r, 2) if mb] for r in range(world)]
    local = [step_totals([collate(mb, 0) for mb in s], "completion") for s in shards]
    totals = StepTotals(sum(t.items for t in local), sum(t.tokens for t in local), world)
    avg = torch.zeros_like(want)
    for s in shards:
        model.zero_grad()
        for mb in s:
            loss(model, collate(mb, 0), totals)[0].backward()
        avg += _grads(model) / world
    torch.testing.assert_close(avg, want, rtol=1e-5, atol=1e-7)
    # without the factor the average is 1/world of the gradient: the test can fail
    assert not torch.allclose(avg / world, want, rtol=1e-3)


def test_split_step_covers_the_step_once_in_order():
    for n, world, ga in [(7, 2, 2), (3, 2, 2), (1, 4, 3), (16, 4, 2)]:
        parts = [split_step(range(n), world, r, ga) for r in range(world)]
        assert all(len(p) == ga for p in parts)  # the same number of micro-batches on every rank
        assert [i for p in parts for mb in p for i in mb] == list(range(n))
        sizes = [sum(len(mb) for mb in p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert split_step(range(7), 2, 1, 2) == [[4, 5], [6]]
    with pytest.raises(ValueError):
        split_step(range(3), 2, 2, 1)


def test_deepspeed_config_and_layers(model):
    cfg = deepspeed_config(3, micro_batch=2, grad_accum=4, lr=1e-5, max_grad_norm=None, world=8)
    assert cfg["gradient_clipping"] == 0.0  # explicit: accelerate's DeepSpeed default would clip at 1.0
    assert cfg["train_batch_size"] == 64
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert deepspeed_config(2, micro_batch=1, grad_accum=1, lr=1.0, max_grad_norm=0.5)["gradient_clipping"] == 0.5
    with pytest.raises(ValueError):
        deepspeed_config(1, micro_batch=1, grad_accum=1, lr=1.0)
    assert [type(m).__name__ for m in decoder_layers(ORPOStudent(model))] == ["LlamaDecoderLayer"]
    assert list(hf_state_dict({"model.a": 1, "orpo.x": 2})) == ["a"]
    assert dist_info().world >= 1



@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_accelerate_configs_launch_as_documented(name, monkeypatch):
    """Each shipped accelerate config parses as `accelerate launch --config_file F -m orpo_distill run CONFIG`
    would, selects its engine, and (DeepSpeed) becomes a plugin config that `apply_trainer_settings` completes with
    our clipping instead of accelerate's 1.0."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from orpo_distill.distributed import apply_trainer_settings

    path = REPO / "examples" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "-m",
                                               "orpo_distill", "run", "config.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and args.module
    if name.startswith("zero"):
        assert args.use_deepspeed and cfg.deepspeed_config["zero_stage"] == int(name[-1])
        args.deepspeed_fields_from_accelerate_config = list(cfg.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        for k, v in env.items():
            if k.startswith("ACCELERATE_"):
                monkeypatch.setenv(k, v)
        ds = DeepSpeedPlugin().deepspeed_config
        assert ds["zero_optimization"]["stage"] == int(name[-1])
        assert ds["gradient_clipping"] == "auto"  # the trap: accelerate would fill 1.0
        apply_trainer_settings(ds, micro_batch=2, grad_accum=4, max_grad_norm=None)
        assert (ds["gradient_clipping"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) \
            == (0.0, 4, 2)
        if name == "zero3":
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        env = prepare_multi_gpu_env(args)
        if name == "fsdp2":
            assert args.use_fsdp and env["FSDP_VERSION"] == "2" and env["ACCELERATE_USE_FSDP"] == "true"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        else:
            assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


def test_student_names_its_shard_units(model):
    assert ORPOStudent(model)._no_split_modules == ["LlamaDecoderLayer"]


def test_full_state_dicts_round_trip_in_one_process(unigram_tokenizer):
    from orpo_distill.distributed import full_state_dicts, load_full_state_dicts

    a = ORPOStudent(tiny_llama(unigram_tokenizer, seed=1, hidden=16, layers=1, vocab_size=97))
    b = ORPOStudent(tiny_llama(unigram_tokenizer, seed=2, hidden=16, layers=1, vocab_size=97))
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    a(collate(items(2), 0))[0].backward()
    opt_a.step()
    model_sd, optim_sd = full_state_dicts(a, opt_a)
    assert set(hf_state_dict(model_sd)) == set(a.model.state_dict())
    load_full_state_dicts(b, model_sd)  # weights only
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    load_full_state_dicts(b, model_sd, opt_b, optim_sd)
    assert opt_b.state_dict()["state"][0]["exp_avg"].equal(opt_a.state_dict()["state"][0]["exp_avg"])


def test_sharded_checkpoint_is_published_by_one_rename(tmp_path):
    """A checkpoint folder every rank writes into (FSDP2 dcp, DeepSpeed) is invisible until rank 0 renames it:
    a save killed before the rename leaves the previous checkpoint the newest complete one, and the next save
    removes the killed save's leftovers and the older checkpoint."""
    from orpo_distill.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints
    from orpo_distill.distributed import publish_checkpoint

    root = tmp_path / "checkpoints"

    def write(name: str) -> Path:
        tmp = root / f".tmp-{name}-shared"
        (tmp / "engine").mkdir(parents=True)
        for r in range(2):  # what each rank writes, then rank 0's state.json last
            (tmp / "engine" / f"rank{r}.pt").write_bytes(b"x")
        (tmp / "state.json").write_text("{}")
        return tmp

    first = publish_checkpoint(write(checkpoint_name(2, False)), root / checkpoint_name(2, False))
    assert latest_checkpoint(root) == first and (first / "engine" / "rank1.pt").is_file()
    killed = write(checkpoint_name(4, False))  # every shard and state.json written, killed before the rename
    assert latest_checkpoint(root) == first and killed.exists()
    second = publish_checkpoint(write(checkpoint_name(5, True)), root / checkpoint_name(5, True))
    assert list_checkpoints(root) == [second] and not killed.exists() and not first.exists()
    assert sorted(p.name for p in root.iterdir()) == [second.name]
