"""The cascade behind the OpenAI chat API: `POST /v1/chat/completions`, `GET /v1/models`.

The model name picks what answers: `cascade-<name>` runs that cascade's stages in order (the
routing of `cascade_core.cascade.run_cascade`); a stage's own name runs that stage alone. The
answer comes back in the standard chat.completion shape, so stock clients work; the routing trace
rides along in an extra top-level field `cascade` and, summarised, in `X-Cascade-*` headers.
docs/SERVING.md describes the message format, the limits and every status code.

The app takes stages that are already built (`compose.live.build_cascade`), so tests inject
their own and this module never imports model code. The cascade runs in worker threads; each
served model has a bounded queue (`queue.Gate`); a request past its deadline gets 504, a full
queue 429, a model marked unavailable (or a server shutting down) 503. A request whose client
leaves or whose deadline passes is cancelled: the stage stops within one decoding step.

`stream: true` answers with server-sent events (`sse.py`): earlier stages run to their decision,
the last stage's free-form tokens stream as they are generated (a kept or multiple-choice answer
arrives as one piece), and the trace rides in the last chunk's `cascade` field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from cascade_core.cascade import CascadeCancelled, CascadeError, RuntimeStage, run_cascade, trace_to_dict
from cascade_core.compose.formats import served_format_notes
from cascade_core.server.chat_question import question_from_chat
from cascade_core.server.common import (DEFAULT_MAX_PROMPT_CHARS, ApiError, bearer_checker, install_error_handlers,
                                        read_request, read_token, utf8_bytes)
from cascade_core.server.metrics import Metrics, StatusCounter
from cascade_core.server.openai_request import MAX_NEW_TOKENS, ChatRequest, parse_chat
from cascade_core.server.queue import (SHUTDOWN, CancelToken, Closed, Gate, GaveUp, QueueFull, run_in_slot,
                                       start_in_slot, track_running)
from cascade_core.server.sse import Chunks, Pieces, stream_events
from cascade_core.types import MAX_OPTIONS, OPTION_LETTERS, Question, Trace


CASCADE_PREFIX = "cascade-"
CLIENT_CLOSED = 499  # nginx's code for "the client went away"; only ever seen in /metrics


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
    return trace.answer_text()


def alone(stage: RuntimeStage) -> RuntimeStage:
    """`stage` as a cascade of one, switched on: a client naming a stage asks for that stage
    alone (docs/SERVING.md), whatever a cascade's policy decided about it. Alone, a stage is the
    last one and always answers, so its thresholds never matter."""
    return dataclasses.replace(stage, policy=dataclasses.replace(stage.policy, enabled=True), off_reason="")


def _ends_turn(token: str) -> bool:
    """An end-of-turn or end-of-sequence token as backends write them (`<|im_end|>`, `</s>`)."""
    token = token.strip()
    return (token.startswith("<|") and token.endswith("|>")) or token in ("</s>", "<eos>", "<end_of_turn>")


def finish_reason(trace: Trace, max_new: int) -> str:
    """OpenAI's `finish_reason`: "length" when a free-form answer was cut at `max_new` tokens
    (it used them all and its last token does not end the turn), "stop" otherwise. A multiple-
    choice answer is one letter, never cut."""
    final = trace.answered_by
    if final is None or trace.question.is_multiple_choice or final.output_tokens < max_new:
        return "stop"
    tokens = [t for t, _ in final.token_logprobs or ()]
    return "stop" if tokens and _ends_turn(str(tokens[-1])) else "length"


def create_cascade_app(
    cascades: Mapping[str, Sequence[RuntimeStage]],
    *,
    api_key_env: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    max_in_flight: int = 4,
    max_waiting: int = 64,
    timeout_s: float = 120.0,
    default_max_new_tokens: int = 64,
    serve_stages: bool = True,
    monitor=None,
    policies: Mapping[str, Mapping[str, dict]] | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving each cascade as `cascade-<name>` and each stage by name.

    `cascades` maps a cascade's name (usually the preset's) to its built stages. With
    `api_key_env`, every /v1 route needs `Authorization: Bearer <value of that variable>`.
    Each served model gets its own queue of `max_in_flight` running + `max_waiting` waiting.
    `monitor` (`cascade_core.monitor.service.Monitor`, optional): every trace is stored before
    its answer leaves, a seeded share is audited after it, and /health and /metrics carry its status.
    `policies` (optional): cascade name -> {"multiple_choice": ..., "free_form": ...}, the policy
    each kind of question runs with (`compose.policies.QuestionPolicy.to_dict`: file, guarantee,
    why); /health lists them and each cascade trace carries its question's as `policy`.
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
                if stage.name in served:
                    if served[stage.name][0].backend is not stage.backend:
                        raise ValueError(f"two different stages are named {stage.name!r}")
                    continue
                served[stage.name] = [alone(stage)]
    default_model = next(iter(served))
    check_auth = bearer_checker(read_token(api_key_env))
    gates = {name: Gate(max_in_flight, max_waiting) for name in served}
    unavailable: dict[str, str] = {}
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=max_in_flight * len(served), thread_name_prefix="cascade")
    created = int(time.time())
    stated = {f"{CASCADE_PREFIX}{name}": dict(kinds) for name, kinds in (policies or {}).items()}

    def traced(model: str, trace: Trace) -> dict:
        """The trace field of a response, with the policy its question's kind ran with (`policies`)."""
        field = trace_field(model, trace)
        kind = "multiple_choice" if trace.question.is_multiple_choice else "free_form"
        if stated.get(model, {}).get(kind) is not None:
            field["policy"] = stated[model][kind]
        return field

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for name in served:  # requests arriving while the server drains get 503
            unavailable.setdefault(name, "the server is shutting down")
        executor.shutdown(wait=False, cancel_futures=True)
        if monitor is not None:
            monitor.close()

    app = FastAPI(title="cascade server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(StatusCounter, metrics=metrics)
    app.state.metrics = metrics
    app.state.gates = gates
    app.state.served = served
    app.state.monitor = monitor

    def set_unavailable(model: str, reason: str | None) -> None:
        """Mark a served model unavailable (503 with `reason`), or available again with None."""
        if model not in served:
            raise KeyError(model)
        if reason is None:
            unavailable.pop(model, None)
        else:
            unavailable[model] = reason

    app.state.set_unavailable = set_unavailable

    def drain(reason: str = "the server is shutting down") -> None:
        """Graceful shutdown, first step (`server.run`): every model unavailable (new requests and
        those waiting in a queue get 503 with Retry-After); running work goes on."""
        for name in served:
            unavailable.setdefault(name, reason)
        for gate in gates.values():
            gate.close(reason)

    app.state.drain = drain
    new_token = track_running(app)  # per-request cancel tokens; sets app.state.cancel_running

    def model_card(name: str) -> dict:
        """A cascade's card lists the stages its policy runs and, apart, the ones it switched off
        (with why); a stage's card says in which cascades it runs. Both answer when asked."""
        stages = served[name]
        card = {"id": name, "object": "model", "created": created, "owned_by": "cascade",
                "cascade": None, "available": name not in unavailable}
        if name.startswith(CASCADE_PREFIX):
            card["cascade"] = [s.name for s in stages if s.policy.enabled]
            card["switched_off"] = {s.name: s.off_reason or "switched off" for s in stages if not s.policy.enabled}
        else:
            card["in_cascades"] = [c for c, st in served.items() if c.startswith(CASCADE_PREFIX)
                                   and any(s.name == name and s.policy.enabled for s in st)]
        card["number_format"] = served_format_notes(name, stages)  # per local stage, vs the calibration records
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok" if not unavailable else "degraded", "models": list(served),
                "unavailable": dict(unavailable), "queues": {n: g.snapshot() for n, g in gates.items()},
                **({"policies": stated} if stated else {}),
                **({"monitor": monitor.health()} if monitor is not None else {})}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        check_auth(request)
        return {**metrics.snapshot(), "queues": {n: g.snapshot() for n, g in gates.items()},
                **({"monitor": monitor.metrics()} if monitor is not None else {})}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in served]}

    def parse(req: ChatRequest) -> tuple[str, Question, int]:
        if req.stop_list():
            raise ApiError(400, "stop is not supported by the cascade server (each stage answers in full)",
                           param="stop")
        if req.options is not None and not 2 <= len(req.options) <= MAX_OPTIONS:
            raise ApiError(400, f"a multiple-choice question needs 2 to {MAX_OPTIONS} options, got {len(req.options)}",
                           param="options")
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
        if req.top_logprobs and not question.is_multiple_choice:
            raise ApiError(400, "top_logprobs: a free-form answer gives the log-probability of each generated "
                                "token, not alternatives; ask with logprobs=true alone", param="top_logprobs")
        return model, question, req.max_new_tokens(default_max_new_tokens)

    def parse_body(data: dict) -> tuple[ChatRequest, str, Question, int]:
        """A chat body -> (request, model, question, max new tokens); off the event loop (`read_request`)."""
        req = parse_chat(data)
        return (req, *parse(req))

    def work(model: str, question: Question, max_new: int, cancel: CancelToken, on_text=None) -> Trace | None:
        """Runs in a worker thread; its trace (also of a failed run) goes into the metrics.
        None when the request was cancelled (the client left or the deadline passed)."""
        started = time.monotonic()
        stages, note = monitor.stages_for(model, served[model], question) if monitor else (served[model], None)
        try:
            trace = run_cascade(stages, question, max_new_tokens=max_new, cancel=cancel, on_text=on_text)
        except CascadeCancelled as err:
            metrics.cancel(cancel.reason or "client disconnected", int(err.trace.total("output_tokens")))
            return None
        except CascadeError as err:
            metrics.trace(model, err.trace)
            if monitor is not None and err.trace is not None:
                monitor.record(model, stages, question, err.trace, time.monotonic() - started, note, status="error")
            raise
        metrics.trace(model, trace)
        if monitor is not None:  # stored (committed) before the answer leaves
            monitor.record(model, stages, question, trace, time.monotonic() - started, note, max_new_tokens=max_new)
        return trace

    def closing(model: str, why: Closed) -> ApiError:
        return ApiError(503, f"model {model!r} is not available: {why}", kind="server_error",
                        headers={"Retry-After": "5"})

    def busy(model: str) -> ApiError:
        gate = gates[model]
        return ApiError(429, f"model {model!r} is busy: {gate.in_flight} requests running and "
                             f"{gate.max_waiting} waiting (the queue's limit); retry later",
                        kind="rate_limit_error", headers={"Retry-After": "1"})

    def failed(model: str, err: BaseException) -> ApiError:
        """What a failed run answers: 502 with its trace, or 400 for a question the stages cannot take."""
        if isinstance(err, CascadeError):
            trace = err.trace
            return ApiError(502, f"the cascade could not answer: {err.args[0]}", kind="server_error",
                            extra={"cascade": traced(model, trace)}, headers=trace_headers(trace))
        if isinstance(err, ValueError):  # e.g. free-form to a recorded stage
            return ApiError(400, f"invalid question for {model!r}: {err}", param="messages")
        if isinstance(err, ApiError):
            return err
        return ApiError(500, f"internal error ({type(err).__name__}); see the server log", kind="server_error")

    async def run_bounded(request: Request, model: str, question: Question, max_new: int) -> Trace | None:
        """The trace, or None when the client left; 429/504 as ApiError."""
        deadline = time.monotonic() + timeout_s
        cancel = new_token(deadline)
        try:
            trace = await run_in_slot(gates[model], executor, work, model, question, max_new, cancel,
                                      deadline=deadline, gone=request.is_disconnected, cancel=cancel)
            if trace is None and cancel.reason == SHUTDOWN:
                raise closing(model, Closed("the server shut down before the answer was complete"))
            return trace
        except QueueFull:
            raise busy(model) from None
        except Closed as why:
            raise closing(model, why) from None
        except GaveUp as gave_up:
            where = ("the request waited in the queue the whole time" if gave_up.reason == "queue timeout"
                     else "the request was cancelled (its stage stops within one decoding step)")
            raise ApiError(504, f"no answer within {timeout_s:g} s from {model!r}: {where}",
                           kind="timeout_error") from None

    def usage(trace: Trace) -> dict:
        prompt_tokens = int(trace.total("prompt_tokens"))
        completion_tokens = int(trace.total("output_tokens"))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def stream(request: Request, req: ChatRequest, model: str, question: Question, max_new: int):
        deadline = time.monotonic() + timeout_s
        cancel = new_token(deadline)
        try:
            await gates[model].acquire(deadline, request.is_disconnected)
        except QueueFull:
            raise busy(model) from None
        except Closed as why:
            raise closing(model, why) from None
        except GaveUp as gave_up:
            if gave_up.reason == "timeout":
                raise ApiError(504, f"no answer within {timeout_s:g} s from {model!r}: the request waited in "
                                    "the queue the whole time", kind="timeout_error") from None
            return Response(status_code=CLIENT_CLOSED)
        pieces = Pieces(asyncio.get_running_loop())
        future = start_in_slot(gates[model], executor, work, model, question, max_new, cancel, pieces.push)
        metrics.stream()
        chunks = Chunks(model)
        sent: list[str] = []
        finished: list = []  # the trace, for the monitor's audit once the stream has ended

        def piece_chunks(delta) -> list[dict]:
            sent.append(delta)
            return [chunks.chunk(content=delta)] if delta else []

        def finish(trace: Trace | None) -> list[dict]:
            finished.append(trace)
            if trace is None and cancel.reason == SHUTDOWN:
                raise closing(model, Closed("the server shut down before the answer was complete"))
            if trace is None:
                raise ApiError(504, f"no answer within {timeout_s:g} s from {model!r}: the request was cancelled",
                               kind="timeout_error")
            content, streamed = answer_content(trace), "".join(sent)
            rest = content[len(streamed):] if content.startswith(streamed) else content
            lp = answer_logprobs(trace, req.top_logprobs or 0) if req.logprobs else None
            extra = {"cascade": traced(model, trace)}
            last = chunks.chunk(content=rest or None, finish_reason=finish_reason(trace, max_new), logprobs=lp,
                                **({} if req.include_usage() else extra))
            if not req.include_usage():
                return [last]
            return [last, chunks.usage(usage(trace), **extra)]

        first = [chunks.chunk(role="assistant", content="")]
        body = stream_events(future, pieces, cancel, first=first, piece_chunks=piece_chunks, finish=finish,
                             gone=request.is_disconnected, timeout_s=timeout_s, on_error=lambda e: failed(model, e))
        after = BackgroundTask(lambda: monitor.after_response(finished[0] if finished else None)) if monitor else None
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=after)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req, model, question, max_new = await read_request(request, max_body_bytes, parse_body)
        if model in unavailable:
            raise ApiError(503, f"model {model!r} is not available: {unavailable[model]}", kind="server_error",
                           headers={"Retry-After": "5"})
        if req.stream:
            return await stream(request, req, model, question, max_new)
        try:
            trace = await run_bounded(request, model, question, max_new)
        except (CascadeError, ValueError) as err:
            raise failed(model, err) from None
        if trace is None:
            return Response(status_code=CLIENT_CLOSED)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_content(trace)},
                         "finish_reason": finish_reason(trace, max_new),
                         "logprobs": answer_logprobs(trace, req.top_logprobs or 0) if req.logprobs else None}],
            "usage": usage(trace),
            "cascade": traced(model, trace),
        }
        after = BackgroundTask(monitor.after_response, trace) if monitor is not None else None  # audits start after
        return JSONResponse(body, headers=trace_headers(trace), background=after)

    return app




def answer_logprobs(trace: Trace, top_k: int) -> dict:
    """The answering stage's real log-probabilities in the chat `logprobs` shape.

    Multiple choice: one entry, the chosen option letter, its log-probability among the option
    letters (the stage's P(T) is its exp), and up to `top_k` letters as alternatives. Free-form:
    every generated token with its log-probability (end-of-turn token included)."""
    final = trace.answered_by
    if final is None:
        return {"content": [], "refusal": None}
    if final.answer_index is not None and final.option_probs:
        probs = list(final.option_probs)
        letters = OPTION_LETTERS[:len(probs)]

        def lp(p: float) -> float:
            return math.log(p) if p > 0 else -9999.0

        order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
        entry = {"token": letters[final.answer_index], "logprob": lp(probs[final.answer_index]),
                 "bytes": utf8_bytes(letters[final.answer_index]),
                 "top_logprobs": [{"token": letters[i], "logprob": lp(probs[i]), "bytes": utf8_bytes(letters[i])}
                                  for i in order]}
        return {"content": [entry], "refusal": None}
    return {"content": [{"token": str(t), "logprob": float(v), "bytes": utf8_bytes(str(t)), "top_logprobs": []}
                        for t, v in final.token_logprobs], "refusal": None}
