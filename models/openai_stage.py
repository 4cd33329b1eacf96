"""A cascade stage on any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama).

One generated token with its top-k log-probabilities gives the option-letter scores. A letter is
scored from the token " X" (leading space: the token the local backend reads after "Answer:")
when the endpoint returned it, else from the best other spelling ("X", "X\n"). Letters outside
the top k get -inf: softmax over the letters then renormalises over those the endpoint did
return, so P(T) can only be overestimated, by at most the missing letters' mass, each below the
k-th token's probability (`missing_letter_bound`).

Hidden states: an API has none, except a vLLM pooling server of the same model
(`hidden_api_base`, started by `python -m cascade_core vllm up`), whose `/v1/embeddings` returns
the prompt's last-token hidden state after the final norm: transformers' hidden state `n_layers`
(`hidden_layer`). Other layers cannot be had from vLLM's endpoints; asking for one is an error.

The API key is read only from the environment variable the preset names, kept out of every repr,
and scrubbed from any error text (some servers echo the Authorization header back).
"""

from __future__ import annotations

import json
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
    spaced = np.zeros(n_options, dtype=bool)
    for token, logprob in top:
        key = str(token).strip()
        if len(key) == 1 and key in letters and logprob is not None and math.isfinite(float(logprob)):
            i = letters.index(key)
            if str(token) == f" {key}":  # the local backend's letter token: it wins over other spellings
                scores[i] = float(logprob) if not spaced[i] else max(scores[i], float(logprob))
                spaced[i] = True
            elif not spaced[i]:
                scores[i] = max(scores[i], float(logprob))
    return scores


def missing_letter_bound(top: Sequence[tuple[str, float]], letter_scores: np.ndarray) -> float:
    """The most P(T) can be overestimated when letters are missing from the top k: each missing
    letter's probability is below the smallest returned one (exp of the k-th logprob), so the true
    P(T) is at least p * S / (S + m * exp(lp_k)) with S the returned letters' mass, m missing."""
    missing = int(np.sum(~np.isfinite(letter_scores)))
    if missing == 0 or not top:
        return 0.0
    found = letter_scores[np.isfinite(letter_scores)]
    mass = float(np.exp(found).sum())
    floor = float(np.exp(min(lp for _t, lp in top)))
    p = float(np.exp(found.max()) / mass)
    return p - p * mass / (mass + missing * floor)


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


def known_model_params(model: str) -> tuple[int, int]:
    """(total, non-embedding) parameters of a model an endpoint serves, when it is one of the
    packaged models and its folder is here (counted from the safetensors header, as the local
    backend counts: tied embeddings once, the input embedding and a separate output matrix left
    out); (0, 0) otherwise: FLOPs are then unknown (0) and the stage is costed in tokens/dollars."""
    try:
        from models.packaged import PACKAGED_MODELS, hf_folder, is_ready
    except ImportError:
        return 0, 0
    if model not in PACKAGED_MODELS or not is_ready(model):
        return 0, 0
    import json as _json
    import struct

    total = embedding = 0
    for path in sorted(hf_folder(model).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = _json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = int(np.prod(entry["shape"])) if entry["shape"] else 1
            total += count
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                embedding += count
    return total, total - embedding


class OpenAIStage:
    """A Backend on an OpenAI-compatible HTTP endpoint, P(T) from top-k token log-probabilities.

    `mode="chat"` posts to `{api_base}/chat/completions` (the prompt as one user message),
    `mode="completions"` to `{api_base}/completions` (the raw prompt), for multiple choice;
    free-form answers always use the chat endpoint (the model's chat template, end of turn).
    Requests are greedy (temperature 0). Transport errors, timeouts, 429 and 5xx are retried
    with exponential backoff and jitter; other 4xx fail at once. `score_options` over many prompts runs `concurrency`
    requests in parallel.
    """

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
        hidden_api_base: str | None = None,
        hidden_layer: int | None = None,
        letter_token_ids: bool = False,
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
        if hidden_api_base is not None:
            if not hidden_api_base.startswith(("http://", "https://")):
                raise ValueError(f"hidden_api_base must be an http(s) URL, got {hidden_api_base!r}")
            if hidden_layer is None or hidden_layer < 1:
                raise ValueError("hidden_api_base needs hidden_layer = the model's layer count (the last "
                                 "layer's index, the only one a vLLM pooling server returns)")
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
        self.hidden_api_base = hidden_api_base.rstrip("/") if hidden_api_base else None
        self.hidden_layer = int(hidden_layer) if hidden_layer is not None else None
        self.has_hidden_states = self.hidden_api_base is not None
        self.letter_token_ids = bool(letter_token_ids)
        self._letter_ids: list[int] | None = None
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "OpenAIStage":
        """Build from a preset's StageConfig (backend = "openai")."""
        if not config.api_base:
            raise ValueError(f"stage {config.name!r} needs api_base")
        total, non_embedding = known_model_params(config.model)
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
            total_params=total,
            non_embedding_params=non_embedding,
            hidden_api_base=getattr(config, "hidden_api_base", None),
            hidden_layer=config.probe_layer if getattr(config, "hidden_api_base", None) else None,
            letter_token_ids=getattr(config, "letter_token_ids", False),
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

    def _post(self, path: str, payload: dict, base: str | None = None) -> dict:
        """POST with retries; the parsed JSON body, or EndpointError naming what went wrong."""
        url = f"{base or self.api_base}{path}"
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

    def _server_letter_ids(self) -> list[int]:
        """The token id the model emits for each option letter after "Answer:", asked of vLLM's
        /tokenize the way the local backend finds it (`models.hf.letter_token_ids`): the one token
        that "Answer: X" adds to "Answer:". Cached; an error when a letter is not one token."""
        with self._client_lock:
            cached = self._letter_ids
        if cached is not None:
            return cached
        root = self.api_base[:-3] if self.api_base.endswith("/v1") else self.api_base

        def ids(text: str) -> list[int]:
            payload = {"model": self.model, "prompt": text, "add_special_tokens": False}
            body = self._post("/tokenize", payload, base=root)
            return [int(t) for t in body.get("tokens", [])]

        base = ids("Answer:")
        out = []
        for letter in OPTION_LETTERS:
            full = ids(f"Answer: {letter}")
            if len(full) != len(base) + 1 or full[:len(base)] != base:
                raise EndpointError(f"{self.model}: letter {letter} is not one token after 'Answer:' ({full}); "
                                    "set letter_token_ids = false to read the letters from the top-k")
            out.append(full[-1])
        with self._client_lock:
            self._letter_ids = out
        return out

    def _request(self, prompt: str, max_tokens: int, top_k: int, mode: str | None = None,
                 token_ids: Sequence[int] | None = None) -> dict:
        if (mode or self.mode) == "chat":
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "logprobs": True, "top_logprobs": top_k}
            return self._post("/chat/completions", payload)
        payload = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "logprobs": top_k}
        if token_ids:  # vLLM: the full-vocabulary logprob of exactly these tokens, whatever their rank
            payload["logprob_token_ids"] = list(token_ids)
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

    def _score_one(self, prompt: str, n_options: int, want_hidden: bool = False) -> OptionScores:
        started = time.perf_counter()
        exact = self.letter_token_ids and self.mode == "completions"
        token_ids = self._server_letter_ids()[:n_options] if exact else None
        body = self._request(prompt, max_tokens=1, top_k=len(token_ids) if exact else self.top_logprobs,
                             token_ids=token_ids)
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
        hidden = self._hidden_state(prompt) if want_hidden else None
        return OptionScores(letter_logits=scores, hidden_states=hidden, prompt_tokens=prompt_tokens,
                            output_tokens=output_tokens, seconds=time.perf_counter() - started)

    def _wanted_hidden(self, layers: Sequence[int] | None) -> bool:
        """Whether to fetch the hidden state: all layers (None) or the last one asked for; any
        other layer is an error naming why (vLLM returns only the model's output)."""
        if not self.has_hidden_states or (layers is not None and len(layers) == 0):
            return False
        if layers is None:
            return True
        other = sorted({int(layer) for layer in layers} - {self.hidden_layer, -1})
        if other:
            raise EndpointError(
                f"{self.model}: hidden state of layer(s) {other} asked for, but a vLLM pooling server returns "
                f"only the last layer's ({self.hidden_layer}, after the final norm): train this stage's probe "
                f"on layer {self.hidden_layer} (features from this endpoint), or route it on P(T) alone")
        return True

    def _hidden_state(self, prompt: str) -> dict[int, np.ndarray]:
        """The prompt's last-token hidden state from the pooling server's /embeddings."""
        body = self._post("/embeddings", {"model": self.model, "input": prompt, "encoding_format": "float"},
                          base=self.hidden_api_base)
        try:
            vector = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
        except (KeyError, IndexError, TypeError, ValueError):
            raise EndpointError(f"{self.redact(self.hidden_api_base)}/embeddings answered without "
                                "data[0].embedding") from None
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise EndpointError(f"{self.redact(self.hidden_api_base)}/embeddings returned a vector that is not "
                                "a finite 1-D array")
        return {int(self.hidden_layer): vector}

    def score_options(
        self,
        prompts: Sequence[str],
        n_options: Sequence[int],
        layers: Sequence[int] | None = None,
    ) -> list[OptionScores]:
        """One greedy token per prompt -> option-letter log-probabilities, and the last layer's hidden
        state when the stage has a pooling server (`hidden_api_base`) and `layers` asks for it."""
        prompts, n_options = list(prompts), [int(n) for n in n_options]
        if len(prompts) != len(n_options):
            raise ValueError(f"{len(prompts)} prompts but {len(n_options)} option counts")
        for n in n_options:
            if not 1 <= n <= MAX_OPTIONS:
                raise ValueError(f"n_options must be in 1..{MAX_OPTIONS}, got {n}")
        hidden = [self._wanted_hidden(layers)] * len(prompts)
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._score_one(p, n, h) for p, n, h in zip(prompts, n_options, hidden)]
        # Up to `concurrency` requests in flight: a vLLM server batches what arrives together.
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._score_one, prompts, n_options, hidden))

    def generate(self, prompt: str, max_new_tokens: int = 64, *, cancel=None, on_text=None, layers=None,
                 gate=None) -> Generation:
        """A greedy answer and the log-probability of each generated token.

        `layers` and `gate` are accepted and ignored (`types.Backend`): a chat completion returns no
        hidden states, so the answer always comes back with `hidden_states=None`.

        With `on_text` or `cancel` the answer is streamed (`stream: true`): `on_text(delta)` gets each
        piece as it arrives, and `cancel` (anything with `is_set()`) is checked at every chunk; once
        set, the connection is closed, which makes vLLM abort the request (it stops generating and
        logs "Aborted request(s)"), and the answer so far comes back with `finish_reason="cancelled"`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if cancel is not None or on_text is not None:
            return self._generate_streamed(prompt, int(max_new_tokens), cancel, on_text)
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

    def _generate_streamed(self, prompt: str, max_new_tokens: int, cancel, on_text) -> Generation:
        """`generate` over server-sent events (chat endpoint), stopping when `cancel` is set."""
        started = time.perf_counter()
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0,
                   "logprobs": True, "top_logprobs": 1, "stream": True,
                   "stream_options": {"include_usage": True}}
        url = f"{self.api_base}/chat/completions"
        pieces: list[str] = []
        tokens: list[tuple[str, float]] = []
        usage: dict = {}
        finish = "stop"
        first = float("nan")
        if cancel is not None and cancel.is_set():
            return Generation(text="", token_logprobs=np.zeros(0), prompt_tokens=0, output_tokens=0,
                              seconds=0.0, finish_reason="cancelled")
        try:
            with self._http().stream("POST", url, json=payload) as response:
                if response.status_code != 200:
                    body = self.redact(response.read().decode("utf-8", "replace")[:MAX_ERROR_BODY_CHARS].strip())
                    raise EndpointError(f"{self.redact(url)} failed: HTTP {response.status_code}: {body}")
                for line in response.iter_lines():
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break  # leaving the block closes the connection: the server aborts the request
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise EndpointError(f"{self.redact(url)} sent an event that is not JSON") from None
                    if chunk.get("error"):
                        detail = str(chunk["error"])[:MAX_ERROR_BODY_CHARS]
                        raise EndpointError(f"{self.redact(url)} failed mid-stream: {detail}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = ((choice.get("delta") or {}).get("content")) or ""
                        tokens += [c for c, _top in _positions(choice) if c is not None]
                        if delta:
                            if not pieces and first != first:
                                first = time.perf_counter() - started
                            pieces.append(delta)
                            if on_text is not None:
                                on_text(delta)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
        except RETRYABLE_ERRORS as err:
            raise EndpointError(f"{self.redact(url)} failed: {type(err).__name__}: {self.redact(str(err))}") from None
        text = "".join(pieces)
        if not tokens and text and finish != "cancelled":
            raise EndpointError("endpoint returned no logprobs (does this server support logprobs?)")
        return Generation(text=text, token_logprobs=np.asarray([lp for _t, lp in tokens], dtype=np.float64),
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          output_tokens=int(usage.get("completion_tokens") or len(tokens)),
                          seconds=time.perf_counter() - started, tokens=tuple(t for t, _lp in tokens),
                          finish_reason=finish if finish in ("stop", "length", "cancelled") else "stop",
                          first_token_seconds=first)
