"""Question sets as one table shape: MMLU as shipped in data/mmlu/, and any user file.

Every loader returns a DataFrame with columns qid, subject, category, split, question,
options (list of strings), answer (0-based option index), so the benchmark, the probes and
the dashboard treat all datasets alike. `to_questions` turns rows into `types.Question`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cascade_core.compose.locations import DATA_DIR
from cascade_core.io import read_parquet_checked
from cascade_core.prompts import check_format
from cascade_core.split import SPLITS, assign_split, read_split_json, take_per_subject
from cascade_core.types import OPTION_LETTERS, Question

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
def _mmlu_table(path: str, split_path: str) -> pd.DataFrame:
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
    table = _mmlu_table(str(path), str(split_path))
    if split not in (None, "all") and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of: all, {', '.join(SPLITS)}")
    if subjects is not None:
        wanted = [subjects] if isinstance(subjects, str) else list(subjects)
        unknown = sorted(set(wanted) - set(table["subject"]))
        if unknown:
            raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(MMLU_SUBJECTS)}")
        table = table[table["subject"].isin(wanted)]
    if per_subject is not None:
        table = take_per_subject(table, per_subject)
    if split in SPLITS:
        table = table[table["split"] == split]
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


def _read_any(path: Path) -> pd.DataFrame:
    if path.is_dir():
        try:
            import datasets  # optional: only for folders saved with `datasets.save_to_disk`
        except ImportError:
            raise ValueError(
                f"{path} is a folder; reading a Hugging Face dataset folder needs the `datasets` "
                "package, or give a .csv, .jsonl, .json or .parquet file"
            ) from None
        data = datasets.load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict: take the test split, else the only one
            names = list(data.keys())
            data = data["test"] if "test" in names else data[names[0]] if len(names) == 1 else None
            if data is None:
                raise ValueError(f"{path} holds splits {names}; none is called 'test'")
        return data.to_pandas()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # keep_default_na=False: an option that reads "None" or "NA" stays that text.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        try:
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        except ValueError as err:
            raise ValueError(f"cannot read {path} as {'JSON lines' if suffix == '.jsonl' else 'JSON'}: {err}") from None
    if suffix == ".parquet":
        return read_parquet_checked(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .jsonl, .json, .parquet or a folder")


def _option_columns(frame: pd.DataFrame) -> list[str] | None:
    """Letter columns A, B, ... (any case, also option_a / answer_a / choice_a), in order."""
    lower = {str(c).lower(): c for c in frame.columns}
    for prefix in ("", "option_", "answer_", "choice_"):
        found = []
        for letter in OPTION_LETTERS.lower():
            if prefix + letter not in lower:
                break
            found.append(lower[prefix + letter])
        if len(found) >= 2:
            return found
    return None


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _options_of(raw, row: int) -> list[str]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError(f"row {row}: 'options' must be a list (or a JSON list in a CSV cell), got {raw[:60]!r}") from None
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"row {row}: 'options' must be a list, got {type(raw).__name__}")
    return ["" if o is None else str(o) for o in raw]


def _answer_index(value, n_options: int, row: int) -> int:
    """A letter (A, b, ' C ') or a 0-based index; anything else names the row and value."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and text.upper() in OPTION_LETTERS:
            index = OPTION_LETTERS.index(text.upper())
            if index >= n_options:
                raise ValueError(f"row {row}: answer {text!r} but the question has only {n_options} options")
            return index
        else:
            raise ValueError(f"row {row}: answer {value!r} is neither an option letter nor a 0-based index")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < n_options:
            raise ValueError(f"row {row}: answer index {int(value)} is outside 0..{n_options - 1}")
        return int(value)
    raise ValueError(f"row {row}: answer {value!r} is neither an option letter nor a 0-based index")


def load_question_file(
    path: Path | str, require_answer: bool = True, seed: int | None = None
) -> pd.DataFrame:
    """A question set from a CSV / JSONL / JSON / parquet file (or a `datasets` folder).

    Columns: `question`; the options as a list column `options` (a JSON list in a CSV) or as
    letter columns A, B, C, ... (also option_a.. / answer_a.. / choice_a..; empty trailing
    letters are dropped per row, so K may vary); `answer` as a letter or a 0-based index
    (optional with require_answer=False); `subject` and `qid` optional. Each row gets a
    calibration/test split by the same seeded per-subject method as MMLU.
    """
    from cascade_core.split import SPLIT_SEED

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such question file: {path}")
    raw = _read_any(path)
    found = list(map(str, raw.columns))
    if "question" not in raw.columns:
        raise ValueError(f"{path}: missing column 'question' (found: {found})")
    letters = None if "options" in raw.columns else _option_columns(raw)
    if "options" not in raw.columns and letters is None:
        raise ValueError(f"{path}: missing the options: give an 'options' list column or columns A, B, C, ... (found: {found})")
    if require_answer and "answer" not in raw.columns:
        raise ValueError(f"{path}: missing column 'answer' (a letter or a 0-based index; found: {found})")
    if raw.empty:
        raise ValueError(f"{path}: no rows")

    rows = []
    for i, record in enumerate(raw.to_dict("records")):
        row = i + 1  # 1-based, as a person counts rows
        if letters is not None:
            options = ["" if _is_missing(record[c]) else str(record[c]) for c in letters]
            while options and options[-1].strip() == "":
                options.pop()
        else:
            options = _options_of(record["options"], row)
        text = record["question"]
        question = Question(text="" if _is_missing(text) else str(text), options=tuple(options))
        try:
            check_format(question)
        except ValueError as err:
            raise ValueError(f"{path}: row {row}: {err}") from None
        if not question.options:
            raise ValueError(f"{path}: row {row}: no options")
        answer = record.get("answer")
        if _is_missing(answer):
            if require_answer:
                raise ValueError(f"{path}: row {row}: the answer is missing")
            index = -1
        else:
            try:
                index = _answer_index(answer, len(options), row)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        subject = record.get("subject")
        subject = "" if _is_missing(subject) else str(subject).strip()
        qid = record.get("qid")
        qid = f"{path.stem}/{i:05d}" if _is_missing(qid) else str(qid).strip()
        rows.append((qid, subject, mmlu_category(subject), question.text, options, index))

    frame = pd.DataFrame(rows, columns=["qid", "subject", "category", "question", "options", "answer"])
    duplicated = frame["qid"].duplicated()
    if duplicated.any():
        raise ValueError(f"{path}: qid {frame.loc[duplicated, 'qid'].iloc[0]!r} appears more than once")
    frame["split"] = assign_split(frame, SPLIT_SEED if seed is None else seed)["split"].to_numpy()
    frame["answer"] = frame["answer"].astype(np.int64)
    return frame[COLUMNS]


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
    "CATEGORIES", "COLUMNS", "MMLU_CATEGORIES", "MMLU_SUBJECTS", "load_mmlu", "load_question_file",
    "load_recorded_outcomes", "load_split", "mmlu_category", "to_questions",
]
