"""Running a server app under uvicorn: graceful shutdown and bounds on half-open connections.

`serve_app` is what `python -m cascade_core serve` runs (both servers). On SIGTERM or Ctrl-C:

1. the app drains (`app.state.drain`): every model is marked unavailable, so requests waiting in
   a queue, and new requests on connections already open, get 503 with `Retry-After`;
2. uvicorn stops accepting connections (new clients are refused) and lets running requests
   finish for up to `grace_s` seconds;
3. past the grace period the remaining requests are cancelled: their model work stops within one
   decoding step (the request's CancelToken), and the process exits 0.

A connection must send its request headers within `header_timeout_s` of opening (and of its
previous response), or it is closed: 1,000 clients that connect and send nothing no longer hold
1,000 sockets forever (issue 23). An idle keep-alive connection closes after `idle_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request's headers arrived: it is being answered

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers, too, must come in time

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app (`app.state.drain`) before its own graceful shutdown and
    cancelling the app's running work (`app.state.cancel_running`) after `grace_s`. uvicorn's own
    cancellation of the request tasks stays as a backstop a few seconds later."""

    def __init__(self, config: uvicorn.Config, app, grace_s: float = 10.0):
        super().__init__(config)
        self._app, self._grace_s = app, grace_s

    async def shutdown(self, sockets=None) -> None:
        state = getattr(self._app, "state", None)
        drain, cancel_running = getattr(state, "drain", None), getattr(state, "cancel_running", None)
        if drain is not None:
            drain("the server is shutting down")
        timer = asyncio.get_running_loop().call_later(self._grace_s, cancel_running) if cancel_running else None
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, except that a SIGTERM it drained for is not raised again at the end: the
        process exits 0 after a graceful shutdown (Ctrl-C still ends as an interrupt)."""
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def server_config(app, host: str, port: int, log_level: str = "warning", grace_s: float = 10.0,
                  header_timeout_s: float = 10.0, idle_timeout_s: float = 5.0) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=header_timeout_protocol(header_timeout_s),
                          timeout_keep_alive=idle_timeout_s, timeout_graceful_shutdown=grace_s + 5.0)


def serve_app(app, host: str, port: int, log_level: str = "warning", grace_s: float = 10.0,
              header_timeout_s: float = 10.0, idle_timeout_s: float = 5.0) -> None:
    """Run `app` until SIGTERM / Ctrl-C, then shut down gracefully (module docstring)."""
    config = server_config(app, host, port, log_level, grace_s, header_timeout_s, idle_timeout_s)
    DrainingServer(config, app, grace_s).run()
