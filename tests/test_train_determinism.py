"""A run is a function of its config and seed, not of the machine's state.

The demo's on-policy row changed with the number of torch threads: PyTorch's CPU attention for one query token (each
KV-cache decoding step of the live student's sampling) sums in an order that depends on the thread count, and
inverse-CDF sampling turned the last-bit difference into another token in 1 of 2048 samples, which changed the
on-policy pool and everything after it. The trainer samples and evaluates the live student under
`sampling.hf.invariant_attention`. Here: that context makes decoding attention thread-invariant, the trainer's sampler and
evaluator run inside it, and a tiny mixed-policy ORPO variant trained twice (one thread and one set of sampling/eval
batch sizes; two threads, other batch sizes, right after another variant with another precision and seed in the
same process, each run with its own store) gives the same losses, pools, evaluations and weights, bit for bit."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from test_train import ArithTask, make_questions, make_store, tiny_config
from test_train_resume import _weights


def _run(tmp_path, tiny_llama_dir, name, *, threads, student_bs, eval_bs, before=None):
    from orpo_distill.train import train_variant, variant_dir

    task, qs = ArithTask(), make_questions(8)
    cfg = tiny_config(tiny_llama_dir, tmp_path / name, **{"trainer.epochs": 3, "policy.phi": 0.5,
                                                          "sampling.max_new_tokens": 12, "student.batch_size": student_bs,
                                                          "eval.batch_size": eval_bs})
    store = make_store(cfg, qs, task, student_all_right={"q7"})
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if before is not None:  # another variant first, in this process (its own precision and seed)
            other = cfg.model_copy(deep=True)
            other.trainer.precision, other.trainer.epochs = "bf16", 1
            train_variant(other, before, 5, tmp_path / name / "before", task=task, train_questions=qs,
                          eval_questions=qs[:2], store=store, progress=False)
        out = variant_dir(cfg, "orpo_mixed", 0)
        res = train_variant(cfg, "orpo_mixed", 0, out, task=task, train_questions=qs, eval_questions=qs,
                            store=store, progress=False)
    finally:
        torch.set_num_threads(saved)
        store.close()
    pools = [json.loads((out / "pools" / f"epoch{e}.json").read_text()) for e in (1, 2, 3)]
    preds = [(out / "predictions" / f"epoch{e}.jsonl").read_text() for e in (1, 2, 3)]
    return res, pools, preds, _weights(out / "model")


def test_same_config_and_seed_same_run_whatever_the_process_state(tmp_path, tiny_llama_dir):
    res_a, pools_a, preds_a, w_a = _run(tmp_path, tiny_llama_dir, "a", threads=1, student_bs=8, eval_bs=8)
    res_b, pools_b, preds_b, w_b = _run(tmp_path, tiny_llama_dir, "b", threads=2, student_bs=3, eval_bs=5,
                                        before="orpo_on")
    assert res_a["per_epoch"][1]["pool"]["sampled_questions"] > 0  # the live student was sampled
    assert [e["train_loss"] for e in res_a["per_epoch"]] == [e["train_loss"] for e in res_b["per_epoch"]]
    assert pools_a == pools_b
    assert preds_a == preds_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert res_a["identity_hash"] == res_b["identity_hash"]  # batch sizes are not part of the run's identity


def test_decoding_attention_is_thread_invariant_in_the_trainers_context():
    from orpo_distill.sampling.hf import invariant_attention

    g = torch.Generator().manual_seed(0)
    for rows, length in ((1, 40), (8, 100), (64, 180)):
        q = torch.randn(rows, 4, 1, 24, generator=g)  # one query token: a KV-cache decoding step
        k, v = torch.randn(rows, 4, length, 24, generator=g), torch.randn(rows, 4, length, 24, generator=g)
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
        mask[:, :, :, :3] = False  # left padding
        out = {}
        saved = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with invariant_attention(torch.device("cpu")):
                    out[threads] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        finally:
            torch.set_num_threads(saved)
        assert torch.equal(out[1], out[2]), (rows, length)


def test_live_student_sampling_and_evaluation_run_with_invariant_attention(tmp_path, tiny_llama_dir):
    from orpo_distill.train import default_evaluator, default_sampler, train_variant, variant_dir

    task, qs = ArithTask(), make_questions(8)
    cfg = tiny_config(tiny_llama_dir, tmp_path / "run", **{"trainer.epochs": 2, "sampling.max_new_tokens": 6})
    store = make_store(cfg, qs, task, student_all_right={"q7"})
    seen = []
    sample = default_sampler(cfg, "orpo_on", 0, task, store, tmp_path, False)
    evaluate = default_evaluator(cfg, "orpo_on", 0, task, qs[:2], False)

    def sampler(*args):
        seen.append(("sample", torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sample(*args)

    def evaluator(*args):
        seen.append(("eval", torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return evaluate(*args)

    train_variant(cfg, "orpo_on", 0, variant_dir(cfg, "orpo_on", 0), task=task, train_questions=qs,
                  eval_questions=qs[:2], store=store, progress=False, sampler=sampler, evaluator=evaluator)
    store.close()
    assert {kind for kind, _, _ in seen} == {"sample", "eval"}
    assert all(not flash and math for _, flash, math in seen), seen
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards (training keeps the fast kernels)
