"""The one prompt format: exact text, K options, free-form, and the checks on user input."""

import pytest

from cascade_core.prompts import PROMPT_FORMAT_VERSION, check_format, format_prompt, validate_question
from cascade_core.types import Question


def test_four_option_prompt_is_exactly_the_mmlu_zero_shot_format():
    q = Question(text="What is 2 + 2?", options=("3", "4", "5", "22"), subject="elementary_mathematics")
    assert format_prompt(q) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )


def test_no_subject_and_k_options():
    q = Question(text="Pick one.", options=("x", "y"))
    assert format_prompt(q) == (
        "The following are multiple choice questions (with answers).\n\nPick one.\nA. x\nB. y\nAnswer:"
    )
    many = Question(text="Which letter?", options=tuple(f"option {i}" for i in range(26)))
    text = format_prompt(many)
    assert text.endswith("Y. option 24\nZ. option 25\nAnswer:")
    assert text.count("\n") == 2 + 1 + 26


def test_free_form_prompt():
    assert format_prompt(Question(text="Who wrote Hamlet?", subject="literature")) == (
        "The following is a question (with answer) about literature.\n\nWho wrote Hamlet?\nAnswer:"
    )
    assert format_prompt(Question(text="Who wrote Hamlet?")).startswith("The following is a question (with "
                                                                        "answer).\n\n")


def test_documented_cleaning_only():
    q = Question(text="  Line one\r\nline two  ", options=(" a ", "b\n"), subject="  us_foreign_policy ")
    assert format_prompt(q) == (
        "The following are multiple choice questions (with answers) about us foreign policy.\n\n"
        "Line one\nline two\nA. a\nB. b\nAnswer:"
    )


@pytest.mark.parametrize(
    "question, message",
    [
        (Question(text=""), "empty"),
        (Question(text=" \n\t "), "empty"),
        (Question(text="Q?", options=("only one",)), "at least 2 options"),
        (Question(text="Q?", options=tuple(str(i) for i in range(27))), "at most 26"),
        (Question(text="Q?", options=("a", "  ")), "option B is empty"),
    ],
)
def test_format_errors(question, message):
    with pytest.raises(ValueError, match=message):
        format_prompt(question)
    with pytest.raises(ValueError, match=message):
        validate_question(question)


@pytest.mark.parametrize(
    "question, message",
    [
        (Question(text="Q?", options=("same", "other", " same ")), "options A and C are the same"),
        (Question(text="Q\x00?", options=("a", "b")), r"the question contains control characters \(U\+0000\)"),
        (Question(text="Q?", options=("a", "b\x1b[31m")), "option B contains control characters"),
        (Question(text="Q?", options=("a", "b"), subject="x\x07"), "the subject contains control characters"),
        (Question(text="Q\x85?", options=("a", "b")), "U\\+0085"),
    ],
)
def test_user_input_validation(question, message):
    with pytest.raises(ValueError, match=message):
        validate_question(question)


def test_validation_accepts_tabs_newlines_and_unicode():
    q = Question(text="Qu'est-ce que\tc'est ?\r\nÉcrivez « oui ».", options=("oui", "non", "🙂"))
    assert validate_question(q) is q


def test_dataset_quirks_pass_the_format_check():
    # MMLU has repeated options and mojibake control characters; benchmarks keep them verbatim.
    q = Question(text="Itâ\x80\x99s a question", options=("687", "687", "1,493", "1,695"))
    check_format(q)
    assert "Itâ\x80\x99s a question\nA. 687\nB. 687" in format_prompt(q)


def test_version_is_a_nonempty_string():
    assert isinstance(PROMPT_FORMAT_VERSION, str) and PROMPT_FORMAT_VERSION


@pytest.mark.parametrize("text", ["\u200b\u200c\u200d", "\u202e\u2066\u2069", "\ufeff \u2060\n", "\u0301\u0301"])
def test_a_question_with_no_visible_characters_is_refused(text):
    with pytest.raises(ValueError, match="the question has no visible characters"):
        validate_question(Question(text=text))
    with pytest.raises(ValueError, match="option B has no visible characters"):
        validate_question(Question(text="Q?", options=("yes", text)))


def test_invisible_characters_next_to_visible_ones_are_fine():
    q = Question(text="\u202eQ?\u200b", options=("e\u0301", "n\u200do"))
    assert validate_question(q) is q
