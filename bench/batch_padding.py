"""What batching prompts of similar length saves the benchmark runner (issue 19's full MMLU run).

A padded batch computes every row to its longest prompt's length. The benchmark takes MMLU's
questions round-robin over subjects (`compose.jobs.bench_questions`, so a stopped run leaves a
balanced sample), and neighbouring questions then differ a lot in length. This runs
`records.runner.run_stage` over the same questions two ways, alternately, on one model:

- before: 8 questions per backend call, in the round-robin order (`LENGTH_WINDOW = 1`);
- after: the runner's defaults: `QUESTIONS_PER_CALL` questions per call, reordered by prompt
  length within windows of `LENGTH_WINDOW`, which the backend sorts by token count and splits
  into forward passes of its batch size (8).

It prints, for each, the padded tokens over the real ones (from the tokenizer, so it is exact) and
the seconds per question, checks that both runs gave the same predictions, and ends with one
JSON line.

    .venv/bin/python bench/batch_padding.py [--model smollm2-135m] [--questions 256] [--repeats 2] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade_core.compose.jobs import bench_questions
from cascade_core.prompts import format_prompt
from cascade_core.records import runner
from cascade_core.records.runner import BenchPaths, run_stage
from cascade_core.types import Question


def padded_tokens(lengths: list[int], order: list[int], per_call: int, batch: int) -> int:
    """Tokens computed when `order` is cut into calls of `per_call`, each sorted by length and cut
    into forward passes of `batch` rows padded to their longest (what `HFBackend.score_options` does)."""
    total = 0
    for start in range(0, len(order), per_call):
        call = sorted(lengths[i] for i in order[start:start + per_call])
        total += sum(max(call[i:i + batch]) * len(call[i:i + batch]) for i in range(0, len(call), batch))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (the full run: auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the full run: 1 per worker)")
    args = parser.parse_args()

    import torch

    from models.hf import HFBackend

    torch.set_num_threads(args.threads)
    backend = HFBackend.from_packaged(args.model, device="cpu", dtype=args.dtype, quantization="none", batch_size=8)
    questions = bench_questions("mmlu").head(args.questions).reset_index(drop=True)
    prompts = [format_prompt(Question(text=r.question, options=tuple(r.options), subject=r.subject,
                                      answer=int(r.answer), qid=r.qid)) for r in questions.itertuples(index=False)]
    lengths = [len(backend.encode(p, multiple_choice=True)) for p in prompts]
    real = sum(lengths)
    chars = [len(p) for p in prompts]  # what the runner orders by
    ways = {"before": (8, 1), "after": (runner.QUESTIONS_PER_CALL, runner.LENGTH_WINDOW)}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    predictions: dict[str, np.ndarray] = {}
    default_window = runner.LENGTH_WINDOW
    try:
        for repeat in range(args.repeats):
            for way, (per_call, window) in ways.items():
                runner.LENGTH_WINDOW = window
                with tempfile.TemporaryDirectory() as tmp:
                    paths = BenchPaths.for_stage(Path(tmp) / "results", Path(tmp) / "features", "mmlu", args.model)
                    started = time.perf_counter()
                    records = run_stage(backend, args.model, questions, paths, batch_size=per_call)
                    seconds[way].append((time.perf_counter() - started) / len(questions))
                predictions[way] = records.set_index("qid").loc[questions["qid"], "prediction"].to_numpy()
                print(f"repeat {repeat + 1} {way}: {seconds[way][-1]:.3f} s/question", flush=True)
    finally:
        runner.LENGTH_WINDOW = default_window
    figures = {way: {"padded_over_real_tokens":
                     round(padded_tokens(lengths, runner.by_length(chars, window), per_call, 8) / real, 3),
                     "median_s_per_question": round(statistics.median(seconds[way]), 4)}
               for way, (per_call, window) in ways.items()}
    speedup = figures["before"]["median_s_per_question"] / figures["after"]["median_s_per_question"]
    same = int(np.sum(predictions["before"] == predictions["after"]))
    print(f"same prediction on {same} of {len(questions)} questions; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, dtype {backend.dtype}, {args.threads} thread(s)")
    print(json.dumps({"model": args.model, "questions": len(questions), "dtype": str(backend.dtype),
                      **{f"{way}_{k}": v for way, f in figures.items() for k, v in f.items()},
                      "speedup": round(speedup, 2),
                      "same_predictions": same}))


if __name__ == "__main__":
    main()
