"""Server-sent events in OpenAI's `chat.completion.chunk` / `text_completion` stream format.

Both servers stream the same way: the request takes its queue slot first (so 429 / 504 / 400
are still plain JSON errors with their status), then the model work starts in a worker thread
and pushes text pieces onto an asyncio queue; `stream_events` turns them into `data: {...}`
events, ends with `data: [DONE]`, sends a comment line when nothing happened for a while, and
cancels the work (the `CancelToken`) when the client leaves (polled every 0.1 s) or the deadline
passes, so the generation stops within one decoding step.
An error after the stream began arrives as one `data: {"error": {...}}` event, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

from cascade_core.server.common import ApiError, error_body
from cascade_core.server.queue import CancelToken

KEEPALIVE_S = 1.0
WATCH_S = 0.1
DONE = b"data: [DONE]\n\n"


def event(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Chunks:
    """Builds the chunks of one streamed answer (same id, created time and model on each)."""

    def __init__(self, model: str, chat: bool = True):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, *, content: str | None = None, role: str | None = None, finish_reason: str | None = None,
              logprobs: dict | None = None, **extra) -> dict:
        if self.chat:
            delta = {}
            if role is not None:
                delta["role"] = role
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": content or "", "logprobs": logprobs, "finish_reason": finish_reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], **extra}

    def usage(self, usage: dict, **extra) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage, **extra}


class Pieces:
    """The thread-safe hand-over from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, item) -> None:
        """Called from the worker thread: one piece (whatever the server's chunk maker takes)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


async def stream_events(
    future: asyncio.Future,
    pieces: Pieces,
    cancel: CancelToken,
    *,
    first: list[dict],
    piece_chunks: Callable[[object], list[dict]],
    finish: Callable[[object], list[dict]],
    gone: Callable[[], Awaitable[bool]],
    timeout_s: float,
    on_error: Callable[[BaseException], ApiError] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body: `first` chunks, a chunk per piece, then `finish(result)` and [DONE].

    `future` is the running work; `finish` gets its result once it is done and every piece it
    pushed was sent. Any exception from the work becomes an error event (`on_error` maps it to
    an ApiError; the default answers 500 without the exception's text).
    """
    watch = asyncio.ensure_future(_watch(gone, cancel, future))
    try:
        for chunk in first:
            yield event(chunk)
        while True:
            if future.done() and pieces.queue.empty():
                break
            getter = asyncio.ensure_future(pieces.queue.get())
            remaining = cancel.deadline - time.monotonic() if cancel.deadline is not None else KEEPALIVE_S
            done, _ = await asyncio.wait({getter, future}, timeout=max(0.0, min(KEEPALIVE_S, remaining)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                for chunk in piece_chunks(getter.result()):
                    yield event(chunk)
                continue
            getter.cancel()
            if future in done:
                continue  # drain what is left, then finish
            if cancel.is_set():  # the deadline passed
                raise ApiError(504, f"no answer within {timeout_s:g} s: the generation was stopped",
                               kind="timeout_error")
            if await gone():
                cancel.cancel("client disconnected")
                return
            yield b": keep-alive\n\n"
        try:
            result = future.result()
        except ApiError:
            raise
        except BaseException as err:  # mapped to an error event
            if on_error is None:
                raise ApiError(500, f"internal error ({type(err).__name__}); see the server log",
                               kind="server_error") from err
            raise on_error(err) from err
        for chunk in finish(result):
            yield event(chunk)
        yield DONE
    except ApiError as err:
        yield event({**error_body(err.message, err.kind, err.param), **err.extra})
        yield DONE
    finally:
        watch.cancel()
        if not future.done():
            cancel.cancel(cancel.reason or "client disconnected")


async def _watch(gone: Callable[[], Awaitable[bool]], cancel: CancelToken, future: asyncio.Future) -> None:
    """Polls for a vanished client while the work runs (a stream only notices at its next write),
    so the generation is cancelled within WATCH_S plus the decoding step in flight."""
    while not future.done() and not cancel.is_set():
        if await gone():
            cancel.cancel("client disconnected")
            return
        await asyncio.sleep(WATCH_S)
