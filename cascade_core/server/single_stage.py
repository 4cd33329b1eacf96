"""One local model behind the OpenAI API, with log-probabilities, so it can be a remote stage.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` in the standard response
shapes (streamed with `stream: true`), `GET /health`, `GET /metrics`. Decoding is always greedy:
`temperature` is accepted and ignored (any value decodes as temperature 0) and `n` must be 1.
`logprobs` / `top_logprobs` give the top-k over the full vocabulary at every generated position
(k <= 20). Requests are parsed by `openai_request`, the same parser as the cascade server's.

Inference is serialised with one lock (one model, one forward pass at a time). A request whose
client leaves, or whose deadline passes, is cancelled: its generation stops within one decoding
step and frees the lock and its queue slot. Model code lives in `models.greedy_logprobs`; it is
imported only when the app is built from a backend. The one way to start it:

    python -m cascade_core serve --single-stage smollm2-135m --port 8001
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from cascade_core.server.common import (DEFAULT_MAX_PROMPT_CHARS, ApiError, bearer_checker, install_error_handlers,
                                        read_request, read_token, utf8_bytes)
from cascade_core.server.metrics import Metrics, StatusCounter
from cascade_core.server.openai_request import ChatRequest, CompletionRequest, parse_chat, parse_completion
from cascade_core.server.queue import (SHUTDOWN, CancelToken, Closed, Gate, GaveUp, QueueFull, run_in_slot,
                                       start_in_slot, track_running)
from cascade_core.server.sse import Chunks, Pieces, stream_events

__all__ = ["ApiError", "create_single_stage_app"]

DEFAULT_MAX_TOKENS = 16
CLIENT_CLOSED = 499


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.tokens),
            "total_tokens": completion.prompt_tokens + len(completion.tokens)}


def _legacy_logprobs(tokens) -> dict:
    """The /v1/completions logprobs shape; a token string that two ids decode to keeps its best."""
    tops, offsets, offset = [], [], 0
    for t in tokens:
        best: dict[str, float] = {}
        for token, lp in t.top:
            best.setdefault(token, lp)
        tops.append(best)
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_logprob_entries(tokens) -> list[dict]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": utf8_bytes(t.token),
             "top_logprobs": [{"token": tok, "logprob": lp, "bytes": utf8_bytes(tok)} for tok, lp in t.top]}
            for t in tokens]


def _chat_logprobs(tokens) -> dict:
    return {"content": _chat_logprob_entries(tokens), "refusal": None}


def _engine_for(backend):
    from models.greedy_logprobs import GreedyLogprobEngine  # model I/O lives in models/

    return GreedyLogprobEngine(backend)


def create_single_stage_app(
    backend,
    model_name: str,
    api_key_env: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    engine=None,
    max_in_flight: int = 1,
    max_waiting: int = 64,
    timeout_s: float = 300.0,
) -> FastAPI:
    """An OpenAI-compatible app serving `backend` (an HFBackend) as `model_name`.

    With `api_key_env`, every /v1 route needs `Authorization: Bearer <value of that variable>`;
    the variable is read once here, and a missing one is an error now rather than an open server.
    `engine` (a `GreedyLogprobEngine`-like object) overrides the one built from `backend`.
    At most `max_in_flight` requests run (one forward pass at a time either way) and
    `max_waiting` wait; beyond that 429, and 504 past `timeout_s`.
    """
    if not model_name:
        raise ValueError("model_name must be non-empty")
    if max_body_bytes < 1 or max_prompt_chars < 1 or not timeout_s > 0:
        raise ValueError("max_body_bytes and max_prompt_chars must be >= 1 and timeout_s > 0")
    gate = Gate(max_in_flight, max_waiting)
    executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="single-stage")
    check_auth = bearer_checker(read_token(api_key_env))
    engine = engine if engine is not None else _engine_for(backend)
    chat_end_ids = engine.chat_end_ids() if hasattr(engine, "chat_end_ids") else None
    # Share the backend's own lock when it has one: the same model may also serve other callers.
    lock = getattr(backend, "lock", None) or threading.Lock()
    metrics = Metrics()
    created = int(time.time())
    app = FastAPI(title=f"cascade single-stage server: {model_name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.gate = gate
    # Graceful shutdown, first step (`server.run`): queued and new requests get 503 with Retry-After.
    app.state.drain = lambda reason="the server is shutting down": gate.close(reason)
    new_token = track_running(app)  # per-request cancel tokens; sets app.state.cancel_running

    install_error_handlers(app)
    app.add_middleware(StatusCounter, metrics=metrics)

    def check_model(req) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           kind="not_found_error", param="model")

    def run(prompt: str | list[dict], special_tokens_included: bool, max_tokens: int, top_k: int, stop: list[str],
            chat: bool, cancel: CancelToken, on_token=None):
        with lock:  # the tokenizer too: a fast tokenizer used from two threads can fail
            # Chat messages through the template with their contents kept as text (models.user_text).
            prompt_ids = engine.encode_chat(prompt) if isinstance(prompt, list) else engine.encode(
                prompt, special_tokens_included)
            if not prompt_ids:
                raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
            if engine.max_positions and len(prompt_ids) + max_tokens > engine.max_positions:
                raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                    f"model's context of {engine.max_positions} tokens")
            kwargs = {"cancel": cancel}
            if on_token is not None:
                kwargs["on_token"] = on_token
            if chat and chat_end_ids is not None:
                kwargs["end_ids"] = chat_end_ids
            try:
                completion = engine.complete(prompt_ids, max_tokens=max_tokens, top_k=top_k, stop=stop, **kwargs)
            except ApiError:
                raise
            except Exception as err:  # answered as a 500, never a traceback
                raise ApiError(500, f"inference failed: {type(err).__name__}: {err}", kind="server_error") from err
        if completion.finish_reason == "cancelled":
            metrics.cancel(cancel.reason or "client disconnected", len(completion.tokens))
        return completion

    def closing(why: Closed) -> ApiError:
        return ApiError(503, f"{model_name} is not available: {why}", kind="server_error",
                        headers={"Retry-After": "5"})

    def busy() -> ApiError:
        return ApiError(429, f"{model_name} is busy: {gate.in_flight} running and {gate.max_waiting} waiting "
                             "(the queue's limit); retry later", kind="rate_limit_error", headers={"Retry-After": "1"})

    async def bounded(request: Request, *args):
        """`run(*args)` in a queue slot; 429 when the queue is full, 504 past the deadline."""
        deadline = time.monotonic() + timeout_s
        cancel = new_token(deadline)
        try:
            completion = await run_in_slot(gate, executor, run, *args, cancel, deadline=deadline,
                                           gone=request.is_disconnected, cancel=cancel)
        except QueueFull:
            raise busy() from None
        except Closed as why:
            raise closing(why) from None
        except GaveUp:
            raise ApiError(504, f"no answer within {timeout_s:g} s", kind="timeout_error") from None
        if cancel.reason == SHUTDOWN:
            raise closing(Closed("the server shut down before the answer was complete"))
        return completion  # None: the client left

    async def streamed(request: Request, chunks: Chunks, args: tuple, include_usage: bool, want_logprobs: bool):
        """The same work, its tokens sent as server-sent events while they are generated."""
        deadline = time.monotonic() + timeout_s
        cancel = new_token(deadline)
        try:
            await gate.acquire(deadline, request.is_disconnected)
        except QueueFull:
            raise busy() from None
        except Closed as why:
            raise closing(why) from None
        except GaveUp as gave_up:
            if gave_up.reason == "timeout":
                raise ApiError(504, f"no answer within {timeout_s:g} s (waited in the queue)",
                               kind="timeout_error") from None
            return Response(status_code=CLIENT_CLOSED)
        pieces = Pieces(asyncio.get_running_loop())
        future = start_in_slot(gate, executor, run, *args, cancel, lambda token, delta: pieces.push((token, delta)))
        metrics.stream()

        def piece_chunks(piece) -> list[dict]:
            token, delta = piece
            if not delta and not (want_logprobs and token is not None):
                return []
            logprobs = None
            if want_logprobs and token is not None:
                logprobs = (_chat_logprobs([token]) if chunks.chat else _legacy_logprobs([token]))
            return [chunks.chunk(content=delta, logprobs=logprobs)]

        def finish(completion) -> list[dict]:
            out = [chunks.chunk(content="" if not chunks.chat else None, finish_reason=completion.finish_reason)]
            if include_usage:
                out.append(chunks.usage(_usage(completion)))
            return out

        first = [chunks.chunk(role="assistant", content="")] if chunks.chat else []
        body = stream_events(future, pieces, cancel, first=first, piece_chunks=piece_chunks, finish=finish,
                             gone=request.is_disconnected, timeout_s=timeout_s)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def completion_request(data: dict) -> tuple[CompletionRequest, str]:
        """A /v1/completions body -> (request, prompt); runs off the event loop (`read_request`)."""
        req = parse_completion(data)
        check_model(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send exactly one prompt string per request", param="prompt")
        prompt = prompts[0]
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        if len(prompt) > max_prompt_chars:
            raise ApiError(400, f"prompt is {len(prompt)} characters, over the limit of {max_prompt_chars}",
                           param="prompt")
        return req, prompt

    def chat_request(data: dict) -> tuple[ChatRequest, str | list[dict], bool]:
        """A /v1/chat/completions body -> (request, the messages or the prompt text, whether it
        holds the special tokens); runs off the event loop (`read_request`)."""
        req = parse_chat(data)
        check_model(req)
        if not any(m.content.strip() for m in req.messages):
            raise ApiError(400, "every message is empty", param="messages")
        chars = sum(len(m.content) for m in req.messages)
        if chars > max_prompt_chars:
            raise ApiError(400, f"messages hold {chars} characters, over the limit of {max_prompt_chars}",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        if hasattr(engine, "encode_chat"):  # the template is applied with the tokens, contents kept as text
            return req, messages, True
        text, special = engine.chat_prompt(messages)
        return req, text, special

    @app.get("/health")
    async def health():
        return {"status": "ok" if gate.closed is None else "draining", "model": model_name, "queue": gate.snapshot()}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        check_auth(request)
        return {**metrics.snapshot(), "queue": gate.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request):
        from cascade_core.compose.formats import backend_format_notes

        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "cascade",
                                            "number_format": backend_format_notes(model_name, backend)}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req, prompt = await read_request(request, max_body_bytes, completion_request)
        max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
        top_k = req.logprobs or 0
        args = (prompt, False, max_tokens, top_k, req.stop_list(), False)
        if req.stream:
            return await streamed(request, Chunks(model_name, chat=False), args, req.include_usage(),
                                  req.logprobs is not None)
        completion = await bounded(request, *args)
        if completion is None:
            return Response(status_code=CLIENT_CLOSED)  # the client left; nobody reads this
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                         "logprobs": _legacy_logprobs(completion.tokens) if req.logprobs is not None else None}],
            "usage": _usage(completion),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req, prompt, special = await read_request(request, max_body_bytes, chat_request)
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        args = (prompt, special, req.max_new_tokens(DEFAULT_MAX_TOKENS), top_k, req.stop_list(), True)
        if req.stream:
            return await streamed(request, Chunks(model_name), args, req.include_usage(), req.logprobs)
        completion = await bounded(request, *args)
        if completion is None:
            return Response(status_code=CLIENT_CLOSED)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason,
                         "logprobs": _chat_logprobs(completion.tokens) if req.logprobs else None}],
            "usage": _usage(completion),
        }

    return app
