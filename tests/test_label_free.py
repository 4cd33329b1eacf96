"""The label-free guarantee: Learn-then-Test on the disagreement with the last stage.

Population: a small stage whose P(T) ~ U(0, 1) agrees with the last stage with probability P(T);
the last stage answers a uniform letter of four. Keeping the small stage's answers with P(T) >= tau
disagrees, in expectation, R(tau) = integral_tau^1 (1 - p) dp = (1 - tau)^2 / 2 exactly, so each
chosen threshold's true label-free loss is computed, not estimated (as tests/test_risk.py does for
the labelled loss). Labels never enter: the accuracy lost against the last stage is below the
disagreement for any labels, adversarial ones included.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cascade_core.graders import get_grader
from cascade_core.choose.label_free import (accuracy_loss_bound_holds, check_label_free, disagreement_loss,
                                     label_free_table)
from cascade_core.policy import CascadePolicy, StagePolicy
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import replay, route
from cascade_core.choose.ltt import keep_scores, threshold_grid, threshold_path
from cascade_core.choose.selection import select_policy


def _draw(n: int, rng: np.random.Generator, answers: np.ndarray | None = None, recorded_last=False) -> RecordTable:
    p_t = rng.random(n)
    big = rng.integers(0, 4, n)
    agree = rng.random(n) < p_t
    small = np.where(agree, big, (big + rng.integers(1, 4, n)) % 4)
    answers = rng.integers(0, 4, n) if answers is None else answers
    zeros = np.zeros((2, n))
    return RecordTable(
        names=("small", "big"), model_ids=("s", "b"), qids=[f"q{i}" for i in range(n)],
        subjects=np.array(["x"] * n), splits=np.array(["calibration"] * n),
        correct=np.stack([small == answers, big == answers]), prediction=np.stack([small, big]),
        p_t=np.stack([p_t, np.full(n, 0.9)]), p_ik=np.full((2, n), np.nan), margin=zeros, entropy=zeros,
        prompt_tokens=np.ones((2, n)), output_tokens=zeros, flops=np.stack([np.ones(n), np.full(n, 10.0)]),
        seconds=zeros, dollars=zeros, has_hidden=np.zeros(2, bool), recorded=np.array([False, recorded_last]))


def true_disagreement(tau: float) -> float:
    t = min(max(tau, 0.0), 1.0)
    return (1 - t) ** 2 / 2


def _tau(policy: CascadePolicy) -> float:
    return policy[0].tau_t if policy[0].enabled else 1.0


def test_the_label_free_guarantee_holds_in_at_least_1_minus_delta_of_500_draws():
    rng = np.random.default_rng(20)
    target, delta = 0.05, 0.1
    held, kept, held_plain = 0, [], 0
    for _ in range(500):
        calib = label_free_table(_draw(1000, rng))
        tau = _tau(select_policy(calib, target_max_loss=target, unit="flops", rule="pt_only", delta=delta).policy)
        held += true_disagreement(tau) <= target
        kept.append(1 - tau)
        # Without the guarantee: the cheapest threshold whose calibration disagreement is within the target.
        grid = threshold_grid("pt_only")
        scores = {0: keep_scores(calib, 0, "pt_only")}
        n_plus, n_minus, mean_cost, _, _ = threshold_path(calib, (0, 1), scores, grid, "flops")
        assert not n_minus.any()  # the reference always "agrees with itself": no -1 losses
        ok = np.flatnonzero(n_plus / calib.n_questions <= target)
        held_plain += true_disagreement(grid[ok[np.argmin(mean_cost[ok])]]) <= target
    assert held / 500 >= 1 - delta
    assert np.mean(np.array(kept) > 0) > 0.9  # not vacuous: it keeps questions on most draws
    assert held_plain / 500 < 0.8  # and the plain criterion misses the target often


@pytest.mark.parametrize("labels", ["random", "adversarial", "last-always-right", "last-always-wrong"])
def test_accuracy_lost_never_exceeds_the_disagreement_whatever_the_labels(labels):
    rng = np.random.default_rng(5)
    base = _draw(2000, rng)
    small, big = base.prediction
    answers = {"random": rng.integers(0, 4, 2000),
               # the last stage right exactly where they differ
               "adversarial": np.where(small != big, big, (big + 1) % 4),
               "last-always-right": big, "last-always-wrong": (big + 1) % 4}[labels]
    table = _draw(2000, np.random.default_rng(5), answers=answers)
    certified = label_free_table(table)
    for tau in (1.01, 0.95, 0.8, 0.5, 0.0):
        policy = CascadePolicy((StagePolicy(tau_t=tau, rule="pt_only"), StagePolicy()))
        final, _ = route(table, policy)
        assert accuracy_loss_bound_holds(table, final)
        lost = table.correct[-1].mean() - replay(table, policy).accuracy
        disagreement = 1 - replay(certified, policy).accuracy
        assert lost <= disagreement + 1e-12
        if labels == "adversarial":
            assert lost == pytest.approx(disagreement)  # the bound is tight: it cannot be improved without labels


def test_the_certified_table_is_the_records_with_agreement_as_correct():
    table = _draw(50, np.random.default_rng(1))
    certified = label_free_table(table)
    assert certified.correct[-1].all()
    assert (certified.correct[0] == (table.prediction[0] == table.prediction[1])).all()
    assert (certified.prediction == table.prediction).all() and (certified.flops == table.flops).all()
    assert (table.correct != certified.correct).any()  # the original is untouched


def test_a_recorded_last_stage_or_an_unknown_answer_is_refused():
    with pytest.raises(ValueError, match="'big' replays recorded outcomes .* label-free guarantee needs"):
        check_label_free(_draw(20, np.random.default_rng(0), recorded_last=True))
    with pytest.raises(ValueError, match="label-free"):
        label_free_table(_draw(20, np.random.default_rng(0), recorded_last=True))
    predictions = np.array([[0, 1, 2], [0, -1, 2]])
    with pytest.raises(ValueError, match="big has no recorded answer for 1 question"):
        disagreement_loss(predictions, names=("small", "big"))


def test_free_form_answers_disagree_by_the_graders_equivalence():
    answers = [["124", "The answer is 7", "Paris"], ["124.0", "8", "paris"]]
    numeric = disagreement_loss(answers, get_grader("numeric").equivalent)
    # "Paris" vs "paris": neither has a number, so both are wrong against any reference: alike.
    assert numeric.tolist() == [[False, True, False], [False, False, False]]
    exact = disagreement_loss(answers, get_grader("exact").equivalent)
    assert exact.tolist() == [[True, True, False], [False, False, False]]


# -- through calibrate ----------------------------------------------------------------------------


def _preset(tmp_path, names):
    path = tmp_path / "three.toml"
    path.write_text('name = "three"\n' + "".join(
        f'[[stages]]\nname = "{n}"\nbackend = "packaged"\nmodel = "smollm2-135m"\ndtype = "float32"\n'
        f'tau_t = 0.9\nrule = "pt_only"\nprobe_optional = true\n' for n in names))
    return path


def test_calibrate_label_free_on_mmlu_records_says_so_with_both_figures(tmp_path, monkeypatch, capsys):
    from _records import DEFAULT_STAGES, write_synthetic_records
    from cascade_core.cli import main

    write_synthetic_records(tmp_path / "results", n=1600)
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    preset = _preset(tmp_path, DEFAULT_STAGES)
    assert main(["calibrate", "--preset", str(preset), "--rule", "pt_only", "--target", "5", "--label-free"]) == 0
    out = capsys.readouterr().out
    assert "label-free" in out and "agreement with the last stage" in out
    assert "calibrated label-free for <= 5 pt against the last stage's answers at delta 0.1" in out
    data = json.loads((tmp_path / "policies" / "three.json").read_text())
    assert data["guarantee"]["loss"] == "label_free" and data["guarantee"]["target_pt"] == 5.0
    figures = data["calibration"]
    assert figures["loss"] == "label_free"
    assert figures["accuracy_loss"] <= figures["disagreement"] + 1e-12  # labels exist: both shown, bound respected
    assert 0 <= figures["agreement"] <= 1 and figures["reference_accuracy"] is not None


def test_calibrate_is_label_free_automatically_for_a_file_without_answers(tmp_path, monkeypatch, capsys):
    from cascade_core.cli import main
    from cascade_core.records.registry import resolve_dataset
    from cascade_core.records.table import synthetic_table
    from app_ui.view_model import record_frames

    n, names = 400, ("small", "big")
    pd.DataFrame({"question": [f"Q{i}" for i in range(n)], "options": [["a", "b", "c", "d"]] * n,
                  "group": [f"g{i % 3}" for i in range(n)]}).to_json(tmp_path / "mine.jsonl", orient="records",
                                                                       lines=True)
    results = tmp_path / "results"
    found = resolve_dataset(str(tmp_path / "mine.jsonl"), results_dir=results)
    assert not found.has_answers
    table = synthetic_table(n, 2, seed=4)
    frames = record_frames(table, qids=found.questions["qid"].to_numpy(), splits=found.questions["split"].to_numpy())
    for name, frame in zip(names, frames):
        # No answers: every record says answer -1 and correct false, as the runner writes them.
        frame.assign(stage=name, model_id=name, answer=-1, correct=False).to_parquet(
            results / "mine" / f"{name}.parquet")
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(results))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    preset = _preset(tmp_path, names)
    assert main(["calibrate", "--preset", str(preset), "--dataset", "mine", "--rule", "pt_only", "--target", "10"]) == 0
    out = capsys.readouterr().out
    assert "no answers to measure accuracy" in out
    data = json.loads((tmp_path / "policies" / "mine" / "three.json").read_text())  # a dataset's own policy folder
    assert data["guarantee"]["loss"] == "label_free" and data["provenance"]["dataset"] == "mine"
    assert data["calibration"]["accuracy"] is None


def test_calibrate_label_free_refuses_a_recorded_last_stage(tmp_path, monkeypatch, capsys):
    from cascade_core.cli import main

    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    assert main(["calibrate", "--preset", "api-recorded", "--label-free"]) == 2
    assert "replays recorded outcomes" in capsys.readouterr().err
    assert not (tmp_path / "policies").exists()


def test_label_free_auto_rule_leaves_out_loss_aware_and_refuses_it_by_name(tmp_path, monkeypatch, capsys):
    from _records import DEFAULT_STAGES, write_synthetic_records
    from cascade_core.cli import main

    write_synthetic_records(tmp_path / "results", n=1600)
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    preset = _preset(tmp_path, DEFAULT_STAGES)
    assert main(["calibrate", "--preset", str(preset), "--label-free", "--rule", "loss_aware"]) == 2
    assert "rule loss_aware models the last stage's own correctness" in capsys.readouterr().err
    assert main(["calibrate", "--preset", str(preset), "--label-free", "--target", "5"]) == 0
    data = json.loads((tmp_path / "policies" / "three.json").read_text())
    assert data["guarantee"]["rule"] in ("pt_only", "both", "learned") and "loss_aware" not in data["guarantee"]["cv"]


def test_the_report_s_label_free_guarantee_of_the_local_cascade_is_rendered_in_section_7():
    """MMLU's report computes the local cascade's label-free guarantee without features (issue 20)
    and section 7 shows it beside the labelled one, even where the probes part is skipped."""
    from cascade_core.records.table import synthetic_table
    from cascade_core.report.common import ReportSettings
    from cascade_core.report.label_free import LabelFreeSection, label_free_guarantee
    from cascade_core.report.markdown import label_free_section

    table = synthetic_table(800, 3, seed=1)
    g = label_free_guarantee(table, ReportSettings(resplits_others=4), lambda message: None)
    assert g["stages"] == list(table.names) and g["resplits"] == 4 and set(g["agreement"]) == set(table.names[:-1])
    for kind in ("label_free", "labelled"):
        for r in g[kind].values():
            assert 0 <= r["held_share"] <= 1 and r["saving_p05"] <= r["saving_mean"] + 1e-12
    for r in g["label_free"].values():
        assert r["held_share"] >= r["certified_held_share"]  # the certified disagreement bounds the accuracy lost

    class _Report:
        label_free = LabelFreeSection(skipped="no hidden-state features", guarantee=g)

    text = "\n".join(label_free_section(_Report()))
    assert "Skipped: no hidden-state features." in text and "### The label-free guarantee of the local cascade" in text
    assert "| label-free | `pt_only` |" in text and "| labelled | `pt_only` |" in text
    assert label_free_guarantee(table.stage_subset([2]), ReportSettings(), lambda m: None) is None
