"""calibrate_policy: the chosen policy round-trips through plain JSON and replays to its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.bias import LetterBias
from cascade_core.calibrated import CalibratedPolicy, calibrate_policy
from cascade_core.records import synthetic_table
from cascade_core.replay import replay


@pytest.fixture(scope="module")
def calib():
    return synthetic_table(1500, 3, seed=3, accuracies=[0.5, 0.6, 0.8]).subset("calibration")


def test_target_mode_round_trips_and_replays(calib):
    chosen = calibrate_policy(calib, target_max_loss=0.02, delta=0.1, unit="flops",
                              biases=(LetterBias((0.1, 0.2, 0.0, 0.3)), None, None))
    data = json.loads(json.dumps(chosen.to_dict(), allow_nan=False))
    again = CalibratedPolicy.from_dict(data)
    assert again == chosen
    result = replay(calib, again.policy)
    assert result.accuracy == pytest.approx(chosen.calibration["accuracy"])
    assert chosen.guarantee.mode == "loss" and chosen.guarantee.delta == 0.1
    assert chosen.rule in chosen.cv
    assert "calibrated for <= 2 pt at delta 0.1" in again.describe()


def test_budget_mode_keeps_the_budget_on_calibration(calib):
    budget = float(calib.cost("flops")[-1].mean() * 0.7)
    chosen = calibrate_policy(calib, cost_budget=budget, delta=0.1, unit="flops")
    assert replay(calib, chosen.policy).mean_cost["flops"] <= budget
    assert chosen.guarantee.mode == "cost"


def test_a_damaged_policy_file_names_what_is_wrong(calib):
    data = calibrate_policy(calib, delta=0.1).to_dict()
    with pytest.raises(ValueError, match="format"):
        CalibratedPolicy.from_dict({**data, "format": "other"})
    del data["guarantee"]
    with pytest.raises(ValueError, match="guarantee"):
        CalibratedPolicy.from_dict(data)
