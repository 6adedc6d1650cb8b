"""A model's own prompt format: wrapping a task's user message into its chat template (or a plain one for base
models), tokenising that prompt, and how the model ends an answer.

Teacher and student each format their own prompt (they may use different templates). `render_prompt` and
`encode_prompt` are the one pair of functions that the samplers, the pair tokeniser (training) and evaluation
call, so a student is trained on exactly the prompt tokens it is sampled and evaluated with. `completion_end_ids`
is how the model ends an assistant turn, read from its chat template (`<|im_end|>`, Gemma's `<end_of_turn>`, ...;
the EOS token for the plain template): training appends it to every completion and sampling stops at it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# The plain template for base models. It ends in a newline so that the completion starts a fresh token
# (no tokenizer merges the prompt's last characters with the completion's first).
PLAIN_TEMPLATE = "Question: {message}\nAnswer:\n"

# A stand-in assistant answer, rendered through the chat template to see what the template writes after it.
_SENTINEL = "ORPOdistillSENTINEL7f3a"


def uses_chat_template(tokenizer, template: str = "auto") -> bool:
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template: chat was asked for, but this tokenizer has no chat template")
        return True
    if template == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, message: str, template: str = "auto", system_prompt: str | None = None) -> str:
    """The full prompt text for `message` (generation prompt included for chat templates).

    With the plain template a `system_prompt` is written before the question, separated by a blank line: that is
    where a base model gets its instructions or worked examples (few-shot), which it needs to answer in the task's
    format at all (chat templates put it in their system turn instead)."""
    if not uses_chat_template(tokenizer, template):
        if system_prompt:
            return system_prompt.rstrip("\n") + "\n\n" + PLAIN_TEMPLATE.format(message=message)
        return PLAIN_TEMPLATE.format(message=message)
    return tokenizer.apply_chat_template(chat_messages(message, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def chat_messages(message: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The OpenAI-style message list for a chat endpoint."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": message}]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: the tokenizer's own leading special tokens (BOS) exactly once, nothing after.

    The tokenizer adds its special tokens as it always does (Llama-style tokenizers prepend BOS, GPT-2-style ones
    add nothing); what it prepends is dropped when the text already starts with it (a chat template that writes
    BOS itself), and whatever a post-processor appends after the text (an EOS, as `$A </s>` templates do) is
    dropped, because a prompt must not end the sequence. The one function for training, sampling and evaluation.
    """
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    n = len(plain)
    start = next((k for k in range(len(full) - n + 1) if full[k:k + n] == plain), None) if n else None
    if start is None:  # the special tokens are not simply around the text: keep the tokenizer's ids, tidy the ends
        ids, prefix = full, []
    else:
        ids, prefix = plain, full[:start]
    if prefix and ids[:len(prefix)] == prefix:  # the text wrote them itself: not twice
        prefix = []
    ids = prefix + ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if start is None and eos is not None and eos != bos and ids and ids[-1] == eos and eos not in plain[-1:]:
        ids = ids[:-1]
    return ids


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _chat_turn_end(tokenizer, template: str, system_prompt: str | None) -> list[int] | None:
    """What the chat template writes after an assistant answer, up to and including its first special token
    (None: plain template, or no special token there)."""
    if not uses_chat_template(tokenizer, template):
        return None
    msgs = chat_messages("Hi", system_prompt) + [{"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - a template that cannot render an answer: say so, use EOS
        log.warning("the chat template cannot render an assistant message (%s); answers end with EOS", e)
        return None
    at = text.rfind(_SENTINEL)
    if at < 0:
        log.warning("the chat template drops the assistant's content; answers end with EOS")
        return None
    tail = text[at + len(_SENTINEL):].strip()
    ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    special = _special_ids(tokenizer)
    first = next((k for k, t in enumerate(ids) if t in special), None)
    return ids[:first + 1] if first is not None else None


def completion_end_ids(tokenizer, template: str = "auto", system_prompt: str | None = None) -> list[int]:
    """The token ids that end an assistant answer in this model's format (what training appends to a completion).

    Plain template: the EOS token. Chat template: what the template writes after an assistant message's content
    (found by rendering a conversation whose answer is a sentinel), up to and including its first special token,
    so ChatML gives `<|im_end|>` and Gemma `<end_of_turn>` (not the newline the template puts after it, which
    the model never generates because sampling stops at the end-of-turn token). Falls back to EOS when the
    template writes no special token there.
    """
    end = _chat_turn_end(tokenizer, template, system_prompt)
    if end is not None:
        return end
    if tokenizer.eos_token_id is None:
        raise ValueError("the student's tokenizer has no EOS token; a completion could never end")
    return [tokenizer.eos_token_id]


def end_of_turn_ids(tokenizer, template: str = "auto", system_prompt: str | None = None) -> set[int]:
    """The token ids a sampler stops at for this format: the special token that ends an answer, and EOS."""
    ids = set(_chat_turn_end(tokenizer, template, system_prompt) or [])
    ids &= _special_ids(tokenizer)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
