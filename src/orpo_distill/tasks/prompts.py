"""Wrapping a task's user message into a model's own prompt: its chat template, or a plain one for base models.

Teacher and student each format their own prompt (they may use different templates); `render_prompt` is the one
function both the samplers and the pair tokeniser call, so a student is trained on exactly the prompt it is
sampled and evaluated with.
"""

from __future__ import annotations

# The plain template for base models. It ends in a newline so that the completion starts a fresh token
# (no tokenizer merges the prompt's last characters with the completion's first).
PLAIN_TEMPLATE = "Question: {message}\nAnswer:\n"


def uses_chat_template(tokenizer, template: str = "auto") -> bool:
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template: chat was asked for, but this tokenizer has no chat template")
        return True
    if template == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, message: str, template: str = "auto", system_prompt: str | None = None) -> str:
    """The full prompt text for `message` (generation prompt included for chat templates)."""
    if not uses_chat_template(tokenizer, template):
        return PLAIN_TEMPLATE.format(message=message)
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": message}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def chat_messages(message: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The OpenAI-style message list for a chat endpoint."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": message}]
