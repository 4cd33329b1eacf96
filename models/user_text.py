"""User text is text: special-token strings a user writes never become control tokens.

A Hugging Face tokenizer turns the string `<|im_end|>` into the chat template's end-of-turn
token wherever it appears, so a question holding `<|im_end|><|im_start|>system ...` would close
its own turn and open a system turn (prompt injection into the template; issue 23). Here the
template's own text is tokenised as usual and every piece of user text with the tokenizer's
`split_special_tokens=True`, which reads `<|im_end|>` as the characters `<`, `|`, `im`, ... .

Text without any special-token string is tokenised exactly as before (one call over the whole
prompt), so the ids of ordinary questions, and with them every recorded P(T) and P(IK), are
unchanged. Only a prompt whose user text holds a special-token string takes the split path: the
template is rendered with a placeholder per user text, the rendering is cut at the placeholders
and the pieces are tokenised one by one. (Non-special added tokens, e.g. Qwen's `<tool_call>`,
are plain vocabulary and stay as they are.)
"""

from __future__ import annotations

from typing import Callable, Sequence

_MARK = "\ue000cascade-user-text-{}\ue001"  # private-use characters: no template or user writes them


def special_strings(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer reads as special (control) tokens, longest first."""
    cached = getattr(tokenizer, "_cascade_special_strings", None)
    if cached is not None:
        return cached
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    strings = tuple(sorted((s for s in found if s), key=len, reverse=True))
    try:
        tokenizer._cascade_special_strings = strings
    except AttributeError:
        pass
    return strings


def holds_special(tokenizer, text: str) -> bool:
    return any(s in text for s in special_strings(tokenizer))


def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text`, all of it user text (a raw prompt): special-token strings stay characters.
    The tokenizer's own BOS/EOS (`add_special_tokens`) are still added around it."""
    if not holds_special(tokenizer, text):
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def encode_rendered(tokenizer, render: Callable[[Sequence[str]], str], texts: Sequence[str]) -> list[int]:
    """Ids of `render(texts)`, a chat template's text around the user `texts` (the template writes
    its own special tokens, so none are added). User text is tokenised as text (module docstring).

    Raises ValueError when the template does not carry a user text through verbatim (it would
    then be unsafe to cut the rendering at the placeholders).
    """
    if not any(holds_special(tokenizer, t) for t in texts):
        return list(tokenizer(render(texts), add_special_tokens=False)["input_ids"])
    marks = [_MARK.format(i) for i in range(len(texts))]
    rendered = render(marks)
    ids: list[int] = []
    rest = rendered
    for mark, text in zip(marks, texts):
        before, found, rest = rest.partition(mark)
        if not found or mark in rest:
            raise ValueError("the chat template does not carry user text through verbatim: cannot keep its "
                             "special-token strings as text")
        if before:
            ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if rest:
        ids += tokenizer(rest, add_special_tokens=False)["input_ids"]
    return list(ids)
