"""`mmlu-open`: real MMLU test questions asked WITHOUT their options, graded against the right option's text.

Why: the packaged models are near chance on MMLU's letters, and most real traffic has no
options. A question whose right option is short (a number, or at most four words) has a natural
free-form answer: "What newspaper do Lois Lane and Clark Kent work for?" -> "The Daily Planet".
Asked without its options, the question is harder than the multiple-choice one (no guessing
among four), and its answer is graded by the dataset's grader, `choices`: the answer's
normalised text (lower case, no punctuation or articles, single spaces; `graders`) must equal
one of the question's accepted answers.

The stated rule (`eligibility`; each question gets the FIRST reason that excludes it, and
`selection.json` beside the file counts every reason):

1. `long_answer`: the right option has more than four words and is not a number;
2. `latex_answer`: the right option holds LaTeX markup (a backslash): its text is not what a
   model writes, and the normalised grader would compare `frac12` with `1/2`;
3. `refers_to_options`: the question only makes sense with its options: it says "which of the
   following / these / the above", "the following is / are / statements", "all / none of the
   following", "statement 1", "scenario 1", "option(s)", "choice(s)", "above", "below",
   "listed", or numbers its items in Roman numerals (I, II, III);
4. `several_blanks`: the question has two or more blanks (`__`): its options fill them as a list;
5. `option_reference`: the right option itself points at other options or is a verdict pair:
   "all / none / both / neither of the above", starts with all / none / both / neither, names
   options by letter ("A and B") or numeral ("I and II", "II only"), or is "True, False" /
   "Wrong, Not wrong";
6. `ambiguous_grading`: another option normalises to the same text as the right one (or the
   right one normalises to nothing), so the grader could not tell them apart.

Of the eligible questions, `MAX_QUESTIONS` are chosen, seeded and spread over the subjects:
each subject's eligible questions are ordered by SHA-256 of "<seed>:<qid>" (as `split` orders
MMLU), and rounds take the next question of every subject that has one (in a seeded subject
order) until the total is reached, so a subject with few eligible questions keeps them all and
the large ones (miscellaneous, elementary mathematics) do not dominate. The calibration / test
split is then made by `dataset_registry` like any file's: seeded, stratified by subject.

The prompt: the question, then "Answer with a short phrase or a number only." (`PROMPT`); the
benchmark adds the free-form header and the chat template (`prompts.format_prompt`). A question
keeps its MMLU id (`miscellaneous/0123`). The accepted answers are the right option's text and,
for an option that is a number followed by a unit ("67%", "1,000,000 J"), the bare number when
no other option has that number.

The file `data/mmlu_open/mmlu_open.jsonl` is derived data, reproducible byte for byte from
`data/mmlu/mmlu_test.parquet` (`python -m cascade_core.records.mmlu_open`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from cascade_core.graders import first_number, normalise_text

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "mmlu_open" / "mmlu_open.jsonl"
SUMMARY = SHIPPED.with_name("selection.json")
MMLU_PATH = ROOT / "data" / "mmlu" / "mmlu_test.parquet"
MAX_QUESTIONS = 1000
SEED = 20_2602  # fixed: the selection is data, not a draw per run
MAX_WORDS = 4
PROMPT = "{question}\nAnswer with a short phrase or a number only."
REASONS = ("long_answer", "latex_answer", "refers_to_options", "several_blanks", "option_reference",
           "ambiguous_grading")

_REFERS = re.compile(
    r"which (?:one )?of the (?:following|above|options|choices|statements|answers)|which of these|which of those"
    r"|the following (?:is|are|was|were|statements?|options?|choices?|would|could|best|most|does|do|can)"
    r"|(?:all|none|each|any|both) of the following|following statements?|\bstatement [12]\b|\bscenario [12]\b"
    r"|\boptions?\b|\bchoices?\b|\babove\b|\bbelow\b|\blisted\b|\bI\.\s|\bII\b|\bIII\b|\bIV\b",
    re.IGNORECASE)
_BLANK = re.compile(r"_{2,}")
_OPTION_REFERENCE = re.compile(
    r"\b(?:all|none|both|neither) of (?:the )?(?:above|these|those|them|options)\b|^(?:all|none|both|neither)\b"
    r"|^(?:I|II|III|IV)(?:\b|,)|\b[A-D] and [A-D]\b|\b(?:I|II|III|IV) (?:and|or) (?:I|II|III|IV)\b"
    r"|\([A-D]\)|^(?:true|false|wrong|not wrong)\s*,", re.IGNORECASE)
_ITEM_NUMBERS = re.compile(r"^\s*\d(?:\s*,\s*\d)+\s*$")
_NUMBER_WITH_UNIT = re.compile(  # "67%", "49°", "450 m", "0.656 mol/L"; not "42 million", "3 or more", "1970s"
    r"^\s*[-+$]?\d[\d,]*(?:\.\d+)?(?:\s*[%°]|\s+(?!(?:million|billion|thousand|trillion|hundred|times|or|and|to)\b)"
    r"[A-Za-zµΩ°][A-Za-zµΩ°/²³]*(?:\s+[A-Za-z/²³]+)?)\s*\.?\s*$")
_FULL_NUMBER = re.compile(r"^\s*[-+$]?\d[\d,]*(?:\.\d+)?\s*$")


def _is_number(text: str) -> bool:
    return bool(_FULL_NUMBER.match(text)) or bool(_NUMBER_WITH_UNIT.match(text))


def exclusion(question: str, options, answer: int) -> str | None:
    """The first rule (module docstring) that excludes this MMLU question, or None when it is eligible."""
    right = str(options[answer]).strip()
    if len(right.split()) > MAX_WORDS and not _is_number(right):
        return "long_answer"
    if "\\" in right:
        return "latex_answer"
    if _REFERS.search(question):
        return "refers_to_options"
    if len(_BLANK.findall(question)) >= 2:
        return "several_blanks"
    if _OPTION_REFERENCE.search(right) or (_ITEM_NUMBERS.match(right) and not re.search(r"\d", question)):
        return "option_reference"
    key = normalise_text(right)
    if not key or any(normalise_text(o) == key for i, o in enumerate(options) if i != answer):
        return "ambiguous_grading"
    return None


def accepted_answers(options, answer: int) -> list[str]:
    """The right option's text and, for a number with a unit, the bare number when no other option
    has that number (module docstring)."""
    right = str(options[answer]).strip()
    out = [right]
    if _NUMBER_WITH_UNIT.match(right) and not _FULL_NUMBER.match(right):
        value = first_number(right.lstrip("$"))
        others = {first_number(str(o).lstrip("$")) for i, o in enumerate(options) if i != answer}
        if value is not None and value not in others:
            bare = f"{value:g}" if not float(value).is_integer() else str(int(value))
            if normalise_text(bare) != normalise_text(right):
                out.append(bare)
    return out


def _order(text: str) -> str:
    return hashlib.sha256(f"{SEED}:{text}".encode("utf-8")).hexdigest()


def select(mmlu: pd.DataFrame, limit: int = MAX_QUESTIONS) -> tuple[list[dict], dict]:
    """(rows of the file, summary with the counts per exclusion reason) from the MMLU test table."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    reasons: Counter = Counter()
    eligible: dict[str, list] = {}
    for row in mmlu.itertuples(index=False):
        options = list(row.options)
        why = exclusion(str(row.question), options, int(row.answer))
        if why is not None:
            reasons[why] += 1
            continue
        eligible.setdefault(str(row.subject), []).append(row)
    for rows in eligible.values():
        rows.sort(key=lambda r: _order(str(r.qid)))
    subjects = sorted(eligible, key=_order)
    chosen, depth = [], 0
    while len(chosen) < limit and any(depth < len(v) for v in eligible.values()):
        for subject in subjects:
            if depth < len(eligible[subject]) and len(chosen) < limit:
                chosen.append(eligible[subject][depth])
        depth += 1
    chosen.sort(key=lambda r: str(r.qid))
    rows = [{"id": str(r.qid), "subject": str(r.subject),
             "question": PROMPT.format(question=" ".join(str(r.question).split())),
             "answer": accepted_answers(list(r.options), int(r.answer))} for r in chosen]
    n_eligible = sum(len(v) for v in eligible.values())
    summary = {
        "source": "data/mmlu/mmlu_test.parquet (MMLU test, 14,042 questions)", "seed": SEED,
        "max_words": MAX_WORDS, "prompt": PROMPT, "questions_in_mmlu": int(len(mmlu)),
        "excluded": {reason: int(reasons.get(reason, 0)) for reason in REASONS},
        "excluded_total": int(sum(reasons.values())), "eligible": int(n_eligible),
        "selected": len(rows), "subjects": len({r["subject"] for r in rows}),
        "per_subject": dict(sorted(Counter(r["subject"] for r in rows).items())),
        "with_number_alias": sum(len(r["answer"]) > 1 for r in rows),
    }
    return rows, summary


def write_mmlu_open(path: Path | str = SHIPPED, mmlu_path: Path | str = MMLU_PATH,
                    limit: int = MAX_QUESTIONS) -> tuple[Path, dict]:
    """Write the JSONL file (keys id, subject, question, answer: the accepted answers) and its
    `selection.json` summary beside it."""
    path = Path(path)
    rows, summary = select(pd.read_parquet(mmlu_path), limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path.with_name(SUMMARY.name).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path, summary


def read_summary(path: Path | str = SUMMARY) -> dict | None:
    """The committed selection summary (counts per exclusion rule), or None when it is absent."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    written, info = write_mmlu_open(sys.argv[1] if len(sys.argv) > 1 else SHIPPED)
    print(written, json.dumps({k: info[k] for k in ("excluded", "eligible", "selected", "subjects")}))
