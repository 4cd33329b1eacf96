"""calibrate_policy: the chosen policy round-trips through its policy file and replays to its figures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cascade_core.bias import LetterBias
from cascade_core.choose.calibrated_policy import calibrate_policy
from cascade_core.choose.policy_file import (PolicyFileError, policy_file_from_calibrated, read_policy_file,
                                      write_policy_file)
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay

PROVENANCE = {"dataset": "synthetic", "split": "calibration", "questions": 0}


@pytest.fixture(scope="module")
def table():
    return synthetic_table(1500, 3, seed=3, accuracies=[0.5, 0.6, 0.8])


@pytest.fixture(scope="module")
def calib(table):
    return table.subset("calibration")


def _round_trip(chosen, tmp_path, **asked):
    written = policy_file_from_calibrated(chosen, "synthetic", PROVENANCE, **asked)
    path = write_policy_file(tmp_path / "synthetic.json", written)
    found = read_policy_file(path, expect_stages=chosen.stages)
    assert found == written
    return found


def test_target_mode_round_trips_through_the_policy_file_and_replays(calib, table, tmp_path):
    biases = (LetterBias((0.1, 0.2, 0.0, 0.3)), None, None)
    chosen = calibrate_policy(calib, target_max_loss=0.02, delta=0.1, unit="flops", biases=biases)
    found = _round_trip(chosen, tmp_path, target_pt=2.0)
    again = found.calibrated()
    assert again == chosen
    assert found.cascade_policy() == chosen.policy and found.letter_biases() == biases
    assert found.guarantee["certification"] == chosen.guarantee.to_dict()
    assert found.guarantee["mode"] == "target" and found.guarantee["target_pt"] == 2.0
    assert found.guarantee["letter_bias"] is True
    for split in (calib, table.subset("test")):
        ours, theirs = replay(split, again.policy), replay(split, chosen.policy)
        assert np.array_equal(ours.final_stage, theirs.final_stage) and ours.accuracy == theirs.accuracy
    assert replay(calib, again.policy).accuracy == pytest.approx(chosen.calibration["accuracy"])
    assert chosen.guarantee.mode == "loss" and chosen.guarantee.delta == 0.1
    assert chosen.rule in chosen.cv
    assert "calibrated for <= 2 pt at delta 0.1" in again.describe()
    assert found.description.startswith("calibrated for <= 2 pt at delta 0.1")


def test_budget_mode_keeps_the_budget_on_calibration_and_in_the_file(calib, tmp_path):
    budget = float(calib.cost("flops")[-1].mean() * 0.7)
    chosen = calibrate_policy(calib, cost_budget=budget, delta=0.1, unit="flops")
    assert replay(calib, chosen.policy).mean_cost["flops"] <= budget
    assert chosen.guarantee.mode == "cost"
    found = _round_trip(chosen, tmp_path)
    assert found.guarantee["mode"] == "budget" and found.guarantee["budget"] == budget
    assert found.guarantee["target_pt"] is None and found.biases == [] and found.letter_biases() == ()
    assert found.calibrated().guarantee == chosen.guarantee and found.cascade_policy() == chosen.policy


def test_a_policy_file_without_a_certification_names_what_is_missing(calib, tmp_path):
    found = _round_trip(calibrate_policy(calib, delta=0.1), tmp_path)
    guarantee = {k: v for k, v in found.guarantee.items() if k != "certification"}
    with pytest.raises(PolicyFileError, match="certification"):
        replace(found, guarantee=guarantee).calibrated()
