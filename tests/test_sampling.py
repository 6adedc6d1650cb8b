"""The transformers backend, the sampling stage and the ROUGE-L diversity filter (tiny random-weight models)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_helpers import AddTask, add_questions, comparable

from orpo_distill.sampling.base import Completion, GenerationFailed, SamplingParams
from orpo_distill.sampling.diversity import diversity_keep, lcs_length, rouge_l_f1
from orpo_distill.sampling.hf import HFGenerator, encode_prompt, sample_tokens
from orpo_distill.sampling.stage import SamplingAborted, sample_to_store
from orpo_distill.store import TraceStore

MESSAGES = ["Tom has 3 apples", "Is the sun a star? The answer is yes or no, and here are many more words to pad",
            "12 - 5", "Which gas do plants take in? (A) oxygen (B) carbon dioxide (C) helium (D) neon"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_and_tok(request, bpe_tokenizer, unigram_tokenizer):
    if request.param == "gpt2":
        return tiny_gpt2(bpe_tokenizer, seed=1, n_embd=48), bpe_tokenizer
    return tiny_llama(unigram_tokenizer, seed=1), unigram_tokenizer


def gen(model, tok, batch_size=8, **kw) -> HFGenerator:
    return HFGenerator(model, tok, model_id="tiny", revision="r0", template="plain", batch_size=batch_size, **kw)


def texts(res: list[list[Completion]]) -> list[list[str]]:
    return [[c.text for c in r] for r in res]


# -- the transformers backend -------------------------------------------------------------------------------------

def test_greedy_equals_transformers_generate_one_prompt_at_a_time(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    res = g.generate(MESSAGES, SamplingParams(n=1, temperature=0, max_new_tokens=16))
    for msg, r in zip(MESSAGES, res):
        ids = encode_prompt(tok, g.render(msg))
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, len(ids):].tolist()
        assert r[0].text == tok.decode(ref_ids, skip_special_tokens=True)
        assert r[0].prompt_tokens == len(ids)


def test_samples_do_not_depend_on_batch_neighbours_or_batch_size(model_and_tok):
    """Left padding, masks and position ids are right, and each sample has its own random stream: prompt i's
    samples are the same alone, in a batch with longer prompts, and with any batch size."""
    model, tok = model_and_tok
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=20, seed=7)
    together = gen(model, tok, batch_size=8).generate(MESSAGES, p)
    alone = [gen(model, tok).generate([m], p)[0] for m in MESSAGES]
    in_pairs = gen(model, tok, batch_size=2).generate(MESSAGES, p)
    assert texts(together) == texts(alone) == texts(in_pairs)
    assert len({c.text for r in together for c in r}) == 12  # all different at T=1


def test_sample_indices_give_exactly_those_samples(model_and_tok):
    model, tok = model_and_tok
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=3)
    g = gen(model, tok)
    full = g.generate(MESSAGES[:2], p)
    part = g.generate(MESSAGES[:2], p, sample_indices=[[3, 1], []])
    assert texts(part) == [[full[0][3].text, full[0][1].text], []]


def test_seed_determinism(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    p = SamplingParams(n=2, temperature=0.8, max_new_tokens=12, seed=11)
    torch.manual_seed(123)  # the global RNG plays no part
    a = texts(g.generate(MESSAGES, p))
    torch.manual_seed(999)
    assert texts(g.generate(MESSAGES, p)) == a
    assert texts(g.generate(MESSAGES, dataclasses.replace(p, seed=12))) != a


def test_top_p_tiny_is_greedy(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    greedy = texts(g.generate(MESSAGES, SamplingParams(n=1, temperature=0, max_new_tokens=10)))
    nucleus = texts(g.generate(MESSAGES, SamplingParams(n=2, temperature=1.0, top_p=1e-9, max_new_tokens=10)))
    assert [[t[0], t[0]] for t in greedy] == nucleus


def test_stop_strings_cut_the_completion(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=30, seed=5)
    free = g.generate(MESSAGES[:1], p)[0][0].text
    assert len(free) > 12
    stop = free[6:9]
    cut = g.generate(MESSAGES[:1], dataclasses.replace(p, stop=(stop, "\x00never")))[0][0]
    assert cut.text == free[:free.find(stop)]
    assert cut.finish_reason == "stop" and cut.n_tokens < 30


def test_length_and_eos_finish_reasons(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    r = g.generate(MESSAGES[:2], SamplingParams(n=2, temperature=1.0, max_new_tokens=7))
    assert all(c.finish_reason == "length" and c.n_tokens == 7 for x in r for c in x)
    eos = tok.eos_token_id
    head = model.get_output_embeddings()

    def force_eos(_mod, _inp, out):
        out = out.clone()
        out[..., eos] += 1e4
        return out

    h = head.register_forward_hook(force_eos)
    try:
        r = g.generate(MESSAGES[:2], SamplingParams(n=2, temperature=0.8, max_new_tokens=7))
    finally:
        h.remove()
    assert all(c.finish_reason == "stop" and c.n_tokens == 1 and c.text == "" for x in r for c in x)


def test_train_mode_is_restored(model_and_tok):
    model, tok = model_and_tok
    g = gen(model, tok)
    p = SamplingParams(n=1, temperature=0, max_new_tokens=3)
    model.train()
    frozen = next(m for m in model.modules() if m is not model and list(m.parameters()))
    frozen.eval()  # a part kept in eval mode while the rest trains stays so
    try:
        g.generate(MESSAGES[:1], p)
        assert model.training and not frozen.training
        assert sum(m.training for m in model.modules()) == len(list(model.modules())) - len(list(frozen.modules()))
    finally:
        model.eval()
    g.generate(MESSAGES[:1], p)
    assert not model.training


def test_out_of_memory_halves_the_batch(bpe_tokenizer):
    model = tiny_gpt2(bpe_tokenizer, seed=2)
    g = gen(model, bpe_tokenizer, batch_size=8)
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1)
    expected = texts(gen(model, bpe_tokenizer, batch_size=1).generate(MESSAGES, p))
    real_forward = model.forward
    seen = []

    def limited(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > 2 and kwargs["input_ids"].shape[1] > 1:  # a prefill of more than 2 prompts "does not fit"
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    model.forward = limited
    try:
        got = texts(g.generate(MESSAGES, p))
    finally:
        del model.forward
    assert got == expected
    assert g.batch_size == 2 and g.error_count == 2 and g.chunk_prompts == 8
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
            g.generate(MESSAGES, p)
    finally:
        del model.forward


def test_inverse_cdf_sampling_is_exact():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.0]])).repeat(1000, 1)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    counts = torch.bincount(sample_tokens(logits, u, 1.0, 1.0), minlength=4).tolist()
    assert counts == [200, 500, 300, 0]  # never the zero-probability token
    counts = torch.bincount(sample_tokens(logits, u, 1.0, 0.6), minlength=4).tolist()
    assert counts == [0, 625, 375, 0]  # nucleus {0.5, 0.3}, renormalised
    assert sample_tokens(logits[:2], u[:2], 0.0, 1.0).tolist() == [1, 1]
    # u at the very top of [0, 1) still picks the last token with probability, never a zero-probability one
    top = torch.tensor([1 - 2.0 ** -53], dtype=torch.float64)
    assert sample_tokens(logits[:1], top, 1.0, 1.0).tolist() == [2]
    assert sample_tokens(logits[:1], top, 1.0, 0.6).tolist() == [2]


# -- ROUGE-L and the diversity filter -----------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "7", "The", "answer", "is", "(C).", "x+y", "É"]), max_size=30),
       st.lists(st.sampled_from(["a", "b", "7", "The", "answer", "is", "(C).", "x+y", "É"]), max_size=30))
def test_rouge_l_equals_rouge_score(a, b):
    from rouge_score import rouge_scorer

    s1, s2 = " ".join(a), " ".join(b)
    ref = rouge_scorer.RougeScorer(["rougeL"]).score(s1, s2)["rougeL"].fmeasure
    assert rouge_l_f1(s1, s2) == pytest.approx(ref, abs=1e-12)


def test_lcs_against_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
        assert lcs_length(a, b) == dp[-1][-1]


def test_diversity_keep_is_greedy_in_order():
    base = "first add 3 and 4 to get 7 so the answer is 7"
    near = "first add 3 and 4 to get 7 thus the answer is 7"
    other = "three plus four equals seven"
    assert rouge_l_f1(base, near) > 0.8 and rouge_l_f1(base, other) < 0.8
    assert diversity_keep([base, near, other, near], 0.8) == [True, False, True, False]
    assert diversity_keep([near, other], 0.8, already_kept=[base]) == [False, True]
    assert diversity_keep([base, base], 1.0) == [True, True]  # F1 = 1.0 does not exceed 1.0


# -- the stage ----------------------------------------------------------------------------------------------------

class ScriptedGenerator:
    """A generator whose sample i of a message is `script(message, i)`; counts calls; may fail on demand."""

    def __init__(self, script, *, fail_after_calls: int | None = None, indexed: bool = True):
        self.model_id, self.revision = "scripted", "v1"
        self.script = script
        self.calls = 0
        self.asked: list[tuple[str, int]] = []
        self.fail_after_calls = fail_after_calls
        self.chunk_prompts = 2
        if not indexed:
            self.generate = self._generate_all  # type: ignore[method-assign]

    def generate(self, prompts, params, sample_indices=None):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise GenerationFailed("endpoint down", partial=[[self._c(prompts[0], i) for i in sample_indices[0]]])
        self.calls += 1
        sample_indices = sample_indices or [range(params.n)] * len(prompts)
        self.asked += [(m, i) for m, idx in zip(prompts, sample_indices) for i in idx]
        return [[self._c(m, i) for i in idx] for m, idx in zip(prompts, sample_indices)]

    def _generate_all(self, prompts, params):
        self.calls += 1
        return [[self._c(m, i) for i in range(params.n)] for m in prompts]

    def _c(self, m, i):
        text = self.script(m, i)
        return Completion(text=text, n_tokens=len(text.split()), finish_reason="stop", prompt_tokens=10)


def answer_script(m: str, i: int) -> str:
    a, b = [int(x) for x in m.split("What is ")[1].split("?")[0].split(" + ")]
    ans = a + b if i % 2 == 0 else a + b + 1
    return f"We add {a} and {b} in way number {i} with {'many ' * i}words. The answer is {ans}."


def test_stage_samples_grades_and_never_repeats_work(tmp_path):
    qs = add_questions(5)
    p = SamplingParams(n=3, temperature=0.8, max_new_tokens=32, seed=0)
    g = ScriptedGenerator(answer_script)
    with TraceStore(tmp_path / "t.sqlite") as store:
        r = sample_to_store(g, AddTask(), qs, p, store, role="teacher", source="teacher", progress=False)
        assert (r.requested, r.existing, r.sampled, r.failed_prompts) == (15, 0, 15, 0)
        assert g.calls == 3  # chunks of 2 questions
        ts = store.traces()
        assert [(t.question_id, t.sample_index) for t in ts] == [(q.id, i) for q in qs for i in range(3)]
        assert [t.verdict for t in ts[:3]] == ["correct", "wrong", "correct"]
        assert ts[1].answer == str(int(qs[0].gold) + 1)
        assert "n" not in ts[0].params and ts[0].params["temperature"] == 0.8
        assert ts[0].prompt == AddTask().user_message(qs[0]) and ts[0].role == "teacher" and ts[0].seed == 0
        assert r.completion_tokens == sum(t.n_tokens for t in ts) and r.prompt_tokens == 50
        r2 = sample_to_store(g, AddTask(), qs, p, store, role="teacher", source="teacher", progress=False)
        assert (r2.existing, r2.sampled) == (15, 0) and g.calls == 3  # zero calls the second time
        # k = 3 -> 5 samples only indices 3 and 4
        g.asked.clear()
        r3 = sample_to_store(g, AddTask(), qs, dataclasses.replace(p, n=5), store, role="teacher",
                             source="teacher", progress=False)
        assert r3.sampled == 10 and sorted({i for _, i in g.asked}) == [3, 4]
        assert len(store) == 25
        st = store.stats()
        assert st["runs"]["teacher/teacher"]["calls"] == 2  # the no-op run is not recorded


def test_stage_works_with_generators_without_sample_indices(tmp_path):
    qs = add_questions(3)
    p = SamplingParams(n=2, max_new_tokens=8)
    with TraceStore(tmp_path / "a.sqlite") as a, TraceStore(tmp_path / "b.sqlite") as b:
        sample_to_store(ScriptedGenerator(answer_script), AddTask(), qs, p, a, role="student", source="initial",
                        progress=False)
        sample_to_store(ScriptedGenerator(answer_script, indexed=False), AddTask(), qs, p, b, role="student",
                        source="initial", progress=False)
        assert comparable(a.traces()) == comparable(b.traces())


def test_diversity_filter_marks_near_duplicates_deterministically(tmp_path):
    def script(m, i):
        if i in (0, 1, 3):  # near-identical correct traces; 3 is also near 0
            return f"We add the two numbers carefully step {'one' if i != 1 else 'uno'} here. The answer is 1."
        if i == 2:
            return "Something else entirely, a wrong route. The answer is 99."
        return "Another wrong route that looks like the other. The answer is 98."

    qs = [add_questions(1)[0]]
    qs = [dataclasses.replace(qs[0], gold="1")]
    p = SamplingParams(n=5)
    with TraceStore(tmp_path / "t.sqlite") as s:
        r = sample_to_store(ScriptedGenerator(script), AddTask(), qs, p, s, role="teacher", source="teacher",
                            rouge_threshold=0.8, progress=False)
        kept = [t.kept for t in s.traces()]
        assert kept == [True, False, True, False, True]  # 4 is wrong like 2 but not near it
        assert r.dropped == 2 and s.stats()["groups"]["teacher/teacher"]["dropped_by_diversity"] == 2
    # Resumed in two steps (n=2 then n=5) gives the same flags as one run.
    with TraceStore(tmp_path / "u.sqlite") as u:
        sample_to_store(ScriptedGenerator(script), AddTask(), qs, dataclasses.replace(p, n=2), u, role="teacher",
                        source="teacher", rouge_threshold=0.8, progress=False)
        sample_to_store(ScriptedGenerator(script), AddTask(), qs, p, u, role="teacher", source="teacher",
                        rouge_threshold=0.8, progress=False)
        assert [t.kept for t in u.traces()] == kept
    # Students are never filtered.
    with TraceStore(tmp_path / "v.sqlite") as v:
        sample_to_store(ScriptedGenerator(script), AddTask(), qs, p, v, role="student", source="initial",
                        rouge_threshold=0.8, progress=False)
        assert all(t.kept for t in v.traces())


def test_backend_failure_keeps_work_and_says_how_to_resume(tmp_path):
    qs = add_questions(6)
    p = SamplingParams(n=2)
    with TraceStore(tmp_path / "t.sqlite") as s:
        with pytest.raises(SamplingAborted) as ei:
            sample_to_store(ScriptedGenerator(answer_script, fail_after_calls=1), AddTask(), qs, p, s,
                            role="teacher", source="teacher", progress=False)
        msg = str(ei.value)
        assert "endpoint down" in msg and "Run the same command again" in msg
        # chunk 1 (2 questions) fully, plus the partial result of the failing chunk's first prompt
        assert len(s) == 6 and ei.value.report.failed_prompts == 1
        assert s.stats()["runs"]["teacher/teacher"]["aborted_calls"] == 1
        r = sample_to_store(ScriptedGenerator(answer_script), AddTask(), qs, p, s, role="teacher",
                            source="teacher", progress=False)
        assert (r.existing, r.sampled) == (6, 6)


def test_stage_rejects_bad_role_and_source(tmp_path):
    with TraceStore(tmp_path / "t.sqlite") as s:
        for role, source in (("teach", "teacher"), ("student", "epoch:x"), ("student", "final")):
            with pytest.raises(ValueError, match="role|source"):
                sample_to_store(ScriptedGenerator(answer_script), AddTask(), add_questions(1), SamplingParams(n=1),
                                s, role=role, source=source, progress=False)


def test_stage_with_hf_generator_end_to_end(tmp_path, unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, seed=3)
    g = HFGenerator(model, unigram_tokenizer, model_id="tiny-llama", revision="r", template="plain", batch_size=3)
    qs = add_questions(7)
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1)
    with TraceStore(tmp_path / "t.sqlite") as s:
        r = sample_to_store(g, AddTask(), qs, p, s, role="student", source="epoch:2", checkpoint="ck/2",
                            progress=True)
        ts = s.traces(source="epoch:2")
    assert r.sampled == 14 and len(ts) == 14 and all(t.checkpoint == "ck/2" for t in ts)
    assert r.completion_tokens == sum(t.n_tokens for t in ts) == 140
    assert {t.verdict for t in ts} <= {"correct", "wrong", "unparsed"}


def test_cpu_decoding_runs_under_thread_invariant_attention(model_and_tok):
    """Every forward of a CPU decode runs with only the math attention backend, whose sums do not depend on the
    number of torch threads, so traces do not depend on how busy the machine is (the fused CPU kernel splits the
    key length across threads for one query token and changed a demo trace in 1 of 2048)."""
    model, tok = model_and_tok
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.flash_sdp_enabled()
                                                                  or torch.backends.cuda.mem_efficient_sdp_enabled()))
    try:
        gen = HFGenerator(model, tok, model_id="m", revision="r", template="plain")
        gen.generate(["1+2=", "3+4="], SamplingParams(n=2, temperature=0.8, max_new_tokens=4, seed=0))
    finally:
        hook.remove()
    assert seen and not any(seen)  # the fused backends were off during every forward of the decode
    assert torch.backends.cuda.flash_sdp_enabled()  # and are back on afterwards
