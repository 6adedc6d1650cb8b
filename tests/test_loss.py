"""The ORPO objective: against an independent float64 reference, gradcheck, extremes, chunked == naive, TRL."""

from __future__ import annotations

import math
import os

import mpmath
import pytest
import torch
from conftest import tiny_llama

from orpo_distill.loss import (
    ORPOLoss,
    SFTLoss,
    log1mexp,
    log_odds_ratio,
    orpo_objective,
    sequence_logps,
    sequence_logps_naive,
)


def ref_log_odds(c: float, r: float) -> float:
    """log(odds(c)/odds(r)) straight from the definition odds = q/(1-q), q = exp(l), evaluated with 60 digits
    (mpmath, so exp(-1e4) does not underflow) and rounded to float64. Independent of loss.py."""
    with mpmath.workdps(60):
        qc, qr = mpmath.exp(mpmath.mpf(c)), mpmath.exp(mpmath.mpf(r))
        return float(mpmath.log((qc / (1 - qc)) / (qr / (1 - qr))))


GRID = [-1e-12, -1e-10, -1e-9, -1e-8, -1e-7, -5e-7, -1e-6, -1e-5, -1e-3, -0.01, -0.1, -0.5, -0.69,
        -0.6931471805599453, -0.7, -1.0, -2.0, -5.0, -20.0, -100.0, -1e3, -1e4]


def ref_log1mexp(x: float) -> float:
    """log(1 - exp(x)) with 60 digits (mpmath), independent of loss.py."""
    with mpmath.workdps(60):
        return float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_log1mexp_relative_error_down_to_tiny_l(dtype):
    """No clamp below 0: a memorised trace's mean log-prob of -1e-9 gets its exact log(1 - q), not that of
    -1e-7 (the old clamp gave log1mexp(-1e-9) = log(1e-7), 10% off, and a zero gradient)."""
    x = torch.tensor(GRID, dtype=dtype)
    got = log1mexp(x)
    floor = torch.finfo(got.dtype).tiny  # far from 0 the result underflows (-e^-1e4): relative error is moot
    for xi, gi in zip(x.double().tolist(), got.double().tolist()):
        want = ref_log1mexp(xi)  # at exactly the value the function saw
        assert abs(gi - want) <= 1e-4 * abs(want) + floor, (xi, gi, want)


def test_log1mexp_gradient_is_exact_near_zero():
    x = torch.tensor([-1e-12, -1e-9, -1e-7, -1e-3, -0.5], requires_grad=True)
    log1mexp(x).sum().backward()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    want = torch.tensor([-math.exp(v) / -math.expm1(v) for v in [-1e-12, -1e-9, -1e-7, -1e-3, -0.5]])
    assert torch.allclose(x.grad.double(), want.double(), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_zero_and_any_input_give_finite_values_and_gradients(dtype):
    specials = [0.0, -0.0, 1e-7, 3.0, float("inf"), float("-inf"), -1e-45, -1e-38, -1e-30]
    x = torch.tensor(specials, dtype=dtype, requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y[:5]).all() and not torch.isnan(y).any()
    assert torch.isfinite(x.grad.float()).all()
    assert x.grad[0].item() == 0 and x.grad[1].item() == 0  # 0 and -0 are the clamped certain model
    c = torch.tensor(specials, dtype=dtype, requires_grad=True)
    r = torch.tensor([-1.0] * len(specials), dtype=dtype, requires_grad=True)
    lor = log_odds_ratio(c, r)
    (-torch.nn.functional.logsigmoid(lor)).sum().backward()
    assert not torch.isnan(lor).any() and torch.isfinite(lor[:4]).all()
    assert torch.isfinite(c.grad.float()).all() and torch.isfinite(r.grad.float()).all()


def test_log_odds_ratio_matches_float64_definition():
    c = torch.tensor([a for a in GRID for _ in GRID], dtype=torch.float32)
    r = torch.tensor([b for _ in GRID for b in GRID], dtype=torch.float32)
    got = log_odds_ratio(c, r).double()
    for i in range(len(c)):
        # reference evaluated at exactly the float32 inputs the function saw
        want = ref_log_odds(float(c[i]), float(r[i]))
        assert got[i].dtype == torch.float64
        assert abs(got[i].item() - want) <= 1e-4 * max(1.0, abs(want)), (c[i].item(), r[i].item(), got[i].item(), want)


def test_log_odds_ratio_relative_error_away_from_zero():
    # relative error in the strict sense where the value is not tiny
    g = torch.Generator().manual_seed(0)
    c = -torch.rand(2000, generator=g) * 8 - 1e-4
    r = -torch.rand(2000, generator=g) * 8 - 1e-4
    got = log_odds_ratio(c, r).double()
    want = torch.tensor([ref_log_odds(float(a), float(b)) for a, b in zip(c, r)], dtype=torch.float64)
    big = want.abs() > 1e-3
    rel = ((got - want).abs() / want.abs())[big]
    assert rel.max().item() < 1e-4


def test_log_odds_ratio_is_float32_for_half_inputs():
    c = torch.tensor([-0.3, -2.0], dtype=torch.bfloat16)
    r = torch.tensor([-1.0, -0.1], dtype=torch.bfloat16)
    out = log_odds_ratio(c, r)
    assert out.dtype == torch.float32
    want = [ref_log_odds(float(a), float(b)) for a, b in zip(c.float(), r.float())]
    assert torch.allclose(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)


def test_log1mexp_branches_agree_with_float64():
    x = torch.tensor(GRID, dtype=torch.float64)
    want = torch.log(-torch.expm1(x))
    assert torch.allclose(log1mexp(x), want, rtol=1e-12)


def test_log_odds_ratio_tiny_chosen_logp_is_not_clamped():
    # -1e-9 and -1e-8 used to collapse onto the same clamped value (-1e-7): now their log-odds differ by ln 10
    c = torch.tensor([-1e-9, -1e-8])
    r = torch.tensor([-1.0, -1.0])
    lor = log_odds_ratio(c, r)
    assert (lor[0] - lor[1]).item() == pytest.approx(math.log(10.0), rel=1e-4)


def test_gradcheck_log_odds_and_objective():
    g = torch.Generator().manual_seed(1)
    c = (-torch.rand(6, generator=g, dtype=torch.float64) * 4 - 0.01).requires_grad_()
    r = (-torch.rand(6, generator=g, dtype=torch.float64) * 4 - 0.01).requires_grad_()
    assert torch.autograd.gradcheck(log_odds_ratio, (c, r))
    nll = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def obj(c, r, nll):
        return orpo_objective(c, r, nll, lam=0.5)[0]

    # the objective is float32 inside by design; gradcheck it with a float32-appropriate tolerance
    assert torch.autograd.gradcheck(obj, (c, r, nll), eps=1e-3, atol=1e-3, rtol=1e-2)


EXTREMES = [0.0, -0.0, -1e-30, -1e-9, -1e-7, -1e-4, -0.6931, -0.6932, -1.0, -50.0, -1e3, -1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_or_inf_at_extremes(dtype):
    c = torch.tensor([a for a in EXTREMES for _ in EXTREMES], dtype=dtype, requires_grad=True)
    r = torch.tensor([b for _ in EXTREMES for b in EXTREMES], dtype=dtype, requires_grad=True)
    lor = log_odds_ratio(c, r)
    assert torch.isfinite(lor).all()
    loss, metrics = orpo_objective(c, r, -c.float().mean(), lam=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(c.grad.float()).all() and torch.isfinite(r.grad.float()).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_objective_matches_formula():
    c = torch.tensor([-0.2, -1.5, -0.9])
    r = torch.tensor([-0.8, -0.3, -0.9])
    nll = torch.tensor(1.25)
    loss, m = orpo_objective(c, r, nll, lam=0.3)
    lors = [ref_log_odds(float(a), float(b)) for a, b in zip(c, r)]
    l_or = sum(-math.log(1 / (1 + math.exp(-x))) for x in lors) / 3
    assert loss.item() == pytest.approx(1.25 + 0.3 * l_or, rel=1e-6)
    assert m["pref_acc"].item() == pytest.approx(1 / 3)
    assert m["log_odds"].item() == pytest.approx(sum(lors) / 3, rel=1e-5)


# ---- on a model ---------------------------------------------------------------------------------------------------

def _batch(vocab: int, b: int = 4, t: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    cm = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):  # ragged: prompt length and total length differ per row, right padding
        p, n = 4 + i, t - 2 * i
        am[i, n:] = 0
        ids[i, n:] = 0
        cm[i, p:n] = 1
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


@pytest.fixture(scope="module")
def big_vocab_model(unigram_tokenizer):
    return tiny_llama(unigram_tokenizer, hidden=16, layers=1, vocab_size=32768).float()


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_chunked_equals_naive_values_and_grads(big_vocab_model):
    model = big_vocab_model
    batch = _batch(32768)
    res = {}
    for name, fn in [("naive", lambda: sequence_logps_naive(model, batch["input_ids"], batch["attention_mask"],
                                                            batch["completion_mask"], ("completion", "all"))),
                     ("chunked", lambda: sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                                        batch["completion_mask"], ("completion", "all"), chunk_size=7))]:
        model.zero_grad()
        out = fn()
        (out["completion"].mean.sum() + 0.5 * out["all"].sum.sum()).backward()
        res[name] = (out, _grads(model).clone())
    (a, ga), (b, gb) = res["naive"], res["chunked"]
    for s in ("completion", "all"):
        assert torch.allclose(a[s].sum, b[s].sum, rtol=1e-5, atol=1e-4)
        assert torch.equal(a[s].count, b[s].count)
    # float32 summation order differs between the paths: compare against the gradient's own scale
    assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()
    assert ga.abs().max() > 0


def test_orpo_loss_against_float64_reference(unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, hidden=16, layers=2)
    batch = _batch(len(unigram_tokenizer), b=4)
    loss, m = ORPOLoss(lam=1.0)(model, batch)
    # independent reference: float64 model, full log-softmax, per-row loops
    ref = model.double()
    with torch.no_grad():
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.float()
    lp = torch.log_softmax(logits, -1)
    means = []
    for i in range(4):
        toks = [lp[i, t - 1, batch["input_ids"][i, t]].item() for t in range(1, 24)
                if batch["completion_mask"][i, t] and batch["attention_mask"][i, t]]
        means.append(sum(toks) / len(toks))
    c, r = means[:2], means[2:]
    l_or = sum(-math.log(1 / (1 + math.exp(-ref_log_odds(a, b)))) for a, b in zip(c, r)) / 2
    want = -sum(c) / 2 + l_or
    assert loss.item() == pytest.approx(want, rel=1e-4)
    assert m["chosen_logp"].item() == pytest.approx(sum(c) / 2, rel=1e-4)


def test_padding_side_and_position_ids_do_not_change_logps(unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, hidden=16, layers=2)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, len(unigram_tokenizer), (10,), generator=g)
    cmask = torch.tensor([0] * 4 + [1] * 6)
    alone = sequence_logps(model, seq[None], torch.ones(1, 10, dtype=torch.long), cmask[None])["completion"].sum
    pad = torch.zeros(5, dtype=torch.long)
    right = sequence_logps(model, torch.cat([seq, pad])[None], torch.cat([torch.ones(10), pad]).long()[None],
                           torch.cat([cmask, pad])[None])["completion"].sum
    left = sequence_logps(model, torch.cat([pad, seq])[None], torch.cat([pad, torch.ones(10)]).long()[None],
                          torch.cat([pad, cmask])[None])["completion"].sum
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)


def test_nll_scope_and_reduction(unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, hidden=16, layers=1)
    batch = _batch(len(unigram_tokenizer), b=4)
    lps = sequence_logps_naive(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               ("completion", "all"))
    with torch.no_grad():
        _, seq_c = ORPOLoss(lam=0.0)(model, batch)
        _, tok_all = ORPOLoss(lam=0.0, nll_scope="all", nll_reduction="token")(model, batch)
        sft, _ = SFTLoss()(model, {k: v[:2] for k, v in batch.items()})
    assert seq_c["nll"].item() == pytest.approx(-lps["completion"].mean[:2].mean().item(), rel=1e-5)
    assert tok_all["nll"].item() == pytest.approx((-lps["all"].sum[:2].sum() / lps["all"].count[:2].sum()).item(),
                                                  rel=1e-5)
    assert sft.item() == pytest.approx(seq_c["nll"].item(), rel=1e-5)


def test_equals_trl_orpo_trainer_loss(tmp_path, unigram_tokenizer):
    """TRL's experimental ORPOTrainer on the same tiny model and batch: NLL over prompt+completion pooled over
    tokens (TRL's choice), lambda = beta. Our loss on TRL's own tokenised batch must equal its loss."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = unigram_tokenizer
    model = tiny_llama(tok, hidden=16, layers=2)
    rows = [
        {"prompt": "Question: Tom has 3 apples and buys 4 more.", "chosen": " 3 + 4 = 7. The answer is 7.",
         "rejected": " 3 - 4 = 1. The answer is 1."},
        {"prompt": "Question: Is the sun a star?", "chosen": " The sun is a star. The answer is yes.",
         "rejected": " No. The answer is no."},
        {"prompt": "Question: Which gas do plants take in?", "chosen": " Carbon dioxide. The answer is (B).",
         "rejected": " Oxygen, for photosynthesis of the plants. The answer is (A)."},
    ]
    beta = 0.25
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_length=128, beta=beta,
                      use_cpu=True, bf16=False, report_to=[], remove_unused_columns=False,
                      dataloader_num_workers=0)
    tr = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    assert len(set(batch["chosen_attention_mask"].sum(-1).tolist())) > 1  # ragged rows: padding is exercised
    model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = tr.get_batch_loss_metrics(model, batch)
        cb = tr.concatenated_inputs(batch, padding_value=tr.padding_value, device=torch.device("cpu"))
        ids, am = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        ours_batch = {"input_ids": ids, "attention_mask": am,
                      "completion_mask": (cb["concatenated_labels"] != -100).long()}
        ours, m = ORPOLoss(lam=beta, nll_scope="all", nll_reduction="token")(model, ours_batch)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert m["chosen_logp"].item() == pytest.approx(float(trl_metrics["logps/chosen"]), rel=1e-5)
    assert m["rejected_logp"].item() == pytest.approx(float(trl_metrics["logps/rejected"]), rel=1e-5)
