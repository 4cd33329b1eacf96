"""One local model behind the OpenAI API, with log-probabilities, so it can be a remote stage.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` in the standard response
shapes, `GET /health`. Decoding is always greedy: `temperature` is accepted and ignored (any
value decodes as temperature 0), `n` must be 1 and streaming is not offered. `logprobs` /
`top_logprobs` give the top-k over the full vocabulary at every generated position (k <= 20).

Inference is serialised with one lock (one model, one forward pass at a time). Model code lives
in `models.greedy_logprobs`; it is imported only when the app is built from a backend.

    python -m cascade_core.server.single_stage --packaged smollm2-135m --port 8001
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from cascade_core.server.common import (ApiError, bearer_checker, check_bind_host, install_error_handlers, read_json,
                                        read_token, validate_body)
from cascade_core.server.queue import Gate, GaveUp, QueueFull, run_in_slot

__all__ = ["ApiError", "create_single_stage_app", "main"]

MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16
MAX_NEW_TOKENS = 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _common_checks(req: _Request, max_tokens: int | None) -> tuple[int, list[str]]:
    if req.stream:
        raise ApiError(400, "stream=true is not supported by this server", param="stream")
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported (decoding is greedy)", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")
    tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if tokens > MAX_NEW_TOKENS:
        raise ApiError(400, f"max_tokens must be <= {MAX_NEW_TOKENS}, got {tokens}", param="max_tokens")
    return tokens, stop


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.tokens),
            "total_tokens": completion.prompt_tokens + len(completion.tokens)}


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _legacy_logprobs(completion) -> dict:
    """The /v1/completions logprobs shape; a token string that two ids decode to keeps its best."""
    tops, offsets, offset = [], [], 0
    for t in completion.tokens:
        best: dict[str, float] = {}
        for token, lp in t.top:
            best.setdefault(token, lp)
        tops.append(best)
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in completion.tokens],
            "token_logprobs": [t.logprob for t in completion.tokens],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(completion) -> dict:
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": _utf8(t.token),
         "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _utf8(tok)} for tok, lp in t.top]}
        for t in completion.tokens], "refusal": None}


def _engine_for(backend):
    from models.greedy_logprobs import GreedyLogprobEngine  # model I/O lives in models/

    return GreedyLogprobEngine(backend)


def create_single_stage_app(
    backend,
    model_name: str,
    api_key_env: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_prompt_chars: int = 100_000,
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
    # Share the backend's own lock when it has one: the same model may also serve other callers.
    lock = getattr(backend, "lock", None) or threading.Lock()
    created = int(time.time())
    app = FastAPI(title=f"cascade single-stage server: {model_name}", docs_url=None, redoc_url=None, openapi_url=None)

    install_error_handlers(app)

    def check_model(req: _Request) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model")

    def run(prompt: str, special_tokens_included: bool, max_tokens: int, top_k: int, stop: list[str]):
        with lock:  # the tokenizer too: a fast tokenizer used from two threads can fail
            prompt_ids = engine.encode(prompt, special_tokens_included)
            if not prompt_ids:
                raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
            if engine.max_positions and len(prompt_ids) + max_tokens > engine.max_positions:
                raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                    f"model's context of {engine.max_positions} tokens")
            try:
                return engine.complete(prompt_ids, max_tokens=max_tokens, top_k=top_k, stop=stop)
            except ApiError:
                raise
            except Exception as err:  # noqa: BLE001 - answered as a 500, never a traceback
                raise ApiError(500, f"inference failed: {type(err).__name__}: {err}", kind="server_error") from err

    async def bounded(request: Request, *args):
        """`run(*args)` in a queue slot; 429 when the queue is full, 504 past the deadline."""
        try:
            completion = await run_in_slot(gate, executor, run, *args, deadline=time.monotonic() + timeout_s,
                                           gone=request.is_disconnected)
        except QueueFull:
            raise ApiError(429, f"{model_name} is busy: {gate.in_flight} running and {gate.max_waiting} waiting "
                                "(the queue's limit); retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except GaveUp:
            raise ApiError(504, f"no answer within {timeout_s:g} s", kind="timeout_error") from None
        return completion  # None: the client left

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "cascade"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = validate_body(CompletionRequest, await read_json(request, max_body_bytes))
        check_model(req)
        max_tokens, stop = _common_checks(req, req.max_tokens)
        if req.echo:
            raise ApiError(400, "echo=true is not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send exactly one prompt string per request", param="prompt")
        prompt = prompts[0]
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        if len(prompt) > max_prompt_chars:
            raise ApiError(400, f"prompt is {len(prompt)} characters, over the limit of {max_prompt_chars}",
                           param="prompt")
        top_k = req.logprobs or 0
        completion = await bounded(request, prompt, False, max_tokens, top_k, stop)
        if completion is None:
            return Response(status_code=499)  # the client left; nobody reads this
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                         "logprobs": _legacy_logprobs(completion) if req.logprobs is not None else None}],
            "usage": _usage(completion),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = validate_body(ChatRequest, await read_json(request, max_body_bytes))
        check_model(req)
        max_tokens, stop = _common_checks(req, req.max_completion_tokens or req.max_tokens)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if not any(m.content.strip() for m in req.messages):
            raise ApiError(400, "every message is empty", param="messages")
        chars = sum(len(m.content) for m in req.messages)
        if chars > max_prompt_chars:
            raise ApiError(400, f"messages hold {chars} characters, over the limit of {max_prompt_chars}",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        text, special = engine.chat_prompt(messages)
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        completion = await bounded(request, text, special, max_tokens, top_k, stop)
        if completion is None:
            return Response(status_code=499)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason,
                         "logprobs": _chat_logprobs(completion) if req.logprobs else None}],
            "usage": _usage(completion),
        }

    return app


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cascade_core.server.single_stage",
                                     description="Serve one local model behind the OpenAI API (with logprobs).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--packaged", metavar="KEY", help="a packaged model, e.g. smollm2-135m")
    source.add_argument("--hf", metavar="MODEL", help="a Hugging Face id or local folder")
    parser.add_argument("--model-name", help="the name clients send as `model` (default: the key or id)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "nf4", "int8"])
    parser.add_argument("--api-key-env", help="NAME of an env variable whose value clients must send as bearer token")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument("--max-prompt-chars", type=int, default=100_000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from models.hf import HFBackend

    args = _parse_args(argv)
    check_bind_host(args.host, args.allow_remote)
    if args.packaged:
        backend = HFBackend.from_packaged(args.packaged, progress=False, device=args.device, dtype=args.dtype,
                                          quantization=args.quantization)
    else:
        backend = HFBackend(args.hf, device=args.device, dtype=args.dtype, quantization=args.quantization)
    app = create_single_stage_app(backend, args.model_name or args.packaged or args.hf, api_key_env=args.api_key_env,
                                  max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
