"""What a hostile request body costs the server's event loop, per megabyte (issue 23, item 2).

    .venv/bin/python bench/body_cost.py [--sizes 1000000 250000] [--repeats 3]

Runs the cascade app (the real `create_cascade_app`, its one stage never reached: every body here
is refused or answered before a model would run) under uvicorn on a free loopback port, in this
process, with a loop-lag monitor inside the server's event loop: a task that sleeps 1 ms at a time
and records how late it wakes. A late wake-up is time the loop could not serve anyone (/health
included), whatever held it: code on the loop, or the GIL held by the body-parsing threads.

For each hostile body (the issue's unterminated string of `\\"`, its `\\\\\\"` twin, 64-deep
nesting repeated, a million small floats, 4,300-digit integers, tens of thousands of messages,
surrogate escapes, ...) at each size, it posts the body `--repeats` times while another client
polls /health (a second pass: the first runs without the poller, so that the loop's CPU time is
the body's alone), and reports per body: the status, the server's answer time, the CPU time of
the loop's thread (less the same stretch idle) and the longest loop stall, both per MB, and the
slowest /health. `--inline` parses on the loop as the servers did before, for comparison. The loop's
CPU time is what the body itself costs the loop; the stalls add what the machine does to it (GIL
hand-overs to the parsing threads, other processes on a shared machine). The old regex scan is timed
offline on the issue's body at 24 KB for comparison. One JSON line last: the worst per-MB figures.

No timing assertion lives in the tests; this is where the figure is measured (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import uvicorn

from cascade_core.cascade import RuntimeStage
from cascade_core.server.cascade_app import create_cascade_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _loopback import free_port


class NeverCalled:
    """The stage's backend: no body in this bench reaches a model."""

    model_id = "never-called"
    has_hidden_states = False
    total_params = non_embedding_params = 0

    def score_options(self, *args, **kwargs):
        raise AssertionError("a hostile body reached the model")

    generate = score_options


def fill(prefix: bytes, unit: bytes, suffix: bytes, size: int) -> bytes:
    """`prefix + unit * n + suffix` of at most `size` bytes."""
    n = max(1, (size - len(prefix) - len(suffix)) // len(unit))
    return prefix + unit * n + suffix


def bodies(size: int) -> dict[str, bytes]:
    msg = b'{"role":"user","content":"x"},'
    return {
        "unterminated string of \\\" (issue 23)": fill(b'{"a":"', b'\\"', b"", size),
        "unterminated string of \\\\\\\"": fill(b'{"a":"', b'\\\\\\"', b"", size),
        "64-deep nesting, repeated": fill(b'{"a":[', b"[" * 63 + b"]" * 63 + b",", b"1]}", size),
        "small floats": fill(b'{"a":[', b"1.5,", b"1]}", size),
        "4,300-digit integers": fill(b'{"a":[', b"9" * 4300 + b",", b"1]}", size),
        # valid bodies end in "n": 2, refused only after the whole body is parsed and validated
        "tiny messages (pydantic per message)": fill(b'{"messages":[', msg, b'{"role":"user","content":"x"}],"n":2}',
                                                     size),
        "surrogate pairs as escapes": fill(b'{"messages":[{"role":"user","content":"', b"\\ud83d\\ude00", b'"}],"n":2}',
                                           size),
        "lone surrogate at the end": fill(b'{"messages":[{"role":"user","content":"', b"\\u00e9", b'\\ud800"}]}', size),
        "many keys": fill(b"{", b'"k":1,', b'"z":1}', size),
        "one huge prompt": fill(b'{"messages":[{"role":"user","content":"', b"x", b'"}]}', size),
        "invalid UTF-8 at the end": fill(b'{"a":"', b"x", b'\xff"}', size),
        "whitespace": fill(b"", b" ", b"{}", size),
        "brackets in strings": fill(b'{"a":"', b"[[[{{{", b'"}', size),
    }


class Monitor:
    """Loop-lag monitor, run inside the server's loop: the stalls in a time window (`window`) and
    the CPU time of the loop's thread (`loop_cpu`, readable from any thread)."""

    def __init__(self):
        self.stalls: list[tuple[float, float]] = []  # (when it woke, how late)
        self.lock = threading.Lock()
        self.clock: int | None = None

    def loop_cpu(self) -> float:
        return time.clock_gettime(self.clock)

    async def run(self):
        self.clock = time.pthread_getcpuclockid(threading.get_ident())
        tick = 0.001
        while True:
            before = time.perf_counter()
            await asyncio.sleep(tick)
            now = time.perf_counter()
            late = now - before - tick
            if late > 0.0005:
                with self.lock:
                    self.stalls.append((now, late))

    def window(self, start: float, end: float) -> tuple[float, float]:
        with self.lock:
            inside = [late for when, late in self.stalls if start <= when <= end + 0.05]
        return (max(inside, default=0.0), sum(inside))


def old_regex_seconds(size: int) -> float:
    """The replaced scan (`_JSON_STRING.sub`) on the issue's body, for comparison."""
    old = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
    body = fill(b'{"a":"', b'\\"', b"", size)
    started = time.perf_counter()
    old.sub(b'""', body)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 250_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inline", action="store_true",
                        help="parse on the event loop, as before issue 23 (less the old regex), for comparison")
    args = parser.parse_args()
    if args.inline:
        import cascade_core.server.common as common

        async def on_the_loop(fn, *a):
            return fn(*a)

        common.off_loop = on_the_loop

    app = create_cascade_app({"bench": [RuntimeStage("never-called", NeverCalled())]},
                             max_body_bytes=max(args.sizes) + 1000)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    monitor = Monitor()

    async def serve():
        watch = asyncio.create_task(monitor.run())
        await server.serve()
        watch.cancel()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    while not server.started or monitor.clock is None:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"

    health_worst = [0.0]
    polling, stop = threading.Event(), threading.Event()

    def poll_health():
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                if not polling.wait(0.05):
                    continue
                started = time.perf_counter()
                client.get("/health").raise_for_status()
                health_worst[0] = max(health_worst[0], time.perf_counter() - started)
                time.sleep(0.005)

    def post(client, body) -> tuple[int, float, float, float]:
        """(status, seconds, loop CPU seconds beyond idle, longest stall) of one request."""
        start, cpu = time.perf_counter(), monitor.loop_cpu()
        reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        end = time.perf_counter()
        time.sleep(0.06)  # let the monitor see the tail
        used = monitor.loop_cpu() - cpu
        idle_cpu = monitor.loop_cpu()
        time.sleep(end - start + 0.06)  # the same stretch with no request: the monitor's own ticks
        idle = monitor.loop_cpu() - idle_cpu
        longest, _ = monitor.window(start, end)
        return reply.status_code, end - start, max(used - idle, 0.0), longest

    rows = []
    idle_noise = 0.0
    with httpx.Client(base_url=url, timeout=600) as client:
        client.post("/v1/chat/completions", content=b"{}")  # warm the parser threads
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        for size in args.sizes:
            for name, body in bodies(size).items():
                mb = len(body) / 1e6
                for _ in range(args.repeats):
                    polling.clear()  # the loop's CPU time without the poller's requests in it
                    status, seconds, cpu, longest = post(client, body)
                    quiet_start = time.perf_counter()
                    time.sleep(0.2)
                    idle_noise = max(idle_noise, monitor.window(quiet_start, time.perf_counter() - 0.05)[0])
                    polling.set()  # then again with /health polled all the while
                    health_worst[0] = 0.0
                    post(client, body)
                    time.sleep(0.02)
                    rows.append({"body": name, "bytes": len(body), "status": status,
                                 "answer_ms": round(seconds * 1e3, 2),
                                 "loop_cpu_ms_per_mb": round(cpu * 1e3 / mb, 2),
                                 "longest_stall_ms_per_mb": round(longest * 1e3 / mb, 2),
                                 "health_worst_ms": round(health_worst[0] * 1e3, 2)})
        stop.set()
        poller.join()
    server.should_exit = True
    thread.join(timeout=10)

    print(f"{'body':<40} {'bytes':>9} {'status':>6} {'answer ms':>10} {'loop CPU ms/MB':>14} {'stall ms/MB':>12} "
          f"{'/health ms':>10}")
    for r in rows:
        print(f"{r['body']:<40} {r['bytes']:>9} {r['status']:>6} {r['answer_ms']:>10} {r['loop_cpu_ms_per_mb']:>14} "
              f"{r['longest_stall_ms_per_mb']:>12} {r['health_worst_ms']:>10}")
    old = old_regex_seconds(24_000)
    print(f"old regex scan, issue 23's body at 24 KB: {old:.2f} s (offline, for comparison)")
    worst_cpu = max(rows, key=lambda r: r["loop_cpu_ms_per_mb"])
    worst_longest = max(rows, key=lambda r: r["longest_stall_ms_per_mb"])
    print(json.dumps({
        "worst_loop_cpu_ms_per_mb": worst_cpu["loop_cpu_ms_per_mb"],
        "worst_loop_cpu_body": f"{worst_cpu['body']} ({worst_cpu['bytes']} bytes)",
        "worst_longest_stall_ms_per_mb": worst_longest["longest_stall_ms_per_mb"],
        "worst_longest_stall_body": f"{worst_longest['body']} ({worst_longest['bytes']} bytes)",
        "health_worst_ms": max(r["health_worst_ms"] for r in rows),
        "idle_longest_stall_ms": round(idle_noise * 1e3, 2),  # the machine's own noise, no request in flight
        "parsing": "on the event loop (--inline)" if args.inline else "off the event loop",
        "statuses": sorted({r["status"] for r in rows}),
        "bodies": len(rows), "old_regex_24kb_s": round(old, 2),
        "python": platform.python_version(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
