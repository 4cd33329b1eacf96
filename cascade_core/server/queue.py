"""A bounded admission queue per served model: at most N requests running and M waiting.

Everything here runs on the event loop's thread, so plain counters suffice. A slot is held until
the model work really ends (not when the client gives up or the request times out): the bound is
on the work the machine does, which is what keeps memory and latency bounded under load.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from typing import Awaitable, Callable


class QueueFull(Exception):
    """No room to wait: answer 429."""


class Closed(Exception):
    """The gate closed (the server is shutting down): answer 503 with Retry-After."""


class GaveUp(Exception):
    """The deadline passed or the client left while waiting; `reason` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


async def wait_or_leave(future: asyncio.Future, deadline: float, gone: Callable[[], Awaitable[bool]],
                        poll_s: float) -> bool:
    """Wait for `future`, checking every `poll_s` whether the client left: True when it is done,
    False when the client left first; GaveUp("timeout") when `deadline` (monotonic) passes."""
    while not future.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GaveUp("timeout")
        await asyncio.wait({future}, timeout=min(poll_s, remaining))
        if not future.done() and await gone():
            return False
    return True


SHUTDOWN = "server shutting down"  # the CancelToken reason a graceful shutdown's grace period gives


class CancelToken:
    """The flag a request's model work checks at every decoding step (`is_set()`).

    Set when the client leaves (`cancel(reason)`) or, read from any thread, once `deadline`
    (monotonic) has passed, so a generation stops within one step of either, even when the event
    loop is busy. `reason` says which came first.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.reason: str | None = None
        self._event = threading.Event()

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        if not self._event.is_set() and self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel("timeout")
        return self._event.is_set()


class Gate:
    """At most `max_in_flight` holders of a slot and `max_waiting` callers queued for one."""

    def __init__(self, max_in_flight: int, max_waiting: int):
        if max_in_flight < 1 or max_waiting < 0:
            raise ValueError(f"max_in_flight must be >= 1 and max_waiting >= 0, got {max_in_flight}, {max_waiting}")
        self.max_in_flight, self.max_waiting = int(max_in_flight), int(max_waiting)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.closed: str | None = None  # why no new work is admitted (`close`)

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def snapshot(self) -> dict:
        return {"in_flight": self.in_flight, "waiting": self.waiting,
                "max_in_flight": self.max_in_flight, "max_waiting": self.max_waiting}

    def close(self, reason: str) -> None:
        """Admit nothing more: every caller waiting in line, and every later one, gets Closed.
        Work already holding a slot runs on (a graceful shutdown lets it finish)."""
        self.closed = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Closed(reason))

    async def acquire(self, deadline: float, gone: Callable[[], Awaitable[bool]], poll_s: float = 0.25) -> None:
        """Take a slot, waiting in line until `deadline` (monotonic); raise QueueFull, GaveUp or Closed."""
        if self.closed is not None:
            raise Closed(self.closed)
        if self.in_flight < self.max_in_flight and not self.waiting:
            self.in_flight += 1
            return
        if self.waiting >= self.max_waiting:
            raise QueueFull()
        granted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            if not await wait_or_leave(granted, deadline, gone, poll_s):
                raise GaveUp("client disconnected")
            granted.result()  # Closed while waiting
        except BaseException:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release()  # the slot arrived as we gave up: hand it on
            else:
                granted.cancel()
            raise
        finally:
            try:
                self._waiters.remove(granted)
            except ValueError:
                pass

    def release(self) -> None:
        """Free a slot, or hand it straight to the first caller still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight stays: the slot changes hands
                return
        self.in_flight -= 1


async def run_in_slot(gate: Gate, executor, fn: Callable, *args, deadline: float,
                      gone: Callable[[], Awaitable[bool]], poll_s: float = 0.25,
                      cancel: CancelToken | None = None):
    """`fn(*args)` in `executor` while holding a slot of `gate`; None when the client left first.

    Raises QueueFull (no room to wait), GaveUp("queue timeout") or GaveUp("timeout") when
    `deadline` passes while waiting or running, and whatever `fn` raised. When the caller stops
    waiting, `cancel` is set (reason "client disconnected" or "timeout"), so work that checks it
    stops within a step; the slot is freed when `fn` really returns.
    """
    try:
        await gate.acquire(deadline, gone, poll_s)
    except GaveUp as gave_up:
        if gave_up.reason == "timeout":
            raise GaveUp("queue timeout") from None
        return None
    future = start_in_slot(gate, executor, fn, *args)
    try:
        done = await wait_or_leave(future, deadline, gone, poll_s)
    except GaveUp:
        if cancel is not None:
            cancel.cancel("timeout")
        raise
    except BaseException:  # the request task itself was cancelled (server shutting down)
        if cancel is not None:
            cancel.cancel("client disconnected")
        raise
    if not done:
        if cancel is not None:
            cancel.cancel("client disconnected")
        return None
    return future.result()


def start_in_slot(gate: Gate, executor, fn: Callable, *args) -> asyncio.Future:
    """Run `fn(*args)` in `executor` for a caller already holding a slot of `gate`; the slot is
    released when `fn` returns (whether or not anyone still waits for it)."""
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(executor, fn, *args)
    except BaseException:
        gate.release()
        raise

    def finished(f: asyncio.Future) -> None:
        gate.release()
        if not f.cancelled():
            f.exception()  # retrieved, so an abandoned failure is not reported as never retrieved

    future.add_done_callback(finished)
    return future


def track_running(app) -> Callable[[float], "CancelToken"]:
    """A factory of per-request cancel tokens that remembers every token while its work lives, and
    `app.state.cancel_running`, the graceful shutdown's last step: once the grace period is over,
    running work stops within a decoding step (503). Both servers use it, so both stop alike."""
    running: weakref.WeakSet[CancelToken] = weakref.WeakSet()
    app.state.cancel_running = lambda: [token.cancel(SHUTDOWN) for token in list(running)]

    def new_token(deadline: float) -> CancelToken:
        token = CancelToken(deadline)
        running.add(token)
        return token

    return new_token
