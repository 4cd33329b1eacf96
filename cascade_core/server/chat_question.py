"""Chat messages -> a cascade `Question`: the documented multiple-choice format (docs/SERVING.md).

The question is the content of the last `user` message. It is multiple choice when

- the request body has `options` (a list of 2..26 strings): the message is the question text; or
- the message ends with option lines `A. ...`, `B. ...` (also `A) ...`), consecutive letters
  from A, at least two, optionally followed by a line `Answer:`; the text before them is the
  question.

Anything else is free-form. System and earlier messages are not part of the prompt: every stage
sees the project's own prompt format (`cascade_core.prompts`), the one its thresholds and probes
were chosen on.
"""

from __future__ import annotations

import re
from typing import Sequence

from cascade_core.prompts import validate_question
from cascade_core.types import OPTION_LETTERS, Question

_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)][ \t]+(.*\S)\s*$")
_ANSWER_CUE = re.compile(r"^\s*answer\s*:?\s*$", re.IGNORECASE)


def split_options(text: str) -> tuple[str, tuple[str, ...]]:
    """(question text, options) from a message; options empty when none are recognised."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").rstrip().split("\n")
    if lines and _ANSWER_CUE.match(lines[-1]):
        lines = lines[:-1]
    matches = []
    for line in reversed(lines):
        m = _OPTION_LINE.match(line)
        if not m:
            break
        matches.append(m)
    matches.reverse()
    letters = [m.group(1) for m in matches]
    # The longest run at the end that reads A, B, C, ... (a question line may itself look like "I. ...").
    for start in range(len(matches)):
        run = letters[start:]
        if len(run) >= 2 and run == list(OPTION_LETTERS[:len(run)]):
            body = "\n".join(lines[: len(lines) - len(run)])
            return body, tuple(m.group(2) for m in matches[start:])
    return "\n".join(lines), ()


def question_from_chat(
    messages: Sequence[dict],
    options: Sequence[str] | None = None,
    subject: str = "",
) -> Question:
    """The question the last user message asks, validated (ValueError names what is wrong)."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("no user message: the question is the content of the last message with role 'user'")
    text = users[-1].get("content") or ""
    if options is not None:
        question = Question(text=text.strip(), options=tuple(options), subject=subject)
    else:
        body, found = split_options(text)
        question = Question(text=body.strip(), options=found, subject=subject)
    return validate_question(question)
