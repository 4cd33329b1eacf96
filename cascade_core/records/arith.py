"""`arith`: the ten arithmetic tasks of the GPT-3 paper, as free-form questions with exact answers.

Brown et al. 2020 ("Language Models are Few-Shot Learners", section 3.9.1) test addition and
subtraction of two k-digit numbers (2D+, 2D-, 3D+, 3D-, 4D+, 4D-, 5D+, 5D-), multiplication of two
2-digit numbers (2Dx) and one-digit composite operations (1DC: three numbers of one digit, two
operations, parentheses), operands drawn uniformly from [0, 10^k) as in the paper. These
questions are SYNTHETIC: drawn with a fixed seed by `arith_rows`, so the shipped file
`data/arith/arith.jsonl` is reproducible byte for byte (`python -m cascade_core.records.arith`).

Why this set: the packaged small models are near chance on MMLU, so nothing routes there; on
arithmetic they are competent at some levels and not at others, and their free-form confidence
separates right from wrong answers, so a cascade has something to route. The task is the group
(`subject`): the calibration/test split is stratified by it, and the grader is `numeric` with no
tolerance (the first number in the answer must equal the result).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TASKS: tuple[str, ...] = ("2D+", "2D-", "3D+", "3D-", "4D+", "4D-", "5D+", "5D-", "2Dx", "1DC")
SEED = 20201  # fixed: the file is data, not a draw per run
PER_TASK = 100
PROMPT = "What is {expression}? Answer with the number only."
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "arith" / "arith.jsonl"


def _expression(task: str, rng: random.Random) -> tuple[str, int]:
    """One question of `task`: (the expression as asked, its value)."""
    if task == "1DC":
        a, b, c = (rng.randrange(10) for _ in range(3))
        inner, outer = rng.choice("+-*"), rng.choice("+-*")
        value = {"+": b + c, "-": b - c, "*": b * c}[inner]
        value = {"+": a + value, "-": a - value, "*": a * value}[outer]
        return f"{a} {outer} ({b} {inner} {c})", value
    digits = int(task[0])
    op = task[2]
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    return f"{a} {'*' if op == 'x' else op} {b}", value


def arith_rows(per_task: int = PER_TASK, seed: int = SEED) -> list[dict]:
    """`per_task` questions for each task, one seeded stream, duplicates within a task drawn again."""
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1, got {per_task}")
    rng = random.Random(seed)
    rows: list[dict] = []
    for task in TASKS:
        seen: set[str] = set()
        while len(seen) < per_task:
            expression, value = _expression(task, rng)
            if expression in seen:
                continue
            seen.add(expression)
            rows.append({"id": f"arith-{task}-{len(seen):03d}", "question": PROMPT.format(expression=expression),
                         "answer": str(value), "subject": task})
    return rows


def write_arith_file(path: Path | str = SHIPPED, per_task: int = PER_TASK, seed: int = SEED) -> Path:
    """Write the JSONL file (one question per line, keys id, question, answer, subject)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in arith_rows(per_task, seed))
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_arith_file(sys.argv[1] if len(sys.argv) > 1 else SHIPPED))
