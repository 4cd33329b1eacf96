"""The one prompt format every stage sees, and the checks a question must pass to be asked.

Every backend, the benchmark and the live cascade build prompts here, so a record made by
`bench` and an answer given live come from the same text. Change the format only together with
`PROMPT_FORMAT_VERSION`: records carry it, and records of two formats must not be mixed.

Multiple choice (zero-shot, as in the MMLU paper and lm-eval-harness, K = 2..26 options):

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {option 1}
    B. {option 2}
    ...
    Answer:

The model's answer is read from the next-token logits of the option letters. Without a subject
the first line is "The following are multiple choice questions (with answers)." A question
without options gets the free-form prompt (same shape, no option lines).

What is changed in the text (nothing else is): underscores in the subject become spaces;
leading and trailing whitespace of the subject, the question and each option is stripped;
Windows (\\r\\n) and old Mac (\\r) line ends become \\n. Inner text, inner newlines and the
dataset's own oddities (MMLU carries some mojibake) are kept verbatim, so benchmark prompts are
the published questions.
"""

from __future__ import annotations

import unicodedata

from cascade_core.types import MAX_OPTIONS, OPTION_LETTERS, Question

PROMPT_FORMAT_VERSION = "zero-shot-mc-v1"
MIN_OPTIONS = 2

_MC_HEADER = "The following are multiple choice questions (with answers)"
_FREE_HEADER = "The following is a question (with answer)"
_ALLOWED_CONTROLS = {"\n", "\t", "\r"}
# Categories that draw nothing on their own: format (Cf), control (Cc), surrogate (Cs),
# private use (Co), unassigned (Cn), combining marks (Mn, Me).
_INVISIBLE_CATEGORIES = {"Cf", "Cc", "Cs", "Co", "Cn", "Mn", "Me"}


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def subject_phrase(subject: str) -> str:
    """'high_school_us_history' -> 'high school us history' (the header's wording)."""
    return " ".join(_clean(subject).replace("_", " ").split())


def _header(base: str, subject: str) -> str:
    phrase = subject_phrase(subject)
    return f"{base} about {phrase}." if phrase else f"{base}."


def check_format(question: Question) -> None:
    """The checks without which no prompt can be built; raise ValueError naming the problem.

    Datasets pass only these: MMLU has questions with repeated options and mojibake control
    characters, and its prompts must stay the published text. User input gets
    `validate_question`, which adds the stricter checks.
    """
    if not isinstance(question.text, str) or not question.text.strip():
        raise ValueError("the question is empty (or only whitespace)")
    n = len(question.options)
    if n == 0:
        return
    if n < MIN_OPTIONS:
        raise ValueError(f"a multiple-choice question needs at least {MIN_OPTIONS} options, got {n}")
    if n > MAX_OPTIONS:
        raise ValueError(f"at most {MAX_OPTIONS} options (A-Z) are supported, got {n}")
    for i, option in enumerate(question.options):
        if not isinstance(option, str):
            raise ValueError(f"option {OPTION_LETTERS[i]} is not text: {option!r}")
        if not option.strip():
            raise ValueError(f"option {OPTION_LETTERS[i]} is empty (or only whitespace)")


def _control_characters(text: str) -> list[str]:
    """Control characters (C0, DEL, C1) and lone surrogates, other than tab and line ends."""
    bad = []
    for ch in text:
        if ch in _ALLOWED_CONTROLS:
            continue
        if unicodedata.category(ch) in ("Cc", "Cs"):
            bad.append(f"U+{ord(ch):04X}")
    return bad


def has_visible_text(text: str) -> bool:
    """True when `text` has a character a reader would see.

    Whitespace, format characters (zero-width space and joiners, direction overrides, the BOM:
    category Cf), controls, unassigned and private-use code points and lone combining marks show
    nothing by themselves; a question made only of those is empty to a reader but not to a model.
    """
    for ch in text:
        if ch.isspace():
            continue
        if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES:
            return True
    return False


def validate_question(question: Question) -> Question:
    """Check a question typed by a user (CLI, server, app); return it unchanged when it is fine.

    Beyond `check_format`: no control characters (tab and line ends are fine) in the question,
    the options or the subject, a visible character in the question and in every option, and no
    two options the same after stripping whitespace.
    """
    check_format(question)
    fields = [("the question", question.text), ("the subject", question.subject or "")]
    fields += [(f"option {OPTION_LETTERS[i]}", o) for i, o in enumerate(question.options)]
    for name, text in fields:
        if not isinstance(text, str):
            raise ValueError(f"{name} is not text: {text!r}")
        bad = _control_characters(text)
        if bad:
            raise ValueError(f"{name} contains control characters ({', '.join(sorted(set(bad)))})")
        if name != "the subject" and not has_visible_text(text):
            raise ValueError(f"{name} has no visible characters (only zero-width, direction-override or other "
                             "invisible characters)")
    seen: dict[str, int] = {}
    for i, option in enumerate(question.options):
        key = _clean(option)
        if key in seen:
            raise ValueError(
                f"options {OPTION_LETTERS[seen[key]]} and {OPTION_LETTERS[i]} are the same ({key!r})"
            )
        seen[key] = i
    return question


def format_prompt(question: Question) -> str:
    """The prompt for `question`: multiple choice when it has options, else free-form."""
    check_format(question)
    body = _clean(question.text)
    if not question.is_multiple_choice:
        return f"{_header(_FREE_HEADER, question.subject)}\n\n{body}\nAnswer:"
    lines = [f"{OPTION_LETTERS[i]}. {_clean(o)}" for i, o in enumerate(question.options)]
    return f"{_header(_MC_HEADER, question.subject)}\n\n{body}\n" + "\n".join(lines) + "\nAnswer:"
