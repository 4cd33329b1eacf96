"""Graders: truth tables for each, and the property the label-free guarantee rests on:
two equivalent answers are graded alike against every reference."""

import itertools

import pytest

from cascade_core.graders import (default_grader, first_number, get_grader, grader_from_dict, normalise_text,
                                  option_letter)


def test_normalise_and_parse():
    assert normalise_text("  The Eiffel-Tower! ") == "eiffeltower"
    assert normalise_text("An apple, a day") == "apple day"
    assert first_number("The answer is -1,234.5 apples, not 7") == -1234.5
    assert first_number("3/4") == 3.0
    assert first_number(".5") == 0.5
    assert first_number("no digits") is None
    assert first_number(42) == 42.0
    assert option_letter("B") == option_letter("(b)") == option_letter("B. Paris") == option_letter(1) == "B"
    assert option_letter("Paris") is None and option_letter(True) is None


@pytest.mark.parametrize("answer, references, right", [
    ("Paris", ["paris"], True),
    ("The Paris.", "Paris", True),
    ("Paris, France", ["Paris"], False),
    ("", [""], False),
])
def test_exact(answer, references, right):
    assert get_grader("exact").grade(answer, references) is right


@pytest.mark.parametrize("answer, references, right", [
    ("Robert", ["Bob", "Robert"], True),
    ("bob", ["Bob", "Robert"], True),
    ("Rob", ["Bob", "Robert"], False),
])
def test_choices(answer, references, right):
    assert get_grader("choices").grade(answer, references) is right


@pytest.mark.parametrize("answer, reference, tolerance, right", [
    ("124", "124", 1e-6, True),
    ("The sum is 124.", "124", 1e-6, True),
    ("1,024", "1024", 1e-6, True),
    ("123", "124", 1e-6, False),
    ("124.0000001", "124", 1e-6, True),
    ("125", "124", 0.01, True),  # relative: 1% of 124
    ("0.005", "0", 0.01, True),  # absolute below 1
    ("I don't know", "124", 1e-6, False),
    ("-7", "7", 1e-6, False),
])
def test_numeric(answer, reference, tolerance, right):
    assert get_grader("numeric", tolerance).grade(answer, [reference]) is right


def test_mc():
    grader = get_grader("mc")
    assert grader.grade("C", [2]) and grader.grade("c. Rome", "C") and grader.grade(2, ["C"])
    assert not grader.grade("D", [2]) and not grader.grade("nonsense", [2])


@pytest.mark.parametrize("name", ["exact", "choices", "numeric", "mc"])
def test_equivalent_answers_are_graded_alike_against_every_reference(name):
    answers = ["124", "124.0", "The answer is 124", "125", "Paris", "paris.", "the Paris", "B", "b. x", "(B)",
               "C", "", "no number", 1, 2, "1,024", "1024"]
    grader = get_grader(name, 0.01)
    for a, b in itertools.combinations(answers, 2):
        if grader.equivalent(a, b):
            for ref in answers:
                assert grader.grade(a, [ref]) == grader.grade(b, [ref]), (a, b, ref)


def test_numeric_equivalence_is_equality_not_tolerance():
    grader = get_grader("numeric", 0.01)
    assert grader.grade("125", ["124"]) and not grader.equivalent("125", "124")
    assert grader.equivalent("x 124", "124.0")


def test_registry_and_defaults():
    assert grader_from_dict(get_grader("numeric", 0.5).to_dict()).tolerance == 0.5
    assert grader_from_dict({"name": "mc"}).name == "mc"
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        get_grader("fuzzy")
    with pytest.raises(ValueError, match="tolerance"):
        get_grader("numeric", -1)
    assert default_grader("mc", [["x"]]) == "mc"
    assert default_grader("free", [["7"], ["-1.5"]]) == "numeric"
    assert default_grader("free", [["7"], ["seven"]]) == "exact"
    assert default_grader("free", [["Bob", "Robert"], ["x"]]) == "choices"
    assert default_grader("free", [[], []]) == "exact"
