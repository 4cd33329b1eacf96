"""One question through the cascade in a worker thread, so that the Route page can stop it.

Streamlit runs a page in one script thread and stops it at the script's next Streamlit call when
the user clicks anything (the Route page's Cancel button, or Route again). A forward pass or a
generation makes no Streamlit call, so run in the script thread it went on to its end: a
free-form "repeat" question held the model for 104 s with no way out (issue 22). Here the cascade
runs in a worker thread with the server's cancellation flag (`server.queue.CancelToken`:
`run_cascade` checks it before every stage, the local backends at every decoding step); the script
thread only draws what the worker reports, ticking every `poll_s` so that a click stops it
promptly, and cancels the flag when it is stopped (`follow`'s caller does so in a `finally`; the
Cancel button's callback also cancels it directly, from the run the click starts).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from cascade_core.cascade import CascadeCancelled, CascadeError, RuntimeStage, run_cascade
from cascade_core.server.queue import CancelToken
from cascade_core.types import Question, Trace

USER_CANCELLED = "cancelled by the user"
PAGE_LEFT = "the page reran before the answer came"


@dataclass
class Event:
    """What the worker reports: `kind` is "start" (a stage begins; `value`: whether its model must
    load first), "loaded" (`value`: the seconds the load took), "text" (`value`: a piece of the
    streamed free-form answer), "done" / "error" (`value`: the stage's StageStep), "tick" (nothing
    new within `poll_s`) or "end" (`value`: a `Finished`)."""

    kind: str
    stage: RuntimeStage | None = None
    value: object = None


@dataclass
class Finished:
    trace: Trace | None
    failure: str | None
    cancelled: bool = False


class LiveRun:
    """`run_cascade(stages, question)` in a daemon thread, its events in a queue, stoppable by `cancel`."""

    def __init__(self, stages: Sequence[RuntimeStage], question: Question, max_new_tokens: int = 64):
        self.stages, self.question, self.max_new_tokens = list(stages), question, max_new_tokens
        self.token = CancelToken()
        self.started = time.perf_counter()
        # What the page's script thread left when Streamlit stopped it (`partial`), and when it had.
        # With runner.fastReruns (the default) a click starts the next script run at once, in another
        # thread, while the stopped one is still unwinding; a value that thread assigns to
        # st.session_state then is lost, so it is put here and the next run waits for `page_done`.
        self.partial: dict | None = None
        self.page_done = threading.Event()
        self._events: "queue.Queue[Event]" = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cascade-route", daemon=True)

    def start(self) -> "LiveRun":
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self, reason: str = USER_CANCELLED) -> None:
        """Stop the run: before the next stage, or within one decoding step of a generation."""
        self.token.cancel(reason)

    def join(self, timeout_s: float | None = None) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _work(self) -> None:
        put = self._events.put

        def on_event(event: str, stage: RuntimeStage, step) -> None:
            if event != "start":
                put(Event(event, stage, step))
                return
            lazy = getattr(stage.backend, "loaded", True) is False
            put(Event("start", stage, lazy))
            if lazy:
                began = time.perf_counter()
                try:
                    stage.backend.get()
                except Exception:  # noqa: BLE001 - raised again inside the stage: its error row, as any failure
                    return
                put(Event("loaded", stage, time.perf_counter() - began))

        try:
            trace = run_cascade(self.stages, self.question, on_event=on_event, max_new_tokens=self.max_new_tokens,
                                cancel=self.token, on_text=lambda delta: put(Event("text", None, delta)),
                                stream_every_stage=True)  # each stage's answer grows in its own card
            finished = Finished(trace, None)
        except CascadeCancelled as err:
            finished = Finished(err.trace, self.token.reason or USER_CANCELLED, cancelled=True)
        except CascadeError as err:
            finished = Finished(err.trace, str(err))
        except ValueError as err:
            finished = Finished(None, str(err))
        except Exception as err:  # noqa: BLE001 - shown on the page, never lost in a thread
            finished = Finished(None, f"{type(err).__name__}: {err}")
        put(Event("end", None, finished))

    def follow(self, poll_s: float = 0.2) -> Iterator[Event]:
        """The worker's events as they come, a "tick" when none came within `poll_s`, until "end"."""
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                yield Event("tick")
                continue
            yield event
            if event.kind == "end":
                return

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
