"""Shared Explore links restore exactly what the sender saw (issue 22): every stage's on/off and
thresholds to the last digit, whatever the receiving page opens on."""

from __future__ import annotations

import pytest

from app_ui.view_model import StageSetting, settings_from_params, settings_to_params

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


# ---- the Route page's examples and the one headline (issue 22, items 3 and 6) ---------------------------
def test_route_examples_are_kept_and_escalated_under_the_policy_even_with_the_signals_moved():
    import numpy as np

    from cascade_core.policy import CascadePolicy, StagePolicy, keep_mask
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.replay import replay
    from app_ui.view_model import route_examples

    table = synthetic_table(600, 3, seed=5)
    policy = CascadePolicy((StagePolicy(0.6, 0.5), StagePolicy(0.0, 0.0, enabled=False), StagePolicy(0.0, 0.0)))
    found = route_examples(table, policy)
    assert set(found) == {"keep", "escalate"}
    final = replay(table, policy).final_stage
    qids = list(table.qids)
    keep, esc = qids.index(found["keep"].qid), qids.index(found["escalate"].qid)
    assert final[keep] == 0 and final[esc] == 2 and found["escalate"].answered_by == table.names[2]
    for i, kind, dp in ((keep, "keep", -0.05), (esc, "escalate", 0.05)):  # robust to a 0.05 shift against it
        moved = keep_mask(policy.stages[0], [table.p_t[0, i] + dp], [table.p_ik[0, i] + dp])[0]
        assert moved == (kind == "keep")
    assert table.correct[0, keep] and not table.correct[0, esc] and table.correct[2, esc]  # the preferred kinds
    # a policy with one stage in use routes nothing: no examples
    assert route_examples(table, CascadePolicy((StagePolicy(0.6, 0.5, enabled=False),) * 2 + (StagePolicy(0,
                                                                                                          0),))) == {}
    assert np.isfinite(found["keep"].p_t)


def test_a_target_policy_is_what_calibrate_would_write():
    from cascade_core.choose.calibrated_policy import calibrate_policy
    from cascade_core.records.table import synthetic_table
    from app_ui.view_model import policy_for_target

    calib = synthetic_table(800, 3, seed=2)
    found = policy_for_target(calib, 3.0)
    chosen = calibrate_policy(calib, target_max_loss=0.03, delta=0.1, unit="flops")
    assert found.policy == chosen.policy and found.rule == chosen.rule
    assert found.description == chosen.describe() and "<= 3 pt" in found.description
    assert all(not s.enabled for n, s in zip(chosen.stages, chosen.policy.stages) if n in found.off_reasons)


def test_readme_home_and_benchmarks_quote_one_guaranteed_headline():
    """The README carries the sentence `headline_sentence` makes from the report's guarantee table
    (Home and the Benchmarks page draw the same function's output)."""
    from pathlib import Path

    from app_ui.view_model import guarantee_headline, headline_sentence

    repo = Path(__file__).resolve().parent.parent
    found = guarantee_headline((repo / "docs" / "RESULTS.md").read_text(encoding="utf-8"))
    assert found is not None and found["held_share"].endswith("%") and found["resplits"].isdigit()
    assert headline_sentence(found) in (repo / "README.md").read_text(encoding="utf-8")


def test_guarantee_headline_reads_the_headline_row_and_nothing_else():
    from app_ui.view_model import guarantee_headline

    text = ("# R\n\n## The guarantee: x\n\nThresholds chosen by **Learn-then-Test** at delta = 0.2: ... is at most 3 "
            "pt.\n\n"
            "| cascade | rule (committed split) | saving (test) | Δacc (test) | target on test | re-splits | held "
            "share | "
            "mean saving | 5th pct saving | saving counts |\n|---|---|---|---|---|---|---|---|---|---|\n"
            "| a → b | `both` | 1.0% | -0.1 pt | held | 20 | 95.0% | 2.0% | 0.5% | FLOPs saved |\n"
            "| c → d (headline) | `pt_only` | 9.9% | -0.9 pt | held | 200 | 91.0% | 9.0% | 8.0% | GPT-4 calls saved |\n"
            "\n## Summary\n| cascade (headline) | x |\n")
    found = guarantee_headline(text)
    assert found["cascade"] == "c → d" and found["rule"] == "pt_only" and found["held_share"] == "91.0%"
    assert found["target"] == "≤ 3 pt" and found["delta"] == "0.2"
    assert guarantee_headline("# no guarantee section\n") is None


def test_a_recorded_last_stage_opens_in_dollars_or_calls():
    from app_ui.view_model import default_unit

    assert default_unit(False) == "flops"
    assert default_unit(True, priced=True) == "dollars" and default_unit(True, priced=False) == "calls"


def test_the_trace_download_is_strict_json():
    import json

    from app_ui.view_model import json_text

    text = json_text({"p_ik": float("nan"), "lp": [["a", float("-inf")]], "ok": 1.5})
    assert json.loads(text) == {"p_ik": None, "lp": [["a", None]], "ok": 1.5}
