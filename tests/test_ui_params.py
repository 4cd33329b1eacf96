"""Shared Explore links restore exactly what the sender saw (issue 22): every stage's on/off and
thresholds to the last digit, whatever the receiving page opens on."""

from __future__ import annotations

import pytest

from cascade_core.ui_data import StageSetting, settings_from_params, settings_to_params

RULES = ("both", "pt_only", "pik_only", "learned", "loss_aware")
STAGES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


@pytest.mark.parametrize("rule, score", [("both", 0.0), ("learned", 0.23456789), ("loss_aware", -0.0123456)])
def test_params_settings_params_round_trip_is_exact(rule, score):
    sent = {"smollm2-135m": StageSetting(0.123456789, 0.41, True, score),
            "qwen2.5-coder-0.5b": StageSetting(0.57, 1 / 3, False, 0.3),
            "qwen2.5-coder-1.5b": StageSetting(0.0, 0.0, True, 0.0)}
    params = settings_to_params(sent, rule)
    assert {params[f"on.{n}"] for n in STAGES} == {"1", "0"}  # on is written too, not only off
    # the receiving page opens on other settings (e.g. its calibrated policy): the link wins in full
    # (a score threshold travels only under a scored rule, where it is used)
    opened_on = {n: StageSetting(0.9, 0.9, not s.enabled, 0.5 if rule in ("learned", "loss_aware") else s.tau_score)
                 for n, s in sent.items()}
    restored, got_rule, problems = settings_from_params(params, opened_on, RULES)
    assert problems == [] and got_rule == rule
    assert restored == sent  # to the last digit
    assert settings_to_params(restored, rule) == params


def test_a_stage_calibration_switched_off_and_the_sender_switched_on_comes_back_on():
    """The case of issue 22: the calibrated policy has SmolLM2 off; the sender switched it on."""
    calibrated = {"smollm2-135m": StageSetting(0.0, 0.0, False), "qwen2.5-coder-0.5b": StageSetting(0.0, 0.0, False),
                  "qwen2.5-coder-1.5b": StageSetting(0.0, 0.0, True)}
    sent = dict(calibrated, **{"smollm2-135m": StageSetting(0.74, 0.5, True)})
    params = settings_to_params(sent, "both")
    assert params["on.smollm2-135m"] == "1"
    restored, _, problems = settings_from_params(params, calibrated, RULES)
    assert not problems and restored == sent


def test_an_old_link_without_on_keeps_the_page_s_own_on_off():
    """Links made before every on/off was written: a stage they do not name keeps the opened state."""
    opened_on = {"smollm2-135m": StageSetting(0.5, 0.5, False), "qwen2.5-coder-1.5b": StageSetting(0.0, 0.0, True)}
    restored, _, _ = settings_from_params({"rule": "both", "t.smollm2-135m": "0.6"}, opened_on, RULES)
    assert restored["smollm2-135m"] == StageSetting(0.6, 0.5, False)
