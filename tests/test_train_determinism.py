"""A run is a function of its config and seed, not of the machine's state: a tiny mixed-policy ORPO variant (which
samples the live student between epochs, so any numeric drift would change its pools) trained twice, once alone on
one torch thread with one set of sampling/eval batch sizes, once on two threads with other batch sizes right after
another variant (other precision, other seed) in the same process, gives the same losses, pools, evaluations and
weights, bit for bit. Each run has its own trace store, so nothing is shared but the config."""

from __future__ import annotations

import json

import torch
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
