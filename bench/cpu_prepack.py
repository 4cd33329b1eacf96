"""float32 on a CPU: plain nn.Linear against oneDNN layers with prepacked weights
(`models.hf.prepack_linear_layers`, on by default where the dtype is float32).

For each packaged model: the same MMLU test questions scored one at a time (as the app and the
servers do), with and without prepacking, each model loaded once per mode; seconds per question
(median, after the background packing finished), the largest difference of the option-letter logits,
whether the chosen letter is the same, and a 16-token greedy generation's seconds per token.

    .venv/bin/python bench/cpu_prepack.py [--models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]
                                          [--questions 8] [--threads 2]

Prints one line per model and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(key: str, prepack: bool, prompts: list[str], n_options: list[int]) -> dict:
    from models.hf import HFBackend

    started = time.perf_counter()
    backend = HFBackend.from_packaged(key, dtype="float32", quantization="none", progress=False, cpu_prepack=prepack)
    backend.wait_prepacked()
    ready_s = time.perf_counter() - started
    backend.score_options(prompts[:1], n_options[:1], layers=[])  # first call: one-time set-up
    seconds, logits = [], []
    for prompt, n in zip(prompts, n_options):
        started = time.perf_counter()
        logits.append(backend.score_options([prompt], [n], layers=[])[0].letter_logits)
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    generated = backend.generate("Name three prime numbers.", max_new_tokens=16)
    per_token = (time.perf_counter() - started) / max(1, len(generated.token_logprobs))
    out = {"s_per_question": statistics.median(seconds), "logits": logits, "s_per_token": per_token, "ready_s": ready_s,
           "prepacked_layers": backend.prepacked_layers}
    del backend
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from cascade_core.records.mmlu import load_mmlu
    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question

    torch.set_num_threads(args.threads)
    frame = load_mmlu(split="test").sample(args.questions, random_state=0)
    questions = [Question(text=r["question"], options=tuple(r["options"]), subject=r["subject"])
                 for _, r in frame.iterrows()]
    prompts, n_options = [format_prompt(q) for q in questions], [len(q.options) for q in questions]
    summary: dict = {"threads": args.threads, "questions": len(prompts)}
    for key in args.models.split(","):
        plain = measure(key, False, prompts, n_options)
        packed = measure(key, True, prompts, n_options)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(plain["logits"], packed["logits"]))
        same = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(plain["logits"], packed["logits"]))
        speedup = plain["s_per_question"] / packed["s_per_question"]
        print(f"{key}: {plain['s_per_question']:.3f} -> {packed['s_per_question']:.3f} s per question "
              f"({speedup:.2f}x, {packed['prepacked_layers']} layers packed); generation "
              f"{plain['s_per_token']:.3f} -> {packed['s_per_token']:.3f} s per token; largest logit difference "
              f"{diff:.2e}; same letter on {same}/{len(prompts)}; load + packing {plain['ready_s']:.1f} -> "
              f"{packed['ready_s']:.1f} s (the packing runs in the background after the load)")
        summary[key] = {"plain_s": round(plain["s_per_question"], 3), "prepacked_s": round(packed["s_per_question"], 3),
                        "speedup": round(speedup, 2), "plain_s_per_token": round(plain["s_per_token"], 4),
                        "prepacked_s_per_token": round(packed["s_per_token"], 4), "max_logit_diff": diff,
                        "same_letter": same, "plain_ready_s": round(plain["ready_s"], 1),
                        "prepacked_ready_s": round(packed["ready_s"], 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
