"""Free-form benchmarks: the shipped `arith` set, answer classes, and a tiny run with SmolLM2 through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cascade_core.records.arith import PER_TASK, SHIPPED, TASKS, arith_rows, write_arith_file
from cascade_core.records.freeform_runner import answer_class
from cascade_core.graders import get_grader


def test_arith_is_reproducible_and_its_answers_are_right(tmp_path):
    rows = arith_rows()
    assert rows == arith_rows()  # a fixed seed: the same questions every time
    assert write_arith_file(tmp_path / "a.jsonl").read_bytes() == SHIPPED.read_bytes()  # the shipped file is this draw
    assert len(rows) == len(TASKS) * PER_TASK and len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        expression = row["question"].removeprefix("What is ").removesuffix("? Answer with the number only.")
        assert eval(expression, {"__builtins__": {}}) == int(row["answer"]), row  # noqa: S307 - digits and + - * ( ) only
    by_task = pd.Series([r["subject"] for r in rows]).value_counts()
    assert (by_task == PER_TASK).all() and set(by_task.index) == set(TASKS)
    five = [r for r in rows if r["subject"] == "5D+"]
    assert max(len(r["question"].split()[2]) for r in five) == 5  # operands drawn from [0, 10^5)


def test_answer_classes_follow_the_grader_and_unkeyed_answers_agree_only_with_the_same_text():
    numeric = get_grader("numeric", 0.0)
    assert answer_class(numeric, "124") == answer_class(numeric, "The answer is 124.") >= 0
    assert answer_class(numeric, "124") != answer_class(numeric, "125")
    assert answer_class(numeric, "I don't know") == answer_class(numeric, "i don't know") >= 0
    assert answer_class(numeric, "I don't know") != answer_class(numeric, "no idea")
    assert answer_class(numeric, "I don't know") != answer_class(numeric, "124")
    assert answer_class(numeric, "124") < 2 ** 52  # exact in the float64 a record table reads


def test_arith_resolves_as_a_builtin_free_form_dataset(tmp_path):
    from cascade_core.records.registry import resolve_dataset

    found = resolve_dataset("arith", tmp_path)
    assert (found.name, found.kind, found.grader, found.has_answers) == ("arith", "free",
                                                                         {"name": "numeric", "tolerance": 0.0}, True)
    meta = json.loads((tmp_path / "arith" / "dataset.json").read_text())
    assert meta["source"] == "builtin:arith"  # no path of this checkout: a clone elsewhere reads it too
    halves = found.questions.groupby("subject")["split"].value_counts().unstack()
    assert (halves["calibration"] == halves["test"]).all()  # stratified by task, 50 / 50


@pytest.mark.model
def test_a_free_form_benchmark_with_smollm2_through_the_cli(tmp_path, smollm2_backend, capsys):
    """Answers, grades, both P(T)s, the prompt's features and resuming, on four questions."""
    from cascade_core.records.runner import load_features
    from cascade_core.cli import main

    questions = tmp_path / "mini.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "question": "What is 2 + 2? Answer with the number only.", "answer": "4", "group": "easy"},
        {"id": "b", "question": "What is 3 + 5? Answer with the number only.", "answer": "8", "group": "easy"},
        {"id": "c", "question": "What is 4817 * 93? Answer with the number only.", "answer": "447981", "group": "hard"},
        {"id": "d", "question": "What is 9 - 11? Answer with the number only.", "answer": "-2", "group": "hard"},
    ]))
    args = ["bench", "--dataset", str(questions), "--stages", "smollm2-135m", "--max-new-tokens", "6",
            "--results-dir", str(tmp_path / "results"), "--features-dir", str(tmp_path / "features"), "--quiet"]
    assert main(args) == 0
    assert "smollm2-135m: 4 records, accuracy" in capsys.readouterr().out
    records = pd.read_parquet(tmp_path / "results" / "mini" / "smollm2-135m.parquet")
    grader = get_grader("numeric")
    for row in records.itertuples():
        refs = json.loads(row.references)
        assert row.correct == grader.grade(row.answer_text, refs)
        assert row.prediction == answer_class(grader, row.answer_text) and row.answer == -1
        assert 0 <= row.p_t_min <= row.p_t <= 1 and 1 <= row.output_tokens <= 6
        assert 0 < row.first_token_seconds <= row.seconds and row.finish_reason in ("stop", "length")
    qids, layers = load_features(tmp_path / "features" / "mini" / "smollm2-135m")
    assert sorted(qids) == ["a", "b", "c", "d"] and len(layers) == 8
    assert all(np.isfinite(x).all() and x.shape == (4,
                                                    smollm2_backend.model.config.hidden_size) for x in layers.values())
    before = (tmp_path / "results" / "mini" / "smollm2-135m.parquet").read_bytes()
    assert main(args) == 0  # resumed: nothing left to answer, nothing rewritten
    assert (tmp_path / "results" / "mini" / "smollm2-135m.parquet").read_bytes() == before


@pytest.mark.model
def test_generate_returns_the_prompt_hidden_state_of_the_same_pass(smollm2_backend):
    """P(IK) for free-form answers reads the prompt's last token from the pass that also gives
    the first answer token: the same numbers as a plain forward pass over the templated prompt."""
    import torch

    b = smollm2_backend
    prompt = "What is 7 + 6? Answer with the number only."
    g = b.generate(prompt, max_new_tokens=3, layers=[5, b.n_layers])
    ids = b.encode(prompt, multiple_choice=False, reserve=3, chat=True)
    with torch.inference_mode():
        out = b._forward([ids], want_hidden=True)
    for layer in (5, b.n_layers):
        np.testing.assert_allclose(g.hidden_states[layer], out.hidden_states[layer][0, -1].float().numpy(), atol=1e-4)
    assert 0 < g.first_token_seconds <= g.seconds
    assert b.generate(prompt, max_new_tokens=2).hidden_states is None  # none unless asked for


def _synthetic_free_form(tmp_path, n=2000, seed=0, dataset="sums", stages=("small", "large")):
    """Two stages' free-form records on a registered answer file (or on the shipped `arith`
    questions): the large one right on 90%, the small one right on 70%, and only where the large
    one is, its P(T) and P(IK) informative. Returns the preset path."""
    from cascade_core.records.registry import resolve_dataset

    rng = np.random.default_rng(seed)
    if dataset == "arith":
        found = resolve_dataset("arith", tmp_path / "results")
    else:
        questions = tmp_path / f"{dataset}.jsonl"
        questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                                                 "group": f"g{i % 4}"}) + "\n" for i in range(n)))
        found = resolve_dataset(str(questions), tmp_path / "results")
    table = found.questions
    n = len(table)
    grader = get_grader("numeric")
    results = tmp_path / "results" / dataset
    large_right = rng.random(n) < 0.9
    for stage, params in zip(stages, (1e8, 1e9)):
        right = large_right if stage == stages[1] else large_right & (rng.random(n) < 0.78)
        answers = [str(i + 1) if r else str(i + 7) for i, r in enumerate(right)]
        p_t = np.clip(np.where(right, 0.85, 0.45) + rng.normal(0, 0.06, n), 0.01, 1)
        pd.DataFrame({
            "qid": table["qid"], "subject": table["subject"], "category": "", "split": table["split"], "stage": stage,
            "model_id": stage, "answer": -1, "prediction": [answer_class(grader, a) for a in answers], "correct": right,
            "p_t": p_t, "p_t_min": p_t * 0.8, "p_ik": np.clip(np.where(right, 0.7, 0.4) + rng.normal(0, 0.15, n), 0, 1),
            "answer_text": answers, "references": [json.dumps([str(i + 1)]) for i in range(n)],  # graded above
            "prompt_tokens": 20, "output_tokens": 4, "flops": 2 * params * 24, "seconds": 1.0,
            "first_token_seconds": 0.4,
        }).to_parquet(results / f"{stage}.parquet")
    preset = tmp_path / "two.toml"
    preset.write_text('name = "two"\n' + "".join(f'[[stages]]\nname = "{s}"\nbackend = "packaged"\nmodel = '
                                                 f'"smollm2-135m"\n'
                                                 f'dtype = "float32"\nrule = "both"\nprobe_optional = '
                                                 f'true\n' for s in stages))
    return preset


def test_the_free_form_report_measures_both_guarantees_and_the_gate(tmp_path, capsys):
    from cascade_core.cli import main

    preset = _synthetic_free_form(tmp_path)
    out = tmp_path / "REPORT.md"
    assert main(["report", "--dataset", "sums", "--preset", str(preset), "--results-dir", str(tmp_path / "results"),
                 "--out", str(out), "--resplits", "20", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    small, large = report["models"]
    assert small["auroc_p_t"] > 0.8 and small["auroc_p_ik"] > 0.8 and large["accuracy"] > small["accuracy"]
    for kind in ("labelled", "label_free"):
        for rule in ("pt_only", "both"):
            r = report[kind][rule]
            assert 0 <= r["held_share"] <= 1 and r["saving_mean"] <= r["oracle_saving_mean"] + 1e-9
    assert report["label_free"]["both"]["certified_held_share"] <= report["label_free"]["both"]["held_share"] + 1e-12
    gate = report["gate"]["stages"]["small"]
    assert 0 <= gate["gated"] <= gate["reached"] and gate["seconds_skipped"] == pytest.approx(0.6 * gate["gated"])
    text = out.read_text()
    assert "label-free" in text and "Generation skipped by the P(IK) gate" in text


@pytest.mark.model
def test_free_form_questions_run_with_the_calibrated_free_form_policy(tmp_path, monkeypatch, capsys):
    """`calibrate --dataset arith` writes policies/arith/<preset>.json beside MMLU's file, not over
    it; `route` then runs a free-form question with it and a multiple-choice one without it, and
    each trace says which policy applied."""
    from cascade_core.cli import main

    preset = _synthetic_free_form(tmp_path, dataset="arith")
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    assert main(["calibrate", "--dataset", "arith", "--preset", str(preset), "--rule", "pt_only", "--target", "5"]) == 0
    written = tmp_path / "policies" / "arith" / "two.json"
    assert written.exists() and not (tmp_path / "policies" / "two.json").exists()
    capsys.readouterr()
    assert main(["route", "What is 2 + 2? Answer with the number only.", "--preset", str(preset), "--json",
                 "--max-new-tokens", "4"]) == 0
    free = json.loads(capsys.readouterr().out)
    assert "free-form policy, arith" in free["thresholds"] and "calibrated" in free["thresholds"]
    assert main(["route", "2+2?", "--options", "3", "4", "5", "--preset", str(preset), "--json"]) == 0
    mc = json.loads(capsys.readouterr().out)
    assert "free-form" not in mc["thresholds"] and "preset file" in mc["thresholds"]


def test_a_free_form_policy_that_needs_p_ik_is_refused(tmp_path, monkeypatch):
    from cascade_core.cli import main
    from cascade_core.compose.live import build_cascade
    from cascade_core.presets import load_preset

    preset = _synthetic_free_form(tmp_path, dataset="arith")
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    assert main(["calibrate", "--dataset", "arith", "--preset", str(preset), "--rule", "both", "--target", "5"]) == 0
    with pytest.raises(ValueError, match="read P\\(IK\\) at small, which has no free-form probe: train it"):
        build_cascade(load_preset(preset))


@pytest.mark.model
def test_a_free_form_probe_gives_p_ik_from_the_prompt_s_pass(smollm2_backend):
    """With a free-form probe, a free-form answer's step carries P(IK) from the prompt's last hidden
    state at the probe's layer: the number the probe gives on `generate(layers=)`'s features."""
    from cascade_core.cascade import RuntimeStage, run_cascade
    from cascade_core.policy import StagePolicy
    from cascade_core.probe import PIKProbe
    from cascade_core.types import Question

    b = smollm2_backend
    rng = np.random.default_rng(0)
    d = b.model.config.hidden_size
    probe = PIKProbe(layer=6, model_id=b.model_id).fit(rng.normal(size=(60, d)), rng.random(60) < 0.5)
    stage = RuntimeStage(name="s", backend=b, policy=StagePolicy(), free_form_probe=probe)
    question = Question(text="What is 2 + 2? Answer with the number only.")
    (step,) = run_cascade([stage], question, max_new_tokens=4).steps
    g = b.generate("The following is a question (with answer).\n\nWhat is 2 + 2? Answer with the number only.\nAnswer:",
                   max_new_tokens=4, layers=[6])
    assert step.p_ik == pytest.approx(float(probe.p_ik(g.hidden_states[6][None, :])[0]), abs=1e-5)
    (plain,) = run_cascade([RuntimeStage(name="s", backend=b, policy=StagePolicy())], question, max_new_tokens=4).steps
    assert plain.p_ik is None or np.isnan(plain.p_ik)  # no probe: no P(IK), as before

