"""The cascade behind the OpenAI chat API: `POST /v1/chat/completions`, `GET /v1/models`.

The model name picks what answers: `cascade-<name>` runs that cascade's stages in order (the
routing of `cascade_core.cascade.run_cascade`); a stage's own name runs that stage alone. The
answer comes back in the standard chat.completion shape, so stock clients work; the routing trace
rides along in an extra top-level field `cascade` and, summarised, in `X-Cascade-*` headers.
docs/SERVING.md describes the message format, the limits and every status code.

The app takes stages that are already built (`models.factory.build_cascade`), so tests inject
their own and this module never imports model code. The cascade runs in worker threads; each
served model has a bounded queue (`queue.Gate`); a request past its deadline gets 504, a full
queue 429, a model marked unavailable (or a server shutting down) 503.
"""

from __future__ import annotations

import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cascade_core.cascade import CascadeError, RuntimeStage, run_cascade, trace_to_dict
from cascade_core.server.chat_question import question_from_chat
from cascade_core.server.common import (ApiError, bearer_checker, install_error_handlers, read_json, read_token,
                                        validate_body)
from cascade_core.server.metrics import Metrics
from cascade_core.server.queue import Gate, GaveUp, QueueFull, run_in_slot
from cascade_core.types import MAX_OPTIONS, Question, Trace


CASCADE_PREFIX = "cascade-"
MAX_NEW_TOKENS = 1024
CLIENT_CLOSED = 499  # nginx's code for "the client went away"; only ever seen in /metrics


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """Plain text of the content; a list of content parts keeps its `text` parts."""
        if isinstance(self.content, list):
            return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class CascadeChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # accepted; decoding is greedy
    n: int = 1
    stream: bool = False
    options: list[str] | None = None  # extra field: the answer options of a multiple-choice question
    subject: str = ""  # extra field: the subject named in the prompt header

    @field_validator("options")
    @classmethod
    def _option_count(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not 2 <= len(value) <= MAX_OPTIONS:
            raise ValueError(f"a multiple-choice question needs 2 to {MAX_OPTIONS} options, got {len(value)}")
        return value


def _header_safe(text: str) -> str:
    """HTTP header values are latin-1: anything else becomes '?'."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))[:1000]


def trace_summary(trace: Trace) -> dict:
    """The short routing story: the path taken, how often it escalated, what it cost."""
    final = trace.answered_by
    return {
        "path": [f"{s.stage}:{s.decision}" for s in trace.steps],
        "escalations": sum(1 for s in trace.steps if s.decision in ("escalate", "error")),
        "stage": None if final is None else final.stage,
        "p_t": None if final is None or math.isnan(final.p_t) else final.p_t,
        "flops": trace.total("flops"),
    }


def trace_headers(trace: Trace) -> dict[str, str]:
    summary = trace_summary(trace)
    headers = {
        "X-Cascade-Stage": _header_safe(summary["stage"] or "none"),
        "X-Cascade-Path": _header_safe(",".join(summary["path"])),
        "X-Cascade-Escalations": str(summary["escalations"]),
        "X-Cascade-Flops": f"{summary['flops']:.6g}",
        "X-Cascade-Seconds": f"{trace.total('seconds'):.4f}",
    }
    if summary["p_t"] is not None:
        headers["X-Cascade-P-T"] = f"{summary['p_t']:.6f}"
    return headers


def trace_field(model: str, trace: Trace) -> dict:
    return {"model": model, **trace_summary(trace), **trace_to_dict(trace)}


def answer_content(trace: Trace) -> str:
    """A letter and its option ("C. Paris") for multiple choice, the generated text otherwise."""
    final = trace.answered_by
    if final is None:
        return ""
    if final.answer_index is not None and trace.question.options:
        return f"{final.answer}. {trace.question.options[final.answer_index]}"
    return final.answer or ""


class _StatusCounter:
    """Pure ASGI middleware: counts every /v1 response's status and latency into `metrics`.

    (Pure ASGI rather than @app.middleware: it adds no task of its own, so a client that hangs
    up mid-request cannot leave it waiting.)
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.response(status[0], time.monotonic() - started)


def create_cascade_app(
    cascades: Mapping[str, Sequence[RuntimeStage]],
    *,
    api_key_env: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_prompt_chars: int = 32_000,
    max_in_flight: int = 4,
    max_waiting: int = 64,
    timeout_s: float = 120.0,
    default_max_new_tokens: int = 64,
    serve_stages: bool = True,
) -> FastAPI:
    """An OpenAI-compatible app serving each cascade as `cascade-<name>` and each stage by name.

    `cascades` maps a cascade's name (usually the preset's) to its built stages. With
    `api_key_env`, every /v1 route needs `Authorization: Bearer <value of that variable>`.
    Each served model gets its own queue of `max_in_flight` running + `max_waiting` waiting.
    """
    if not cascades:
        raise ValueError("give at least one cascade to serve")
    if max_body_bytes < 1 or max_prompt_chars < 1 or not timeout_s > 0:
        raise ValueError("max_body_bytes and max_prompt_chars must be >= 1 and timeout_s > 0")
    if not 1 <= default_max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"default_max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
    served: dict[str, list[RuntimeStage]] = {}
    for name, stages in cascades.items():
        if not stages:
            raise ValueError(f"cascade {name!r} has no stages")
        served[f"{CASCADE_PREFIX}{name}"] = list(stages)
    if serve_stages:
        for stages in cascades.values():
            for stage in stages:
                if stage.name in served and served[stage.name][0] is not stage:
                    if served[stage.name][0].backend is not stage.backend:
                        raise ValueError(f"two different stages are named {stage.name!r}")
                    continue
                # Alone, a stage is the last one: it always answers, whatever its thresholds.
                served[stage.name] = [stage]
    default_model = next(iter(served))
    check_auth = bearer_checker(read_token(api_key_env))
    gates = {name: Gate(max_in_flight, max_waiting) for name in served}
    unavailable: dict[str, str] = {}
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=max_in_flight * len(served), thread_name_prefix="cascade")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for name in served:  # requests arriving while the server drains get 503
            unavailable.setdefault(name, "the server is shutting down")
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cascade server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(_StatusCounter, metrics=metrics)
    app.state.metrics = metrics
    app.state.gates = gates
    app.state.served = served

    def set_unavailable(model: str, reason: str | None) -> None:
        """Mark a served model unavailable (503 with `reason`), or available again with None."""
        if model not in served:
            raise KeyError(model)
        if reason is None:
            unavailable.pop(model, None)
        else:
            unavailable[model] = reason

    app.state.set_unavailable = set_unavailable

    def model_card(name: str) -> dict:
        stages = served[name]
        return {"id": name, "object": "model", "created": created, "owned_by": "cascade",
                "cascade": [s.name for s in stages] if name.startswith(CASCADE_PREFIX) else None,
                "available": name not in unavailable}

    @app.get("/health")
    async def health():
        return {"status": "ok" if not unavailable else "degraded", "models": list(served),
                "unavailable": dict(unavailable), "queues": {n: g.snapshot() for n, g in gates.items()}}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        check_auth(request)
        return {**metrics.snapshot(), "queues": {n: g.snapshot() for n, g in gates.items()}}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in served]}

    def parse(req: CascadeChatRequest) -> tuple[str, Question, int]:
        if req.stream:
            raise ApiError(400, "stream=true is not supported by this server", param="stream")
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported (decoding is greedy)", param="n")
        model = req.model or default_model
        if model not in served:
            raise ApiError(404, f"model {model!r} is not served here; available: {', '.join(served)}",
                           kind="not_found_error", param="model")
        chars = sum(len(m.text()) for m in req.messages) + sum(len(o) for o in req.options or ())
        if chars > max_prompt_chars:
            raise ApiError(400, f"the messages hold {chars} characters, over the prompt limit of {max_prompt_chars}",
                           param="messages")
        try:
            question = question_from_chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                          options=req.options, subject=req.subject)
        except ValueError as err:
            raise ApiError(400, f"invalid question: {err}", param="messages") from None
        max_new = req.max_completion_tokens or req.max_tokens or default_max_new_tokens
        return model, question, max_new

    def work(model: str, question: Question, max_new: int) -> Trace:
        """Runs in a worker thread; its trace (also of a failed run) goes into the metrics."""
        try:
            trace = run_cascade(served[model], question, max_new_tokens=max_new)
        except CascadeError as err:
            metrics.trace(model, err.args[1])
            raise
        metrics.trace(model, trace)
        return trace

    async def run_bounded(request: Request, model: str, question: Question, max_new: int) -> Trace | None:
        """The trace, or None when the client left; 429/504 as ApiError."""
        gate = gates[model]
        try:
            return await run_in_slot(gate, executor, work, model, question, max_new,
                                     deadline=time.monotonic() + timeout_s, gone=request.is_disconnected)
        except QueueFull:
            raise ApiError(429, f"model {model!r} is busy: {gate.in_flight} requests running and "
                                f"{gate.max_waiting} waiting (the queue's limit); retry later",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except GaveUp as gave_up:
            where = ("the request waited in the queue the whole time" if gave_up.reason == "queue timeout"
                     else "the request was abandoned (the stage finishes its current step in the background)")
            raise ApiError(504, f"no answer within {timeout_s:g} s from {model!r}: {where}",
                           kind="timeout_error") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = validate_body(CascadeChatRequest, await read_json(request, max_body_bytes))
        model, question, max_new = parse(req)
        if model in unavailable:
            raise ApiError(503, f"model {model!r} is not available: {unavailable[model]}", kind="server_error",
                           headers={"Retry-After": "5"})
        try:
            trace = await run_bounded(request, model, question, max_new)
        except CascadeError as err:
            message, trace = err.args
            raise ApiError(502, f"the cascade could not answer: {message}", kind="server_error",
                           extra={"cascade": trace_field(model, trace)}, headers=trace_headers(trace)) from None
        except ValueError as err:  # the stages cannot take this question (e.g. free-form to a recorded stage)
            raise ApiError(400, f"invalid question for {model!r}: {err}", param="messages") from None
        if trace is None:
            return Response(status_code=CLIENT_CLOSED)
        prompt_tokens = int(trace.total("prompt_tokens"))
        completion_tokens = int(trace.total("output_tokens"))
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_content(trace)},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "cascade": trace_field(model, trace),
        }
        return JSONResponse(body, headers=trace_headers(trace))

    return app
