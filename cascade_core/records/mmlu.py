"""MMLU as shipped in data/mmlu/, and the recorded outcomes on it.

`load_mmlu` returns a DataFrame with columns qid, subject, category, split, question, options
(list of strings), answer (0-based option index), the shape the benchmark, the probes and the
dashboard read; a user's question file has the same shape through `dataset_registry` (which
reads it with `question_files`). `to_questions` turns rows into `types.Question`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cascade_core.locations import DATA_DIR
from cascade_core.io import read_parquet_checked
from cascade_core.records.split import read_split_json, select_rows
from cascade_core.types import Question

MMLU_DIR = DATA_DIR / "mmlu"
MMLU_PATH = MMLU_DIR / "mmlu_test.parquet"
MMLU_SPLIT_PATH = MMLU_DIR / "split.json"
RECORDED_PATH = DATA_DIR / "recorded" / "routellm_mmlu.parquet"

COLUMNS = ["qid", "subject", "category", "split", "question", "options", "answer"]
CATEGORIES = ("STEM", "humanities", "social sciences", "other")

# The MMLU paper's grouping of its 57 subjects (hendrycks/test categories.py, also used by
# lm-eval-harness): subject -> subcategory -> one of four categories. The paper's fourth
# category is "other (business, health, misc.)"; here it is just "other".
_SUBCATEGORY_TO_CATEGORY = {
    "physics": "STEM", "chemistry": "STEM", "biology": "STEM", "computer science": "STEM",
    "math": "STEM", "engineering": "STEM",
    "history": "humanities", "philosophy": "humanities", "law": "humanities",
    "politics": "social sciences", "culture": "social sciences", "economics": "social sciences",
    "geography": "social sciences", "psychology": "social sciences",
    "other": "other", "business": "other", "health": "other",
}
MMLU_SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health", "college_biology": "biology",
    "college_chemistry": "chemistry", "college_computer_science": "computer science",
    "college_mathematics": "math", "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science", "high_school_european_history": "history",
    "high_school_geography": "geography", "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy", "machine_learning": "computer science",
    "management": "business", "marketing": "business", "medical_genetics": "health",
    "miscellaneous": "other", "moral_disputes": "philosophy", "moral_scenarios": "philosophy",
    "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law",
    "professional_medicine": "health", "professional_psychology": "psychology",
    "public_relations": "politics", "security_studies": "politics", "sociology": "culture",
    "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORIES = {s: _SUBCATEGORY_TO_CATEGORY[c] for s, c in MMLU_SUBCATEGORIES.items()}
MMLU_SUBJECTS = tuple(sorted(MMLU_CATEGORIES))


def mmlu_category(subject: str) -> str:
    """The MMLU category of a subject ('' for a subject that is not one of MMLU's 57)."""
    return MMLU_CATEGORIES.get(str(subject).strip().replace(" ", "_").lower(), "")


# ---------------------------------------------------------------------------------------- MMLU


@lru_cache(maxsize=2)
def mmlu_table(path: str, split_path: str) -> pd.DataFrame:
    """The whole MMLU table with each question's split and seeded rank, read once per file pair
    (cached: callers copy before they edit)."""
    table = read_parquet_checked(path, ["qid", "subject", "category", "question", "options", "answer"])
    split = read_split_json(split_path)
    merged = table.merge(split[["qid", "split", "rank"]], on="qid", how="left", validate="one_to_one")
    missing = merged["split"].isna()
    if missing.any() or len(split) != len(table):
        raise ValueError(
            f"the split file {split_path} does not match {path}: {int(missing.sum())} questions have "
            f"no split and the file lists {len(split)} ids for {len(table)} questions; rebuild it "
            "with data/build_data.py"
        )
    merged["options"] = [list(o) for o in merged["options"]]
    merged["answer"] = merged["answer"].astype(np.int64)
    merged["rank"] = merged["rank"].astype(np.int64)
    return merged


def load_mmlu(
    split: str | None = None,
    per_subject: int | None = None,
    subjects: Iterable[str] | None = None,
    path: Path | str = MMLU_PATH,
    split_path: Path | str = MMLU_SPLIT_PATH,
) -> pd.DataFrame:
    """MMLU's 14,042 test questions, or a part of them, in the source file's order.

    `split`: None or "all" for both halves, else "calibration" or "test". `per_subject`: the
    first N of each subject's seeded order (N/2 from each half; a larger N extends a smaller
    one); it picks the questions before `split` filters them, so the test part of
    `per_subject=10` is the test half of the same 10. `subjects`: MMLU subject names.
    """
    table = select_rows(mmlu_table(str(path), str(split_path)), split, per_subject, subjects,
                        lambda unknown: ValueError(f"unknown MMLU subject(s) {unknown}; known: "
                                                   f"{', '.join(MMLU_SUBJECTS)}"))
    out = table[COLUMNS].reset_index(drop=True).copy()
    out["options"] = [list(o) for o in out["options"]]  # callers may edit; the cache stays whole
    return out


def load_split(path: Path | str = MMLU_SPLIT_PATH) -> dict[str, str]:
    """qid -> "calibration" | "test" for MMLU, as written in data/mmlu/split.json."""
    frame = read_split_json(path)
    return dict(zip(frame["qid"], frame["split"]))


def load_recorded_outcomes(path: Path | str = RECORDED_PATH) -> pd.DataFrame:
    """RouteLLM's recorded MMLU outcomes (qid, subject, mixtral_correct, gpt4_correct, token counts)."""
    return read_parquet_checked(
        path, ["qid", "subject", "mixtral_correct", "gpt4_correct", "gpt4_prompt_tokens"]
    )


# ------------------------------------------------------------------------------ any other file


def to_questions(frame: pd.DataFrame) -> list[Question]:
    """Rows of a question table -> `Question`s (answer -1, meaning unknown, becomes None)."""
    missing = [c for c in ("question", "options") if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; found {list(frame.columns)}")
    n = len(frame)
    qids = frame["qid"].astype(str).tolist() if "qid" in frame.columns else [""] * n
    subjects = frame["subject"].fillna("").astype(str).tolist() if "subject" in frame.columns else [""] * n
    answers = frame["answer"].tolist() if "answer" in frame.columns else [None] * n
    out = []
    for qid, subject, text, options, answer in zip(qids, subjects, frame["question"], frame["options"], answers):
        known = answer is not None and not (isinstance(answer, float) and np.isnan(answer)) and int(answer) >= 0
        out.append(Question(text=str(text), options=tuple(str(o) for o in options), subject=subject,
                            answer=int(answer) if known else None, qid=qid))
    return out


__all__: Sequence[str] = [
    "CATEGORIES", "COLUMNS", "MMLU_CATEGORIES", "MMLU_SUBJECTS", "load_mmlu",
    "load_recorded_outcomes", "load_split", "mmlu_category", "mmlu_table", "to_questions",
]
