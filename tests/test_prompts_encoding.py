"""One prompt encoder for training, sampling and evaluation, and the end of an answer taken from the chat template.

Tokenizers built here in a second: Llama-style unigram tokenizers whose post-processor appends EOS (`$A </s>`)
or wraps the text (`<s> $A </s>`), a ChatML tokenizer whose EOS is not `<|im_end|>`, and a Gemma-style one."""

from __future__ import annotations

import copy

import pytest
from conftest import CORPUS, tiny_llama

from orpo_distill.pairs import Encoder, Example, Text, collate
from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.hf import HFGenerator
from orpo_distill.tasks.prompts import completion_end_ids, encode_prompt, end_of_turn_ids, render_prompt

MSG = "Tom has 3 apples and buys 4 more. How many apples does he have?"
COMPLETION = "3 + 4 = 7. The answer is 7."

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _unigram(single: str, extra_special: list[str] | None = None, bos="<s>", eos="</s>"):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", bos, eos, "<unk>"] + (extra_special or [])
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials,
                                                           unk_token="<unk>"))
    if single:
        tk.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, tk.token_to_id(t)) for t in (bos, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=extra_special or None)


@pytest.fixture(scope="module")
def eos_appending():
    return _unigram("$A </s>")


@pytest.fixture(scope="module")
def wrapping():
    return _unigram("<s> $A </s>")


@pytest.fixture(scope="module")
def chatml():
    """ChatML turns, but EOS is `</s>` (as in many fine-tunes whose tokenizer keeps the base model's EOS)."""
    tok = _unigram("", ["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def gemma():
    tok = _unigram("<bos> $A", ["<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>")
    tok.chat_template = GEMMA
    return tok


def _sampled_prompt_ids(tok, template: str, message: str) -> list[int]:
    """The prompt ids the transformers sampler actually feeds the model (captured at its first forward)."""
    model = tiny_llama(tok, hidden=16, layers=1)
    seen: list[list[int]] = []

    def grab(_mod, _args, kwargs):
        if not seen:
            ids, am = kwargs["input_ids"][0], kwargs["attention_mask"][0]
            seen.append(ids[am.bool()].tolist())

    h = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        HFGenerator(model, tok, model_id="tiny", revision="r", template=template).generate(
            [message], SamplingParams(n=1, temperature=0, max_new_tokens=1))
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["eos_appending", "wrapping", "unigram_tokenizer", "bpe_tokenizer", "gemma"])
def test_training_and_sampling_prompt_ids_are_the_same(name, request):
    tok = request.getfixturevalue(name)
    template = "chat" if getattr(tok, "chat_template", None) else "plain"
    train_ids, _ = Encoder(tok, template=template).prompt("q", MSG)
    assert train_ids == _sampled_prompt_ids(tok, template, MSG)
    assert train_ids[-1] != tok.eos_token_id or tok.eos_token_id == tok.bos_token_id  # a prompt never ends the text
    bos = tok.bos_token_id
    with_bos = tok(MSG, add_special_tokens=True)["input_ids"][0] == bos and bos != tok.eos_token_id
    if with_bos or name == "gemma":  # the model uses a BOS: exactly one, first
        assert train_ids[0] == tok.bos_token_id and train_ids.count(tok.bos_token_id) == 1
    text = render_prompt(tok, MSG, template)
    assert tok.decode(train_ids, skip_special_tokens=False).replace(" ", "").endswith(text.replace(" ", "")[-10:])


def test_eos_appending_post_processor_gives_no_trailing_eos(eos_appending, wrapping):
    for tok in (eos_appending, wrapping):
        text = render_prompt(tok, MSG, "plain")
        assert tok(text)["input_ids"][-1] == tok.eos_token_id  # the trap
        ids = encode_prompt(tok, text)
        assert tok.eos_token_id not in ids
    assert encode_prompt(wrapping, render_prompt(wrapping, MSG, "plain"))[0] == wrapping.bos_token_id
    assert wrapping.bos_token_id not in encode_prompt(eos_appending, render_prompt(eos_appending, MSG, "plain"))


def test_template_that_writes_bos_and_tokenizer_that_adds_it_give_one(gemma):
    text = render_prompt(gemma, MSG, "chat")
    assert text.startswith("<bos>") and gemma(text)["input_ids"][:2] == [gemma.bos_token_id] * 2  # the trap
    ids = encode_prompt(gemma, text)
    assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1


@pytest.mark.parametrize("name,end", [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>")])
def test_training_sequence_ends_as_the_template_ends_an_assistant_turn(name, end, request):
    tok = request.getfixturevalue(name)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id != tok.eos_token_id
    assert completion_end_ids(tok) == [end_id]
    enc = Encoder(tok, template="chat")
    e = enc.encode(Example("q", Text("k", COMPLETION, "teacher"), Text("r", "5. The answer is 5.", "initial")), MSG)
    for comp in (e.chosen_ids, e.rejected_ids):
        assert comp[-1] == end_id and comp.count(end_id) == 1 and tok.eos_token_id not in comp
    # the whole training row is the template's rendering of the conversation, up to its end-of-turn token
    conv = tok.apply_chat_template([{"role": "user", "content": MSG}, {"role": "assistant", "content": COMPLETION}],
                                   tokenize=False)
    want = conv[: conv.rindex(end) + len(end)]
    row = e.prompt_ids + e.chosen_ids
    assert tok.decode(row, skip_special_tokens=False).replace(" ", "") == want.replace(" ", "")
    assert row[-1] == end_id and row[-2] != end_id
    batch = collate([e], tok.pad_token_id)
    assert batch["completion_mask"][0].sum().item() == len(e.chosen_ids)  # the end token is trained on
    # a completion that kept the end string is not given a second one
    assert enc.completion(Text("k2", COMPLETION + end, "teacher")) == e.chosen_ids


def test_plain_template_still_ends_with_eos(chatml, unigram_tokenizer):
    assert completion_end_ids(chatml, "plain") == [chatml.eos_token_id]
    assert completion_end_ids(unigram_tokenizer) == [unigram_tokenizer.eos_token_id]
    newline_only = copy.deepcopy(unigram_tokenizer)  # a template that writes no special token after an answer
    newline_only.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert completion_end_ids(newline_only) == [unigram_tokenizer.eos_token_id]


@pytest.mark.parametrize("name,end", [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>")])
def test_sampling_stops_at_the_end_of_turn_and_does_not_return_it(name, end, request):
    tok = request.getfixturevalue(name)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_of_turn_ids(tok) == {end_id, tok.eos_token_id}
    model = tiny_llama(tok, hidden=16, layers=1)
    model.generation_config.eos_token_id = tok.eos_token_id  # the model's own config knows only EOS
    g = HFGenerator(model, tok, model_id="tiny", revision="r", template="chat")
    state = {"calls": 0}

    def end_turn_third(_mod, _inp, out):  # two ordinary tokens, then the end of turn
        state["calls"] += 1
        out = out.clone()
        out[..., end_id if state["calls"] >= 3 else 10] += 1e4
        return out

    h = model.get_output_embeddings().register_forward_hook(end_turn_third)
    try:
        r = g.generate([MSG], SamplingParams(n=1, temperature=0, max_new_tokens=12))[0][0]
    finally:
        h.remove()
    assert r.finish_reason == "stop" and r.n_tokens == 3
    assert end not in r.text and r.text == tok.decode([10, 10])
