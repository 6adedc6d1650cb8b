"""Per-rank programs of the 2-process tests (tests/test_distributed_*.py), run under torchrun on gloo (CPU).

`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_workers.py MODE OUT_DIR`
writes OUT_DIR/MODE.rank<r>.json; the tests compare it with one process. Every rank records the world size it
saw, so a launch that silently started one process fails the test.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from orpo_distill.distributed import (  # noqa: E402
    apply_fsdp2,
    deepspeed_config,
    full_state_dicts,
    init_process_group,
    load_full_state_dicts,
    load_sharded,
    reduce_step_totals,
    save_sharded,
    split_step,
    unsharded,
)
from orpo_distill.loss import ORPOLoss, ORPOStudent, SFTLoss, StepTotals, step_totals  # noqa: E402
from orpo_distill.pairs import Encoded, collate  # noqa: E402

VOCAB, PAD = 97, 0


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=PAD,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def items(n: int, pairs: bool = True, seed: int = 0) -> list[Encoded]:
    """Ragged prompts and completions, so padding and token pooling both matter."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(4, VOCAB) for _ in range(rng.randint(2, 6))]
        c = [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))]
        r = [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))] if pairs else None
        out.append(Encoded(f"q{i}", p, c, r, f"c{i}", f"r{i}" if pairs else None))
    return out


def grads(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).tolist()


def rank_batches(xs: list[Encoded], world: int, rank: int, grad_accum: int) -> list[tuple[dict, float]]:
    """This rank's micro-batches of one global step, with weight 0 on a stand-in for an empty one."""
    out = []
    for mb in split_step(range(len(xs)), world, rank, grad_accum):
        out.append((collate([xs[i] for i in mb], PAD), 1.0) if mb else (collate([xs[0]], PAD), 0.0))
    return out


def local_totals(batches: list[tuple[dict, float]], scope: str) -> StepTotals:
    return step_totals([b for b, w in batches if w], scope) if any(w for _, w in batches) else StepTotals(0, 0)


def ddp_step(wrapped, batches, totals) -> float:
    """One optimiser step's backward passes: gradients synchronised on the last micro-batch only."""
    loss_sum = 0.0
    for k, (b, w) in enumerate(batches):
        ctx = wrapped.no_sync() if k < len(batches) - 1 else _null()
        with ctx:
            loss, _ = wrapped(b, totals, weight=w)
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def global_loss(local_share_sum: float) -> float:
    """The global step's loss: the mean over ranks of each rank's (world-scaled) shares."""
    t = torch.tensor([local_share_sum], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


# ---------------------------------------------------------------------------------------------------------------

def mode_ddp(info) -> dict:
    """Gradients of one DDP step (ragged split, no_sync) vs one process over the same global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cases = {"orpo-7-seq": ("orpo", 7, 2, "completion", "sequence"),
             "orpo-7-tok": ("orpo", 7, 2, "all", "token"),
             "sft-5-tok": ("sft", 5, 2, "all", "token"),
             "orpo-3-empty-microbatch": ("orpo", 3, 2, "completion", "sequence")}
    out = {}
    for name, (kind, n, ga, scope, red) in cases.items():
        xs = items(n, pairs=kind == "orpo", seed=n)
        orpo = ORPOLoss(lam=0.7, nll_scope=scope, nll_reduction=red, chunk_size=5)
        sft = SFTLoss(nll_scope=scope, nll_reduction=red, chunk_size=5)
        ref_model = tiny_llama()
        ref_loss, _ = (orpo if kind == "orpo" else sft)(ref_model, collate(xs, PAD))
        ref_loss.backward()
        model = tiny_llama()
        wrapped = DDP(ORPOStudent(model, orpo, sft))
        batches = rank_batches(xs, info.world, info.rank, ga)
        totals = reduce_step_totals(local_totals(batches, scope))
        share_sum = ddp_step(wrapped, batches, totals)
        out[name] = {"want": grads(ref_model), "got": grads(model), "want_loss": float(ref_loss.detach()),
                     "got_loss": global_loss(share_sum), "totals": [totals.items, totals.tokens, totals.world],
                     "micro": [len(b["input_ids"]) if w else 0 for b, w in batches]}
    # negative control: the functional loss on the bare model, around DDP's forward: no reducer, no averaging
    xs = items(7, seed=7)
    model = tiny_llama()
    wrapped = DDP(ORPOStudent(model, ORPOLoss(lam=0.7, chunk_size=5)))
    batches = rank_batches(xs, info.world, info.rank, 2)
    totals = reduce_step_totals(local_totals(batches, "completion"))
    for b, _ in batches:
        wrapped.module.orpo(model, b, totals)[0].backward()
    out["bypass"] = {"want": out["orpo-7-seq"]["want"], "got": grads(model)}

    # the same step through accelerate (what the trainer prepares): Accelerator on the CPU under torchrun is
    # MULTI_CPU, `prepare` wraps the ORPOStudent in DDP, `no_sync` + `backward` as the trainer calls them
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    orpo = ORPOLoss(lam=0.7, chunk_size=5)
    model = tiny_llama()
    student, opt = acc.prepare(ORPOStudent(model, orpo), torch.optim.SGD(model.parameters(), lr=0.0))
    totals = reduce_step_totals(local_totals(batches, "completion"))
    for k, (b, w) in enumerate(batches):
        with acc.no_sync(student) if k < len(batches) - 1 else _null():
            loss, _ = student(b, totals, weight=w)
            acc.backward(loss)
    out["accelerate"] = {"want": out["orpo-7-seq"]["want"], "got": grads(model), "want_loss": 0.0, "got_loss": 0.0,
                         "totals": [totals.items, totals.tokens, totals.world], "micro": [],
                         "engine": f"{acc.distributed_type.value}:{type(student).__name__}:{acc.num_processes}"}
    return out


STEPS, GA, N_PER_STEP, LR, SGD_LR = 4, 2, 6, 1e-2, 0.5


def _train(wrapped, module, opt, steps, scope="completion", backward=None, step=None) -> list[float]:
    """Optimiser steps `steps` of a fixed schedule of global batches; returns each step's global loss."""
    info = init_process_group()
    losses = []
    for s in steps:
        xs = items(N_PER_STEP, seed=100 + s)
        batches = rank_batches(xs, info.world, info.rank, GA)
        totals = reduce_step_totals(local_totals(batches, scope))
        share_sum = 0.0
        for k, (b, w) in enumerate(batches):
            loss, _ = wrapped(b, totals, weight=w)
            if backward is not None:
                backward(loss)
            else:
                ctx = wrapped.no_sync() if hasattr(wrapped, "no_sync") and k < len(batches) - 1 else _null()
                with ctx:
                    loss.backward()
            if step is not None:
                step()
            share_sum += float(loss.detach())
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(global_loss(share_sum))
    return losses


def _orpo_student(seed: int = 0, uniform_chunks: bool = False) -> ORPOStudent:
    return ORPOStudent(tiny_llama(seed), ORPOLoss(lam=0.5, chunk_size=7), uniform_chunks=uniform_chunks)


def mode_fsdp(info, out_dir: Path) -> dict:
    """FSDP2 trains like DDP; a full-state checkpoint after 2 steps resumes exactly like continuing."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_mod = _orpo_student()
    ddp = DDP(ddp_mod)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
    ddp_losses = _train(ddp, ddp_mod, ddp_opt, range(STEPS))

    fsdp = apply_fsdp2(_orpo_student())
    opt = torch.optim.AdamW(fsdp.parameters(), lr=LR)
    first = _train(fsdp, fsdp, opt, range(2))
    model_sd, optim_sd = full_state_dicts(fsdp, opt)
    ckpt = out_dir / "fsdp_ckpt.pt"
    if info.rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model_sd, "optim": optim_sd}, tmp)
        os.replace(tmp, ckpt)  # atomic: a reader never sees half a checkpoint
    torch.distributed.barrier()
    save_sharded(out_dir / "fsdp_dcp", fsdp, opt)  # one shard per rank
    cont = _train(fsdp, fsdp, opt, range(2, STEPS))

    # the trained FSDP2 student, used outside the root's forward (as generation does), equals DDP's
    probe = collate(items(2, seed=7), PAD)
    with torch.no_grad(), unsharded(fsdp):
        fsdp_logits = fsdp.model(input_ids=probe["input_ids"]).logits
    ddp_logits = ddp_mod.model(input_ids=probe["input_ids"]).logits.detach()

    resumed_mod = apply_fsdp2(_orpo_student(seed=123))  # other initial weights: the load must replace them
    ropt = torch.optim.AdamW(resumed_mod.parameters(), lr=LR)
    saved = torch.load(ckpt, weights_only=False)
    load_full_state_dicts(resumed_mod, saved["model"], ropt, saved["optim"])
    resumed = _train(resumed_mod, resumed_mod, ropt, range(2, STEPS))

    # and from the sharded checkpoint
    c_mod = apply_fsdp2(_orpo_student(seed=7))
    copt = torch.optim.AdamW(c_mod.parameters(), lr=LR)
    load_sharded(out_dir / "fsdp_dcp", c_mod, copt)
    resumed_c = _train(c_mod, c_mod, copt, range(2, STEPS))
    return {"ddp": ddp_losses, "fsdp": first + cont, "resumed": resumed, "resumed_sharded": resumed_c, "dcp_files": sorted(p.name for p in (out_dir / "fsdp_dcp").iterdir()),
            "full_state_keys": len(model_sd),
            "logits_diff": float((fsdp_logits - ddp_logits).abs().max()),
            "sharded": sum(p.numel() for p in fsdp.parameters() if hasattr(p, "to_local")
                           and p.to_local().numel() < p.numel()),
            "ckpt_keys_hf": sorted(k for k in saved["model"] if k.startswith("model."))[:3]}


def mode_deepspeed(info) -> dict:
    """DeepSpeed ZeRO-2 and ZeRO-3 (torch AdamW, no compiled op) against DDP: step losses and the first gradient."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_mod = _orpo_student()
    ddp = DDP(ddp_mod)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
    out = {"ddp": _train(ddp, ddp_mod, ddp_opt, range(STEPS))}
    ref = _orpo_student()
    xs = items(N_PER_STEP, seed=100)
    ref_loss, _ = ref.orpo(ref.model, collate(xs, PAD))
    ref_loss.backward()
    out["want_grad"] = torch.cat([p.grad.flatten() for p in ref.parameters()]).tolist()
    for stage in (2, 3):
        module = _orpo_student(uniform_chunks=stage == 3)
        names = [n for n, _ in module.named_parameters()]
        cfg = deepspeed_config(stage, micro_batch=N_PER_STEP // (GA * info.world), grad_accum=GA, lr=LR,
                               weight_decay=0.01, world=info.world)  # torch AdamW's default, as DDP's
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=cfg)
        grad_first: list[float] = []
        losses = []
        for s in range(STEPS):
            xs = items(N_PER_STEP, seed=100 + s)
            batches = rank_batches(xs, info.world, info.rank, GA)
            totals = reduce_step_totals(local_totals(batches, "completion"))
            share_sum = 0.0
            for k, (b, w) in enumerate(batches):
                loss, _ = engine(b, totals, weight=w)
                engine.backward(loss, scale_wrt_gas=False)  # our shares already sum to the step's loss
                if s == 0 and k == len(batches) - 1:
                    params = dict(engine.module.named_parameters())
                    grad_first = torch.cat([safe_get_full_grad(params[n]).flatten() for n in names]).tolist()
                engine.step()
                share_sum += float(loss.detach())
            losses.append(global_loss(share_sum))
        out[f"zero{stage}"] = losses
        out[f"zero{stage}_grad"] = grad_first
        del engine
    sgd_mod = _orpo_student()
    sgd = DDP(sgd_mod)
    out["ddp_sgd"] = _train(sgd, sgd_mod, torch.optim.SGD(sgd.parameters(), lr=SGD_LR), range(STEPS))
    out["accelerate_zero3"] = _accelerate_zero3(info)
    return out


def _accelerate_zero3(info) -> list[float]:
    """ZeRO-3 through accelerate's own loop: the launch config's plugin completed by `apply_trainer_settings`,
    `accumulate` marking DeepSpeed's boundary, `backward(loss, scale_wrt_gas=False)` (the recipe instead marks the
    boundary and steps the engine itself; tests/test_ddp_deepspeed.py runs it)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from orpo_distill.distributed import apply_trainer_settings

    os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                       "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true", "ACCELERATE_GRADIENT_CLIPPING": "auto"})
    plugin = DeepSpeedPlugin()  # what `accelerate launch --config_file examples/accelerate/zero3.yaml` builds
    apply_trainer_settings(plugin.deepspeed_config, micro_batch=N_PER_STEP // (GA * info.world), grad_accum=GA,
                           max_grad_norm=None, world=info.world)
    acc = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert acc.num_processes == info.world and acc.distributed_type.value == "DEEPSPEED"
    module = _orpo_student(uniform_chunks=True)
    # SGD, not Adam: its update is proportional to the gradient, so a wrong loss scale shows in the losses
    wrapped, opt = acc.prepare(module, torch.optim.SGD(module.parameters(), lr=SGD_LR))
    assert acc.gradient_accumulation_steps == GA
    losses = []
    for s in range(STEPS):
        xs = items(N_PER_STEP, seed=100 + s)
        batches = rank_batches(xs, info.world, info.rank, GA)
        totals = reduce_step_totals(local_totals(batches, "completion"))
        share_sum = 0.0
        for b, w in batches:
            with acc.accumulate(wrapped):
                loss, _ = wrapped(b, totals, weight=w)
                acc.backward(loss, scale_wrt_gas=False)
                opt.step()  # no-ops under DeepSpeed: the engine stepped at the boundary
                opt.zero_grad()
            share_sum += float(loss.detach())
        losses.append(global_loss(share_sum))
    return losses


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    info = init_process_group("gloo")
    assert torch.distributed.is_initialized()
    res = {"mode_ddp": lambda: mode_ddp(info), "mode_fsdp": lambda: mode_fsdp(info, out_dir),
           "mode_deepspeed": lambda: mode_deepspeed(info)}[f"mode_{mode}"]()
    res["world"], res["rank"] = torch.distributed.get_world_size(), torch.distributed.get_rank()
    (out_dir / f"{mode}.rank{info.rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()


def launch(mode: str, out_dir: Path, env: dict[str, str] | None = None, timeout: float = 300.0) -> list[dict]:
    """Run MODE under torchrun with 2 processes; both ranks' results (each asserted to have seen world 2)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), full_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), mode, str(out_dir)]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=repo)
    assert proc.returncode == 0, f"torchrun {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [json.loads((out_dir / f"{mode}.rank{r}.json").read_text()) for r in range(2)]
    assert [(r["world"], r["rank"]) for r in results] == [(2, 0), (2, 1)]  # really two processes
    return results
