"""Graders: whether an answer is right, and when two answers count as the same answer.

A dataset names one grader in its metadata (`dataset_registry`), so correctness is computed the
same way by the benchmark, the report and the app. Each grader is a pure function pair built on
one *key*: the part of an answer the grader looks at (the normalised text, the first number, the
option letter). `grade` compares the answer's key with the references; `equivalent(a, b)` is
`key(a) == key(b)`. That is what the label-free guarantee needs (`label_free`): two equivalent
answers are then graded alike against ANY reference, so "the cascade's answer is equivalent to
the last stage's" implies "it is right whenever the last stage is", and the accuracy lost
against the last stage can never exceed the share of non-equivalent answers.

- `exact`: normalised text equal to a reference (lower case, punctuation and the articles
  a/an/the dropped, white space collapsed: SQuAD's normalisation);
- `choices`: the same test against several accepted aliases (a dataset whose answers are lists);
- `numeric`: the first number in the answer (`-1,234.5`, `3/4` is 3) within `tolerance` of the
  reference's first number; an answer without a number is wrong. Equivalence is the same parsed
  number, not "within tolerance": closeness is not transitive, equality is;
- `mc`: the option letter (`B`, `b.`, `(B)`, `B. Paris`, or a 0-based index).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from cascade_core.types import OPTION_LETTERS

GRADER_NAMES = ("exact", "numeric", "choices", "mc")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[.):]|$|\s)")


def normalise_text(answer) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's `normalize_answer`)."""
    text = str(answer).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_number(answer) -> float | None:
    """The first number written in `answer` (thousands commas allowed), else None."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer) if math.isfinite(float(answer)) else None
    match = _NUMBER.search(str(answer))
    return None if match is None else float(match.group(0).replace(",", ""))


def option_letter(answer) -> str | None:
    """The option letter an answer gives: a letter at the start (`B`, `(b)`, `B. Paris`) or a
    0-based index (int); None when it gives none."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return OPTION_LETTERS[answer] if 0 <= answer < len(OPTION_LETTERS) else None
    match = _LETTER.match(str(answer))
    return match.group(1).upper() if match else None


@dataclass(frozen=True)
class Grader:
    """One grader: its name, its parameters and its key function (module docstring)."""

    name: str
    key: Callable[[object], Hashable]
    tolerance: float = 0.0

    def grade(self, answer, references: Sequence) -> bool:
        """True when `answer` matches one of `references` (a single reference may be given bare)."""
        refs = [references] if isinstance(references, (str, int, float)) else list(references)
        mine = self.key(answer)
        if mine is None:
            return False
        for ref in refs:
            theirs = self.key(ref)
            if theirs is None:
                continue
            if self.name == "numeric":
                if abs(mine - theirs) <= self.tolerance * max(1.0, abs(theirs)):
                    return True
            elif mine == theirs:
                return True
        return False

    def equivalent(self, a, b) -> bool:
        """True when `a` and `b` are graded alike against every reference (same key)."""
        return self.key(a) == self.key(b)

    def to_dict(self) -> dict:
        return {"name": self.name, "tolerance": self.tolerance} if self.name == "numeric" else {"name": self.name}


def _text_key(answer) -> str | None:
    text = normalise_text(answer)
    return text or None


def get_grader(name: str, tolerance: float = 1e-6) -> Grader:
    """The grader called `name`; `tolerance` (numeric only) is relative to the reference, at
    least absolute for references below 1 in size."""
    if name in ("exact", "choices"):
        return Grader(name, _text_key)
    if name == "numeric":
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"numeric tolerance must be a number >= 0, got {tolerance!r}")
        return Grader(name, first_number, float(tolerance))
    if name == "mc":
        return Grader(name, option_letter)
    raise ValueError(f"unknown grader {name!r}; graders: {', '.join(GRADER_NAMES)}")


def grader_from_dict(data: dict) -> Grader:
    """The grader a dataset's metadata stores (`Grader.to_dict`)."""
    return get_grader(str(data["name"]), float(data.get("tolerance", 1e-6)))


def default_grader(kind: str, references: Sequence[Sequence[str]]) -> str:
    """The grader a dataset gets unless it names one: `mc` for multiple choice; for free-form
    `choices` when some question accepts several answers, `numeric` when every answer is a
    number, else `exact` (also for a dataset without answers)."""
    if kind == "mc":
        return "mc"
    refs = [r for r in references if len(r)]
    if any(len(r) > 1 for r in refs):
        return "choices"
    if refs and all(_NUMBER.fullmatch(str(r[0]).strip()) for r in refs):
        return "numeric"
    return "exact"
