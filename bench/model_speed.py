"""How fast each packaged model scores MMLU-length prompts, and what hidden states cost.

    .venv/bin/python bench/model_speed.py [KEY ...] [--device cpu] [--batch-sizes 1,4,16]

For each model (default: the default preset's three), prompt tokens per second of
`HFBackend.score_options` at batch 1 and at the best of a few batch sizes, on real MMLU prompts
(seeded sample; ~130-150 tokens), then the overhead of returning the hidden states of all layers
against none (target: at most 2 %). Times are the minimum over repeats, with and without hidden
states interleaved so that load from other processes hits both alike. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_KEYS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def mmlu_prompts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` seeded MMLU test prompts in the project's format (synthetic ones if the data is absent)."""
    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question

    try:
        from cascade_core.records.mmlu import load_mmlu, to_questions

        questions = to_questions(load_mmlu())
    except Exception as exc:  # noqa: BLE001 - the data is another part of the project; speed needs only text
        print(f"(MMLU not available: {exc}; using synthetic prompts)", file=sys.stderr)
        filler = "The committee reviewed the proposal and its budget over several meetings. "
        questions = [Question(filler * 6 + f"Which option is right ({i})?", ("one", "two", "three", "four"), "misc")
                     for i in range(n)]
    chosen = random.Random(seed).sample(questions, n)
    return [format_prompt(q) for q in chosen], [len(q.options) for q in chosen]


def timed(backend, prompts, n_options, layers, batch_size) -> float:
    began = time.perf_counter()
    backend.score_options(prompts, n_options, layers=layers, batch_size=batch_size)
    return time.perf_counter() - began


def bench_model(key: str, args, prompts: list[str], n_options: list[int]) -> dict:
    from models.hf import HFBackend

    began = time.perf_counter()
    backend = HFBackend.from_packaged(key, device=args.device, dtype=args.dtype, quantization=args.quantization)
    load_s = time.perf_counter() - began
    tokens = sum(len(backend.encode(p)) for p in prompts)
    print(f"\n{key}: {backend!r}, loaded in {load_s:.1f} s; {len(prompts)} prompts, "
          f"{tokens / len(prompts):.0f} tokens each on average", flush=True)
    timed(backend, prompts[:4], n_options[:4], [], 4)  # warm-up: allocator, kernels, caches

    rates = {}
    for size in args.batch_sizes:
        best = min(timed(backend, prompts, n_options, [], size) for _ in range(args.repeats))
        rates[size] = tokens / best
        print(f"  batch {size:3d}: {rates[size]:8.0f} prompt tokens/s  ({best / len(prompts) * 1e3:.0f} ms/prompt)",
              flush=True)
    best_size = max(rates, key=rates.get)

    overhead = {}
    for size in sorted({1, best_size}):
        plain, hidden = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            plain.append(timed(backend, prompts, n_options, [], size))
            hidden.append(timed(backend, prompts, n_options, None, size))
        overhead[size] = min(hidden) / min(plain) - 1.0
        print(f"  hidden states of all {backend.n_layers + 1} layers at batch {size}: "
              f"{overhead[size] * 100:+.1f} % time ({min(plain):.2f} s -> {min(hidden):.2f} s)", flush=True)

    return {
        "model": key, "device": str(backend.device), "dtype": str(backend.dtype).replace("torch.", ""),
        "quantization": backend.quantization, "total_params": backend.total_params,
        "non_embedding_params": backend.non_embedding_params, "load_s": round(load_s, 2),
        "prompts": len(prompts), "mean_prompt_tokens": round(tokens / len(prompts), 1),
        "tokens_per_s": {str(k): round(v, 1) for k, v in rates.items()},
        "batch1_tokens_per_s": round(rates.get(1, float("nan")), 1),
        "best_batch_size": best_size, "best_tokens_per_s": round(rates[best_size], 1),
        "hidden_state_overhead": {str(k): round(v, 4) for k, v in overhead.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("keys", nargs="*", default=DEFAULT_KEYS, help="packaged model keys")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompts", type=int, default=32, help="prompts per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine shared with another "
                             "torch process, use fewer threads than cores: oversubscribed threads spin and stall")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    prompts, n_options = mmlu_prompts(args.prompts, args.seed)
    results = [bench_model(key, args, prompts, n_options) for key in args.keys]
    summary = {
        "bench": "model_speed", "machine": platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
