"""The dataset registry: names and files resolve the same way everywhere; a file's split and
metadata are stored beside its records, and only after the whole file passed its checks."""

import json

import pandas as pd
import pytest

from cascade_core.cli import main
from cascade_core.compose.jobs import bench_questions
from cascade_core.records.registry import (dataset_name, known_datasets, read_metadata, resolve_dataset,
                                           select_questions)
from cascade_core.records.mmlu import load_mmlu
from cascade_core.records.question_files import QuestionFileError
from cascade_core.records.split import read_split_json


def _mc_file(tmp_path, n=40, name="my_set.csv", groups=("alpha", "beta")):
    frame = pd.DataFrame({
        "question": [f"Question {i}?" for i in range(n)],
        "A": ["yes"] * n, "B": ["no"] * n, "C": ["maybe"] * n,
        "answer": ["ABC"[i % 3] for i in range(n)],
        "subject": [groups[i % len(groups)] for i in range(n)],
    })
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_mmlu_resolves_to_the_shipped_questions_and_split(tmp_path):
    found = resolve_dataset("mmlu", results_dir=tmp_path)
    shipped = load_mmlu()
    assert (found.name, found.kind, found.grader, found.has_answers) == ("mmlu", "mc", {"name": "mc"}, True)
    assert found.questions["qid"].tolist() == shipped["qid"].tolist()
    assert found.questions["split"].tolist() == shipped["split"].tolist()
    assert not any(tmp_path.iterdir())  # MMLU writes nothing: its split is the committed one


def test_a_file_gets_a_stratified_seeded_split_and_metadata_beside_its_records(tmp_path):
    path = _mc_file(tmp_path)
    results = tmp_path / "results"
    found = resolve_dataset(str(path), results_dir=results)
    assert found.name == "my_set" and found.kind == "mc" and found.grader == {"name": "mc"}
    split = read_split_json(results / "my_set" / "split.json")
    assert set(split["qid"]) == set(found.questions["qid"])
    for group, rows in found.questions.groupby("subject"):
        n_cal = int((rows["split"] == "calibration").sum())
        assert n_cal - (len(rows) - n_cal) in (0, 1), group
    meta = read_metadata("my_set", results)
    assert meta["source"] == str(path.resolve()) and meta["has_answers"] and meta["questions"] == 40
    assert meta["columns"]["group"] == "subject"
    # The same file again: the same split, files untouched; by its name: the same dataset.
    before = (results / "my_set" / "split.json").read_bytes(), (results / "my_set" / "dataset.json").read_bytes()
    again = resolve_dataset(str(path), results_dir=results)
    by_name = resolve_dataset("my_set", results_dir=results)
    assert again.questions["split"].tolist() == found.questions["split"].tolist() == by_name.questions["split"].tolist()
    assert before == ((results / "my_set" / "split.json").read_bytes(),
                      (results / "my_set" / "dataset.json").read_bytes())
    # the built-ins, then the files benchmarked
    assert known_datasets(results) == ["mmlu", "arith", "mmlu-open", "my_set"]


def test_a_refused_file_writes_nothing(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("question,A,B,answer\nQ1,x,y,A\nQ2,x,y,Z\n")
    with pytest.raises(QuestionFileError, match="row 2, column 'answer'"):
        resolve_dataset(str(path), results_dir=tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_changed_file_cannot_move_questions_between_the_halves(tmp_path):
    path = _mc_file(tmp_path, n=20)
    results = tmp_path / "results"
    resolve_dataset(str(path), results_dir=results)
    _mc_file(tmp_path, n=24)  # four questions more: the per-group order would shift
    with pytest.raises(ValueError, match=r"made for other questions: 4 question\(s\) of the file are not in it"):
        resolve_dataset(str(path), results_dir=results)


def test_names_reserved_unknown_and_colliding(tmp_path):
    assert dataset_name("mmlu") == "mmlu"
    assert dataset_name("some/dir/My Questions.jsonl") == "my-questions"
    assert dataset_name("arith", tmp_path) == "arith"  # a shipped free-form set
    assert dataset_name("mmlu-open", tmp_path) == "mmlu-open"  # the other shipped free-form set
    with pytest.raises(ValueError, match="unknown dataset 'nope'; available: mmlu, arith, mmlu-open"):
        dataset_name("nope", tmp_path)
    with pytest.raises(ValueError, match="built-in dataset's name"):
        dataset_name(str(tmp_path / "mmlu.csv"))


def test_select_questions_per_group_and_split(tmp_path):
    found = resolve_dataset(str(_mc_file(tmp_path, n=40)), results_dir=tmp_path / "r")
    small = select_questions(found, per_subject=4)
    assert small.groupby("subject").size().to_dict() == {"alpha": 4, "beta": 4}
    assert (small["split"] == "calibration").sum() == 4
    test = select_questions(found, split="test", per_subject=4)
    assert set(test["qid"]) < set(small["qid"]) and (test["split"] == "test").all()
    with pytest.raises(ValueError, match="no group"):
        select_questions(found, subjects=["gamma"])


def test_bench_questions_takes_multiple_choice_and_free_form_files(tmp_path):
    questions = bench_questions(str(_mc_file(tmp_path, n=10)), per_subject=2, results_dir=tmp_path / "r")
    assert len(questions) == 4
    assert {"qid", "subject", "category", "split", "question", "options", "answer"} <= set(questions.columns)
    free = tmp_path / "free.jsonl"
    free.write_text('{"question": "3+4?", "answer": "7"}\n')
    (row,) = bench_questions(str(free), results_dir=tmp_path / "r").itertuples()
    assert list(row.options) == [] and list(row.references) == ["7"]  # benchmarked free-form (freeform_bench)
    meta = json.loads((tmp_path / "r" / "free" / "dataset.json").read_text())
    assert meta["kind"] == "free" and meta["grader"] == {"name": "numeric", "tolerance": 1e-06}


def test_cli_bench_refuses_a_bad_file_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "options": ["a"]}\n')
    assert main(["bench", "--dataset", str(bad), "--results-dir", str(tmp_path / "r")]) == 2
    assert f"{bad}, line 1, column 'options': 1 option(s)" in capsys.readouterr().err
    assert not (tmp_path / "r" / "bad").exists()  # nothing written


@pytest.mark.model
def test_bench_a_file_through_the_cli_with_smollm2(tmp_path, smollm2_path, capsys):
    """A tiny multiple-choice file, labelled and not, benchmarked by the runner MMLU uses."""
    preset = tmp_path / "one.toml"
    preset.write_text('name = "one"\n[[stages]]\nname = "s1"\nbackend = "packaged"\nmodel = "smollm2-135m"\n'
                      'dtype = "float32"\nprobe_optional = true\n')
    quiz = tmp_path / "quiz.jsonl"
    rows = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "4", "subject": "math"},
            {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": "B", "subject": "geo"},
            {"question": "Largest planet?", "choices": ["Mars", "Jupiter", "Venus"], "answer": 1, "subject": "geo"},
            {"question": "What is 3 x 3?", "choices": ["6", "9", "12"], "answer": "9", "subject": "math"}]
    quiz.write_text("".join(json.dumps(r) + "\n" for r in rows))
    blind = tmp_path / "blind.csv"
    pd.DataFrame([{k: v for k, v in r.items() if k != "answer"} | {"choices": json.dumps(r["choices"])}
                  for r in rows]).to_csv(blind, index=False)
    results, features = tmp_path / "r", tmp_path / "f"
    common = ["--preset", str(preset), "--results-dir", str(results), "--features-dir", str(features),
              "--threads", "1", "--quiet"]
    assert main(["bench", "--dataset", str(quiz), *common]) == 0
    assert "s1: 4 records, accuracy" in capsys.readouterr().out
    records = pd.read_parquet(results / "quiz" / "s1.parquet").set_index("qid")
    split = read_split_json(results / "quiz" / "split.json").set_index("qid")
    assert sorted(records.index) == sorted(split.index) and len(records) == 4
    assert (records["split"] == split.loc[records.index, "split"]).all()
    assert records["answer"].tolist() == [1, 1, 1, 1]
    assert (records["correct"] == (records["prediction"] == records["answer"])).all()
    assert (features / "quiz" / "s1").is_dir()
    before = (results / "quiz" / "s1.parquet").read_bytes()
    assert main(["bench", "--dataset", "quiz", *common]) == 0  # by name: resumes, nothing to do
    assert (results / "quiz" / "s1.parquet").read_bytes() == before
    assert main(["bench", "--dataset", str(blind), *common]) == 0
    assert "no answers (calibrate label-free)" in capsys.readouterr().out
    blind_records = pd.read_parquet(results / "blind" / "s1.parquet")
    assert (blind_records["answer"] == -1).all() and not blind_records["correct"].any()
    assert blind_records["prediction"].between(0, 3).all()


def test_probes_train_skips_a_dataset_without_answers_and_says_why(tmp_path, capsys):
    from cascade_core.records.table import synthetic_table
    from app_ui.view_model import record_frames

    n = 60
    pd.DataFrame({"question": [f"Q{i}" for i in range(n)], "options": [["a", "b"]] * n}).to_json(
        tmp_path / "blind.jsonl", orient="records", lines=True)
    results = tmp_path / "r"
    found = resolve_dataset(str(tmp_path / "blind.jsonl"), results_dir=results)
    frame = record_frames(synthetic_table(n, 1, seed=1), qids=found.questions["qid"].to_numpy(),
                          splits=found.questions["split"].to_numpy())[0]
    frame.assign(stage="s1", model_id="s1", answer=-1, correct=False).to_parquet(results / "blind" / "s1.parquet")
    preset = tmp_path / "one.toml"
    preset.write_text('name = "one"\n[[stages]]\nname = "s1"\nbackend = "packaged"\nmodel = "smollm2-135m"\n'
                      'probe_optional = true\n')
    assert main(["probes", "train", "--preset", str(preset), "--dataset", "blind", "--results-dir", str(results),
                 "--features-dir", str(tmp_path / "f"), "--probes-dir", str(tmp_path / "p")]) == 0
    assert "s1: its dataset has no answers" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()


def test_probes_train_skips_a_stage_with_too_few_right_answers_and_trains_the_rest(tmp_path, capsys):
    """mmlu-open: SmolLM2 answered none of its calibration half right; one stage's hopeless records
    must not stop the other stages' probes (the command used to fail outright)."""
    from cascade_core.records.table import synthetic_table
    from app_ui.view_model import record_frames

    n = 60
    pd.DataFrame({"question": [f"Q{i}" for i in range(n)], "options": [["a", "b"]] * n, "answer": [0] * n}).to_json(
        tmp_path / "hard.jsonl", orient="records", lines=True)
    results = tmp_path / "r"
    found = resolve_dataset(str(tmp_path / "hard.jsonl"), results_dir=results)
    frame = record_frames(synthetic_table(n, 1, seed=1), qids=found.questions["qid"].to_numpy(),
                          splits=found.questions["split"].to_numpy())[0]
    right = (frame["split"] == "calibration").cumsum() == 1  # exactly one right answer in calibration
    for stage in ("s1", "s2"):
        records = frame.assign(stage=stage, model_id=stage, answer=0, correct=right)
        records.to_parquet(results / "hard" / f"{stage}.parquet")
    preset = tmp_path / "two.toml"
    preset.write_text('name = "two"\n[[stages]]\nname = "s1"\nbackend = "packaged"\nmodel = "smollm2-135m"\n'
                      'probe_optional = true\n[[stages]]\nname = "s2"\nbackend = "packaged"\n'
                      'model = "smollm2-135m"\nprobe_optional = true\n')
    assert main(["probes", "train", "--preset", str(preset), "--dataset", "hard", "--results-dir", str(results),
                 "--features-dir", str(tmp_path / "f"), "--probes-dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "s1: 1 right and 29 wrong answers on its calibration split" in out and "--rule pt_only" in out
    assert "s2: 1 right" in out  # the next stage was still looked at
    assert not (tmp_path / "p").exists()


def test_an_upload_is_checked_whole_then_kept_and_a_bad_one_leaves_nothing(tmp_path):
    from cascade_core.records.registry import store_upload

    results = tmp_path / "results"
    good = (b'{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n'
            b'{"question": "3+3?", "options": ["6", "7"], "answer": 0}\n')
    stored, checked = store_upload("My Set.jsonl", good, results)
    assert stored == tmp_path / "uploads" / "my-set.jsonl" and stored.read_bytes() == good
    assert checked.kind == "mc" and checked.table["answer"].tolist() == [1, 0]
    assert resolve_dataset(str(stored), results).name == "my-set"
    bad = b'{"question": "2+2?", "options": ["3", "4"], "answer": "C"}\n'
    with pytest.raises(ValueError, match=r"^broken\.jsonl, line 1, column 'answer'"):
        store_upload("broken.jsonl", bad, results)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["my-set.jsonl"]  # nothing of the bad one
    with pytest.raises(ValueError, match="notes.txt: not a question file"):
        store_upload("notes.txt", b"hello", results)
    with pytest.raises(ValueError, match="built-in dataset's name"):
        store_upload("arith.csv", b"question\nq\n", results)
