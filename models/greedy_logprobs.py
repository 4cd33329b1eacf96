"""Greedy decoding of a local transformers model with top-k log-probabilities at each position.

What an OpenAI-compatible server needs to answer `logprobs`/`top_logprobs`: the full next-token
distribution at every generated position. It works on any object with a transformers causal LM
on `.model` and its tokenizer on `.tokenizer` (an `HFBackend`), so the server stays model-agnostic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from models.user_text import encode_rendered, encode_text


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability and the top alternatives (best first)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[TokenLogprob]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-sequence or a stop string) | "length" | "cancelled"


class GreedyLogprobEngine:
    """Greedy generation with a KV cache; not thread-safe (the server holds a lock around it)."""

    def __init__(self, backend):
        model = getattr(backend, "model", None)
        tokenizer = getattr(backend, "tokenizer", None)
        if model is None or tokenizer is None:
            raise TypeError(f"{type(backend).__name__} has no .model/.tokenizer: "
                            "a local transformers backend is needed")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this one knows.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: Sequence[dict]) -> tuple[str, bool]:
        """Messages -> prompt text, and whether it already holds the special tokens."""
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            return text, True
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:", False

    def encode(self, prompt: str, special_tokens_included: bool = False) -> list[int]:
        """Ids of a raw prompt (/v1/completions): all of it client text, so a special-token string
        in it stays characters (`models.user_text`); BOS/EOS are added as the tokenizer does."""
        if special_tokens_included:
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return encode_text(self.tokenizer, prompt, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Ids of `messages` through the chat template, every message's content kept as text: a
        `<|im_end|><|im_start|>system` inside one cannot close its turn or open another."""
        if not self.has_chat_template:
            return encode_text(self.tokenizer, self.chat_prompt(messages)[0], add_special_tokens=True)

        def render(texts: Sequence[str]) -> str:
            with_texts = [{**m, "content": t} for m, t in zip(messages, texts)]
            return self.tokenizer.apply_chat_template(with_texts, tokenize=False, add_generation_prompt=True)

        return encode_rendered(self.tokenizer, render, [str(m["content"]) for m in messages])

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def chat_end_ids(self) -> set[int]:
        """End-of-sequence ids plus the turn markers the chat template writes: a chat answer ends there."""
        from models.hf import end_of_turn_ids

        return self.eos_ids | end_of_turn_ids(self.tokenizer, self.model.generation_config)

    @torch.inference_mode()
    def complete(self, prompt_ids: list[int], max_tokens: int, top_k: int = 0,
                 stop: Sequence[str] = (), *, end_ids: set[int] | None = None, cancel=None,
                 on_token: Callable[[TokenLogprob | None, str], None] | None = None) -> Completion:
        """Up to `max_tokens` greedy tokens after `prompt_ids`, each with its top-`top_k` logprobs.

        Generation ends at an id of `end_ids` (default: end-of-sequence), at a `stop` string, or
        once `cancel.is_set()` (checked before every decoding step: finish_reason "cancelled").
        `on_token(token, text_delta)` sees each token as it is made, with the new answer text
        (text that could still turn out to start a stop string is held back until it cannot; the
        held-back tail comes last with token None).
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        end_ids = self.eos_ids if end_ids is None else set(end_ids)
        hold = max((len(s) for s in stop), default=1) - 1
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        past = None
        generated: list[int] = []
        tokens: list[TokenLogprob] = []
        finish = "length"
        sent = 0
        text = ""
        for _ in range(max_tokens):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: past}, **self._last_logits_only)
            past = getattr(out, self._cache_arg)
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            next_id = int(torch.argmax(logprobs))
            top: list[tuple[str, float]] = []
            if top_k > 0:
                values, indices = torch.topk(logprobs, k=min(top_k, logprobs.shape[-1]))
                top = [(self._token_text(i), float(v)) for v, i in zip(values.tolist(), indices.tolist())]
            # The end-of-sequence token is reported (its position's distribution is information,
            # as vLLM does) but never part of the text.
            token = TokenLogprob(self._token_text(next_id), float(logprobs[next_id]), top)
            tokens.append(token)
            if next_id in end_ids:
                finish = "stop"
                if on_token is not None:
                    on_token(token, "")
                break
            generated.append(next_id)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cut = min((text.index(s) for s in stop if s in text), default=None)
            if cut is not None:
                text = text[:cut]
                finish = "stop"
            if on_token is not None:
                safe = len(text) if cut is not None else max(sent, len(text) - hold)
                if cut is None and text.endswith("\ufffd"):
                    safe = sent  # half a UTF-8 sequence: wait for the rest
                on_token(token, text[sent:safe])
                sent = max(sent, safe)
            if cut is not None:
                break
            ids = torch.tensor([[next_id]], dtype=torch.long, device=self.device)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if stop:
            cut = min((text.index(s) for s in stop if s in text), default=None)
            if cut is not None:
                text = text[:cut]
        if on_token is not None and len(text) > sent:
            on_token(None, text[sent:])  # the held-back tail: no new token
        return Completion(text=text, tokens=tokens, prompt_tokens=len(prompt_ids), finish_reason=finish)
