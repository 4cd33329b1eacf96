"""A cascade stage on any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama).

An API stage has no hidden states, so it routes on P(T) alone: one generated token with its top-k
log-probabilities gives the option-letter scores. Letters outside the top k get -inf (softmax
over the letters then renormalises over those the endpoint did return).

The API key is read only from the environment variable the preset names, kept out of every repr,
and scrubbed from any error text (some servers echo the Authorization header back).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx
import numpy as np

from cascade_core.types import MAX_OPTIONS, OPTION_LETTERS, Generation, OptionScores

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
RETRYABLE_ERRORS = (httpx.TransportError,)  # connect/read/write/pool errors and every timeout
MAX_RETRY_AFTER_S = 20.0
MAX_ERROR_BODY_CHARS = 300


class EndpointError(RuntimeError):
    """The endpoint could not give a usable answer; the message says why (never the key)."""


class _Secret:
    """Holds the API key so that no repr, vars() dump or traceback local shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<none>"

    __str__ = __repr__


def read_api_key(api_key_env: str | None) -> str | None:
    """The key from the named variable; a named but unset (or empty) variable is an error."""
    if api_key_env is None:
        return None
    value = os.environ.get(api_key_env, "")
    if not value.strip():
        raise EndpointError(
            f"environment variable {api_key_env} is not set: export the API key there "
            "(the preset names the variable; the key itself never goes in a file)"
        )
    return value.strip()


def letter_logprobs(top: Sequence[tuple[str, float]], n_options: int) -> np.ndarray:
    """Top (token, logprob) pairs -> one logprob per option letter, -inf where absent.

    A token counts for a letter when it equals the letter once whitespace is stripped (" A",
    "A", "A\\n"); the best of several such tokens wins.
    """
    if not 1 <= n_options <= MAX_OPTIONS:
        raise ValueError(f"n_options must be in 1..{MAX_OPTIONS}, got {n_options}")
    letters = OPTION_LETTERS[:n_options]
    scores = np.full(n_options, -np.inf, dtype=np.float64)
    for token, logprob in top:
        key = str(token).strip()
        if len(key) == 1 and key in letters and logprob is not None and math.isfinite(float(logprob)):
            i = letters.index(key)
            scores[i] = max(scores[i], float(logprob))
    return scores


def _top_pairs(item: Any) -> list[tuple[str, float]]:
    """One position's alternatives in either shape: [{token, logprob}, ...] or {token: logprob}."""
    if isinstance(item, dict):
        return [(str(t), float(lp)) for t, lp in item.items() if lp is not None]
    if isinstance(item, list):
        return [(str(e.get("token", "")), float(e["logprob"])) for e in item
                if isinstance(e, dict) and e.get("logprob") is not None]
    return []


def _positions(choice: dict) -> list[tuple[tuple[str, float] | None, list[tuple[str, float]]]]:
    """Per generated token: (chosen token, logprob) and its top alternatives.

    Accepts the chat shape (`logprobs.content[i]`) and the legacy completions shape
    (`logprobs.tokens`, `token_logprobs`, `top_logprobs`), whichever mode the server answered in.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    content = logprobs.get("content")
    if isinstance(content, list):
        out = []
        for entry in content:
            if not isinstance(entry, dict):
                continue
            chosen = None
            if entry.get("logprob") is not None:
                chosen = (str(entry.get("token", "")), float(entry["logprob"]))
            out.append((chosen, _top_pairs(entry.get("top_logprobs") or [])))
        return out
    tokens = logprobs.get("tokens") or []
    token_lps = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i in range(max(len(tokens), len(token_lps), len(tops))):
        chosen = None
        if i < len(tokens) and i < len(token_lps) and token_lps[i] is not None:
            chosen = (str(tokens[i]), float(token_lps[i]))
        out.append((chosen, _top_pairs(tops[i]) if i < len(tops) and tops[i] else []))
    return out


class OpenAIStage:
    """A Backend on an OpenAI-compatible HTTP endpoint, P(T) from top-k token log-probabilities.

    `mode="chat"` posts to `{api_base}/chat/completions` (the prompt as one user message),
    `mode="completions"` to `{api_base}/completions` (the raw prompt), for multiple choice;
    free-form answers always use the chat endpoint (the model's chat template, end of turn).
    Requests are greedy (temperature 0). Transport errors, timeouts, 429 and 5xx are retried
    with exponential backoff and jitter; other 4xx fail at once. `score_options` over many prompts runs `concurrency`
    requests in parallel.
    """

    has_hidden_states = False

    def __init__(
        self,
        model: str,
        api_base: str,
        *,
        api_key_env: str | None = None,
        mode: str = "chat",
        timeout_s: float = 30.0,
        max_retries: int = 2,
        concurrency: int = 4,
        price_in: float = 0.0,
        price_out: float = 0.0,
        top_logprobs: int = 20,
        system_prompt: str | None = None,
        total_params: int = 0,
        non_embedding_params: int = 0,
        backoff_s: float = 0.5,
    ):
        if not model:
            raise ValueError("model must be a non-empty model name")
        if not isinstance(api_base, str) or not api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base must be an http(s) URL such as http://127.0.0.1:8000/v1, got {api_base!r}")
        if mode not in ("chat", "completions"):
            raise ValueError(f"mode must be 'chat' or 'completions', got {mode!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0 or concurrency < 1 or top_logprobs < 1 or backoff_s < 0:
            raise ValueError("max_retries >= 0, concurrency >= 1, top_logprobs >= 1 and backoff_s >= 0 are required")
        if price_in < 0 or price_out < 0:
            raise ValueError("prices must be >= 0 (dollars per million tokens)")
        self.model = model
        self.model_id = model
        self.api_base = api_base.rstrip("/")
        self.api_key_env = api_key_env
        self._key = _Secret(read_api_key(api_key_env))
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.price_in = float(price_in)
        self.price_out = float(price_out)
        self.top_logprobs = int(top_logprobs)
        self.system_prompt = system_prompt
        self.total_params = int(total_params)
        self.non_embedding_params = int(non_embedding_params)
        self.backoff_s = float(backoff_s)
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "OpenAIStage":
        """Build from a preset's StageConfig (backend = "openai")."""
        if not config.api_base:
            raise ValueError(f"stage {config.name!r} needs api_base")
        return cls(
            model=config.model,
            api_base=config.api_base,
            api_key_env=config.api_key_env,
            mode=config.api_mode,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            concurrency=config.concurrency,
            price_in=config.price_in,
            price_out=config.price_out,
        )

    def __repr__(self) -> str:
        return (f"OpenAIStage(model={self.model!r}, api_base={self.redact(self.api_base)!r}, mode={self.mode!r}, "
                f"api_key_env={self.api_key_env!r})")

    # ---- HTTP ------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """`text` with the API key (if any) replaced, for every message that leaves this object."""
        key = self._key.reveal()
        return text.replace(key, "***") if key else text

    def _http(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                headers = {"Content-Type": "application/json"}
                key = self._key.reveal()
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout_s),
                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                    headers=headers,
                    follow_redirects=False,
                )
            return self._client

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> "OpenAIStage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                wait = float(retry_after)
            except ValueError:
                wait = -1.0
            if 0 <= wait <= MAX_RETRY_AFTER_S:
                return wait
        base = self.backoff_s * (2 ** attempt)
        return base + random.uniform(0, base)

    def _post(self, path: str, payload: dict) -> dict:
        """POST with retries; the parsed JSON body, or EndpointError naming what went wrong."""
        url = f"{self.api_base}{path}"
        shown_url = self.redact(url)
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._http().post(url, json=payload)
            except RETRYABLE_ERRORS as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise EndpointError(f"{shown_url} answered 200 with a body that is not JSON") from None
                body = self.redact(response.text[:MAX_ERROR_BODY_CHARS].strip())
                last = f"HTTP {response.status_code}" + (f": {body}" if body else "")
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError(f"{shown_url} failed: {last}")
                retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                wait = self._backoff(attempt, retry_after)
                log.warning("%s: %s; retry %d/%d in %.2f s", shown_url, self.redact(last), attempt + 1,
                            self.max_retries, wait)
                time.sleep(wait)
        raise EndpointError(f"{shown_url} failed after {self.max_retries + 1} attempt(s): {self.redact(last)}")

    def _request(self, prompt: str, max_tokens: int, top_k: int, mode: str | None = None) -> dict:
        if (mode or self.mode) == "chat":
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "logprobs": True, "top_logprobs": top_k}
            return self._post("/chat/completions", payload)
        payload = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "logprobs": top_k}
        return self._post("/completions", payload)

    @staticmethod
    def _first_choice(body: dict) -> dict:
        choices = body.get("choices") if isinstance(body, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise EndpointError("endpoint answer has no choices")
        return choices[0]

    @staticmethod
    def _usage(body: dict) -> tuple[int, int]:
        usage = body.get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

    # ---- Backend ---------------------------------------------------------------------------

    def _score_one(self, prompt: str, n_options: int) -> OptionScores:
        started = time.perf_counter()
        body = self._request(prompt, max_tokens=1, top_k=self.top_logprobs)
        positions = _positions(self._first_choice(body))
        if not positions or (positions[0][0] is None and not positions[0][1]):
            raise EndpointError("endpoint returned no logprobs (does this server support logprobs/top_logprobs?)")
        chosen, top = positions[0]
        candidates = top + ([chosen] if chosen and chosen[0] not in {t for t, _ in top} else [])
        scores = letter_logprobs(candidates, n_options)
        if not np.isfinite(scores).any():
            seen = ", ".join(repr(t) for t, _ in candidates[:8])
            raise EndpointError(
                f"none of the top {len(candidates)} tokens is an option letter "
                f"{OPTION_LETTERS[0]}-{OPTION_LETTERS[n_options - 1]} (got {seen})"
            )
        prompt_tokens, output_tokens = self._usage(body)
        return OptionScores(letter_logits=scores, hidden_states=None, prompt_tokens=prompt_tokens,
                            output_tokens=output_tokens, seconds=time.perf_counter() - started)

    def score_options(
        self,
        prompts: Sequence[str],
        n_options: Sequence[int],
        layers: Sequence[int] | None = None,
    ) -> list[OptionScores]:
        """One greedy token per prompt -> option-letter log-probabilities (no hidden states)."""
        prompts, n_options = list(prompts), [int(n) for n in n_options]
        if len(prompts) != len(n_options):
            raise ValueError(f"{len(prompts)} prompts but {len(n_options)} option counts")
        for n in n_options:
            if not 1 <= n <= MAX_OPTIONS:
                raise ValueError(f"n_options must be in 1..{MAX_OPTIONS}, got {n}")
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._score_one(p, n) for p, n in zip(prompts, n_options)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._score_one, prompts, n_options))

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Generation:
        """A greedy answer and the log-probability of each generated token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()
        # Always the chat endpoint: the server applies the model's chat template, so an instruct
        # model answers and ends its turn (a raw free-form prompt made SmolLM2 end it at once),
        # as the local backend's free-form generation does. `mode` applies to multiple choice.
        body = self._request(prompt, max_tokens=int(max_new_tokens), top_k=1, mode="chat")
        choice = self._first_choice(body)
        text = ((choice.get("message") or {}).get("content")) or ""
        chosen_tokens = [chosen for chosen, _top in _positions(choice) if chosen is not None]
        logprobs = [lp for _token, lp in chosen_tokens]
        prompt_tokens, output_tokens = self._usage(body)
        if not logprobs and (text or output_tokens):
            raise EndpointError("endpoint returned no logprobs (does this server support logprobs?)")
        finish = str(choice.get("finish_reason") or "stop")
        return Generation(text=text, token_logprobs=np.asarray(logprobs, dtype=np.float64),
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens or len(logprobs),
                          seconds=time.perf_counter() - started, tokens=tuple(t for t, _lp in chosen_tokens),
                          finish_reason=finish if finish in ("stop", "length") else "stop")
