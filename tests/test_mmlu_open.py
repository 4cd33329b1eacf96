"""`mmlu-open`: MMLU questions with a short right option, asked without options; the selection rule,
the shipped file, the registry, a no-records report, and a tiny benchmark with SmolLM2."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cascade_core.graders import get_grader
from cascade_core.records.mmlu_open import (MAX_QUESTIONS, MMLU_PATH, PROMPT, REASONS, SHIPPED, SUMMARY,
                                            accepted_answers, exclusion, select, write_mmlu_open)

FOUR = ["Paris", "Berlin", "Rome", "Madrid"]


@pytest.mark.parametrize("question, options, answer, reason", [
    ("What did the treaty establish?", ["a court of justice for all of the member states", "b", "c", "d"], 0,
     "long_answer"),
    ("What is the probability?", [r"\frac{1}{2}", "1/3", "1/4", "1"], 0, "latex_answer"),
    ("Which of the following is a capital?", FOUR, 0, "refers_to_options"),
    ("Statement 1 | A group is abelian. Statement 2 | A ring is a group.", ["True, True", "True, False", "a", "b"], 0,
     "refers_to_options"),
    ("Consider the options: which city?", FOUR, 0, "refers_to_options"),
    ("I. Paris II. Rome. Which are capitals?", ["I only", "II only", "I and II", "neither"], 2, "refers_to_options"),
    ("The ____ of the ____ is large.", ["size, sun", "mass, moon", "c", "d"], 0, "several_blanks"),
    ("What is true of capitals?", ["All of the above", "b", "c", "d"], 0, "option_reference"),
    ("GDP measures", ["(A) and (C)", "b", "c", "d"], 0, "option_reference"),
    ("Predatory pricing.", ["1,4", "1,2", "2,3", "3,4"], 0, "option_reference"),
    ("What is the capital of France?", ["Paris.", "paris", "Rome", "Madrid"], 0, "ambiguous_grading"),
    ("What is the capital of France?", FOUR, 0, None),
    ("How far does it travel, in metres?", ["450 m", "45 m", "4.5 m", "4500 m"], 0, None),
    ("Find all zeros in Z_5 of x^2 + 1.", ["2,3", "1,4", "0", "none"], 0, None),  # digits shown: a real answer
])
def test_each_exclusion_rule(question, options, answer, reason):
    assert exclusion(question, options, answer) == reason


def test_accepted_answers_add_the_bare_number_of_a_unit_only_when_it_is_unambiguous():
    assert accepted_answers(["450 m", "45 m", "4.5 m", "4500 m"], 0) == ["450 m", "450"]
    assert accepted_answers(["67%", "50%", "20%", "10%"], 0) == ["67%"]  # normalised, "67%" already reads "67"
    assert get_grader("choices").grade("67", ["67%"])
    assert accepted_answers(["450 m", "450 km", "4.5 m", "4500 m"], 0) == ["450 m"]  # 450 is also another option's
    assert accepted_answers(["42 million", "4", "5", "6"], 0) == ["42 million"]  # a magnitude, not a unit
    assert accepted_answers(["3 or more", "1", "2", "0"], 0) == ["3 or more"]
    assert accepted_answers(FOUR, 1) == ["Berlin"]
    grader = get_grader("choices")
    assert grader.grade("450", accepted_answers(["450 m", "45 m", "4.5 m", "4500 m"], 0))
    assert grader.grade("The Daily Planet.", ["The Daily Planet"]) and not grader.grade("Daily Bugle",
                                                                                        ["The Daily Planet"])


def test_the_shipped_file_is_the_stated_selection(tmp_path):
    written, summary = write_mmlu_open(tmp_path / "m.jsonl")
    assert written.read_bytes() == SHIPPED.read_bytes()  # reproducible byte for byte from the MMLU file
    assert (tmp_path / "selection.json").read_bytes() == SUMMARY.read_bytes()
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    mmlu = pd.read_parquet(MMLU_PATH).set_index("qid")
    assert len(rows) == summary["selected"] == MAX_QUESTIONS and len({r["id"] for r in rows}) == len(rows)
    assert summary["eligible"] + summary["excluded_total"] == len(mmlu) == summary["questions_in_mmlu"]
    assert sum(summary["excluded"].values()) == summary["excluded_total"] and set(summary["excluded"]) == set(REASONS)
    for row in rows:
        source = mmlu.loc[row["id"]]
        assert row["question"] == PROMPT.format(question=" ".join(source["question"].split()))
        assert "options" not in row and row["subject"] == source["subject"]
        assert exclusion(source["question"], list(source["options"]), int(source["answer"])) is None
        assert row["answer"][0] == str(source["options"][source["answer"]]).strip()  # graded against the option text
        assert "which of the following" not in row["question"].lower()
    per_subject = pd.Series([r["subject"] for r in rows]).value_counts()
    assert per_subject.max() <= 25 and summary["subjects"] == len(per_subject)  # spread, not dominated by one subject
    smaller, _ = select(pd.read_parquet(MMLU_PATH), limit=100)
    assert len(smaller) == 100


def test_mmlu_open_resolves_as_a_builtin_free_form_dataset_with_a_stratified_split(tmp_path):
    from cascade_core.records.registry import known_datasets, read_metadata, resolve_dataset

    assert "mmlu-open" in known_datasets(tmp_path)
    assert read_metadata("mmlu-open", tmp_path)["kind"] == "free"  # before any benchmark: from the shipped file
    found = resolve_dataset("mmlu-open", tmp_path)
    assert found.kind == "free" and found.grader == {"name": "choices"} and found.has_answers
    assert len(found.questions) == MAX_QUESTIONS and (found.questions["options"].map(len) == 0).all()
    halves = found.questions.groupby("subject")["split"].agg(lambda s: (s == "calibration").sum() - (s == "test").sum())
    assert halves.isin([0, 1]).all()  # stratified by subject: each subject in halves, calibration gets an odd one
    meta = json.loads((tmp_path / "mmlu-open" / "dataset.json").read_text())
    assert meta["source"] == "builtin:mmlu-open" and meta["grader"] == {"name": "choices"}
    assert (tmp_path / "mmlu-open" / "split.json").is_file()


def test_report_without_records_says_so_and_does_not_fail(tmp_path, capsys):
    from cascade_core.cli import main

    out = tmp_path / "r.md"
    assert main(["report", "--dataset", "mmlu-open", "--results-dir", str(tmp_path / "results"), "--out", str(out),
                 "--quiet"]) == 0
    text = out.read_text()
    assert "**No records yet**" in text and "make bench-mmlu-open" in text
    assert "question refers to its options" in text and "| **excluded in all** |" in text
    assert "no records yet" in capsys.readouterr().err


@pytest.mark.model
def test_a_tiny_mmlu_open_benchmark_with_smollm2(tmp_path, smollm2_backend):
    """Four questions through the registry and the free-form runner: graded against the option text."""
    from cascade_core.records.runner import BenchPaths
    from cascade_core.compose.jobs import bench_questions
    from cascade_core.records.freeform_runner import run_freeform_stage

    questions = bench_questions("mmlu-open", per_subject=1, results_dir=tmp_path / "results").head(4)
    paths = BenchPaths.for_stage(tmp_path / "results", tmp_path / "features", "mmlu-open", "smollm2-135m")
    records = run_freeform_stage(smollm2_backend, "smollm2-135m", questions, paths, get_grader("choices"),
                                 max_new_tokens=6)
    assert len(records) == 4 and set(records["qid"]) == set(questions["qid"])
    grader = get_grader("choices")
    for row in records.itertuples():
        refs = json.loads(row.references)
        assert refs == list(questions.set_index("qid").loc[row.qid, "references"])
        assert row.correct == grader.grade(row.answer_text, refs) and 1 <= row.output_tokens <= 6


def test_a_report_with_records_opens_with_how_the_questions_were_chosen():
    from cascade_core.report.freeform import render_freeform, selection_summary

    row = {"held_share": 1.0, "certified_held_share": 1.0, "saving_mean": 0.0, "saving_p05": 0.0,
           "oracle_saving_mean": float("nan"), "share_of_oracle": None}
    report = {"dataset": "mmlu-open", "questions": 1000, "stages": ["a", "b"], "groups": ["anatomy", "virology"],
              "target": 0.01, "delta": 0.1, "resplits": 2, "unit": "flops", "selection": selection_summary("mmlu-open"),
              "models": [{"stage": s, "accuracy": 0.5, "by_group": {"anatomy": 0.5, "virology": 0.25 * (s == "b")},
                          "auroc_p_t": 0.6,
                          "auroc_p_t_min": 0.55, "auroc_p_ik": None, "output_tokens_mean": 5.0, "seconds_mean": 1.0,
                          "first_token_seconds_mean": 0.2} for s in ("a", "b")],
              "labelled": {"pt_only": row}, "label_free": {"pt_only": row}, "gate": None, "sweep": []}
    text = render_freeform(report)
    assert text.index("## The questions") < text.index("## Models") and "| **excluded in all** |" in text
    assert "nan" not in text and selection_summary("arith") is None
    # per group accuracy: one row per group (56 subjects on mmlu-open), one column per stage
    assert "| group | a | b |\n|---|---|---|\n| anatomy | 50.0% | 50.0% |\n| virology | 0.0% | 25.0% |\n" in text
