"""Load on the cascade server: N concurrent MMLU test questions against `python -m cascade_core serve`.

    .venv/bin/python bench/serve_load.py [--preset default] [--stages NAME ...] [--requests 64]
        [--concurrency 64] [--threads 1] [--max-in-flight 4] [--max-queue 64]

Starts the server on a free loopback port (its own process, torch limited to `--threads`), sends
`--requests` seeded MMLU test questions (in the documented message format) from `--concurrency`
client threads at once, and reports throughput (answers per second of wall time), client-side
latency p50/p95/p99 of the answered requests, the status counts, the server's own /metrics
(per-stage answers, escalation rates) and the accuracy of the answers. One JSON line last.

`--stages smollm2-135m` serves the default preset's first stage alone (the quick variant).
Questions the server must refuse (MMLU has some with repeated options or control characters)
are left out of the sample, so every status other than 200 is about load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_questions(n: int, seed: int) -> list[dict]:
    """`n` seeded MMLU test questions that pass the server's input checks, as request bodies."""
    from cascade_core.datasets import load_mmlu
    from cascade_core.prompts import validate_question
    from cascade_core.types import OPTION_LETTERS, Question

    table = load_mmlu(split="test")
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    bodies = []
    for i in order:
        row = table.iloc[i]
        question = Question(text=str(row["question"]), options=tuple(row["options"]), subject=str(row["subject"]))
        try:
            validate_question(question)
        except ValueError:
            continue
        lines = [question.text.strip()] + [f"{OPTION_LETTERS[k]}. {o.strip()}" for k, o in enumerate(question.options)]
        bodies.append({"messages": [{"role": "user", "content": "\n".join(lines)}],
                       "subject": question.subject, "_answer": OPTION_LETTERS[int(row["answer"])]})
        if len(bodies) == n:
            return bodies
    raise SystemExit(f"only {len(bodies)} usable MMLU test questions, asked for {n}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cascade_core", "serve", "--preset", args.preset, "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.threads), "--max-in-flight", str(args.max_in_flight),
           "--max-queue", str(args.max_queue), "--timeout-s", str(args.timeout_s)]
    if args.stages:
        cmd += ["--stages", *args.stages]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def wait_ready(proc: subprocess.Popen, url: str, limit_s: float, log_path: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {limit_s} s:\n{log_path.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--stages", nargs="+", metavar="NAME", help="serve only these stages of the preset")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)

    bodies = sample_questions(args.requests, args.seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = start_server(args, port, log)
            try:
                load_s = wait_ready(proc, url, args.ready_timeout_s, log_path)
                model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                rss_before = rss_mib(proc.pid)
                print(f"server ready in {load_s:.1f} s serving {model}; RSS {rss_before:.0f} MiB", file=sys.stderr)
                client = httpx.Client(base_url=url, timeout=args.timeout_s + 30,
                                      limits=httpx.Limits(max_connections=args.concurrency))

                def one(body: dict) -> tuple[int, float, str | None, str | None]:
                    payload = {k: v for k, v in body.items() if not k.startswith("_")} | {"model": model}
                    started = time.perf_counter()
                    try:
                        response = client.post("/v1/chat/completions", json=payload)
                    except httpx.HTTPError as err:
                        return -1, time.perf_counter() - started, None, type(err).__name__
                    seconds = time.perf_counter() - started
                    if response.status_code != 200:
                        return response.status_code, seconds, None, response.json()["error"]["message"][:120]
                    return 200, seconds, response.json()["choices"][0]["message"]["content"][:1], None

                wall_start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                    results = list(pool.map(one, bodies))
                wall = time.perf_counter() - wall_start
                metrics = httpx.get(f"{url}/metrics").json()
                health = httpx.get(f"{url}/health").json()
                rss_after = rss_mib(proc.pid)
                client.close()
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    statuses: dict[str, int] = {}
    for status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    answered = [(r, b) for r, b in zip(results, bodies) if r[0] == 200]
    latencies = np.array([r[1] for r, _ in answered])
    correct = sum(1 for r, b in answered if r[2] == b["_answer"])
    pct = {f"p{q}": float(np.percentile(latencies, q)) if latencies.size else None for q in (50, 95, 99)}
    errors = sorted({r[3] for r in results if r[3]})[:5]
    summary = {
        "benchmark": "serve_load", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, no GPU used",
        "preset": args.preset, "stages": args.stages, "model": model, "requests": args.requests,
        "concurrency": args.concurrency, "threads": args.threads, "max_in_flight": args.max_in_flight,
        "max_queue": args.max_queue, "server_load_s": round(load_s, 1), "wall_s": round(wall, 2),
        "statuses": statuses, "answered": len(answered),
        "throughput_answers_per_s": round(len(answered) / wall, 3) if wall > 0 else None,
        "latency_s": {k: (round(v, 3) if v is not None else None) for k, v in pct.items()},
        "accuracy_of_answered": round(correct / len(answered), 3) if answered else None,
        "server_latency_s": {k: metrics["latency_seconds"][k] for k in ("p50", "p95", "p99")},
        "stages_answered": {s: v["answered"] for s, v in metrics["stages"].items()},
        "escalation_rates": {s: v["escalation_rate"] for s, v in metrics["stages"].items()},
        "queues_drained": all(q["in_flight"] == 0 and q["waiting"] == 0 for q in health["queues"].values()),
        "rss_mib": {"before": round(rss_before), "after": round(rss_after)},
        "errors": errors,
    }
    print(f"{model}: {args.requests} requests, {args.concurrency} at once; statuses {statuses}")
    print(f"wall {wall:.1f} s, throughput {summary['throughput_answers_per_s']} answers/s")
    shown = {k: "-" if v is None else f"{v:.2f}" for k, v in pct.items()}
    print(f"latency (answered, client side) p50 {shown['p50']} s, p95 {shown['p95']} s, p99 {shown['p99']} s")
    print(f"answered by stage {summary['stages_answered']}, escalation rates {summary['escalation_rates']}")
    print(f"accuracy of the answers {summary['accuracy_of_answered']}; server RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
