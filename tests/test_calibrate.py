"""`calibrate` writes a guaranteed policy file; `route` then runs with it and says so.

Two real SmolLM2 stages ("small" and "large": the same model, so the test stays small) over the
committed SmolLM2 records; the policy file goes to a temporary folder through the environment.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cascade_core.cli import main
from cascade_core.locations import DATA_DIR, locations
from cascade_core.compose.policies import applied_policy
from cascade_core.choose.policy_file import PolicyFileError, read_policy_file
from cascade_core.presets import load_preset

STAGES = ("small", "large")


@pytest.fixture
def preset(tmp_path, monkeypatch):
    results = tmp_path / "results" / "mmlu"
    results.mkdir(parents=True)
    records = pd.read_parquet(DATA_DIR / "results" / "mmlu" / "smollm2-135m.parquet")
    for name in STAGES:
        records.assign(stage=name).to_parquet(results / f"{name}.parquet")
    path = tmp_path / "two.toml"
    path.write_text('name = "two"\n' + "".join(
        f'[[stages]]\nname = "{n}"\nbackend = "packaged"\nmodel = "smollm2-135m"\ndtype = "float32"\n'
        f'tau_t = 0.99\nrule = "pt_only"\n' for n in STAGES))
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    return path


def test_calibrate_writes_a_policy_file_with_its_guarantee_and_provenance(preset, capsys):
    assert main(["calibrate", "--preset", str(preset), "--rule", "pt_only", "--target", "2", "--delta", "0.2"]) == 0
    out = capsys.readouterr().out
    # Calibration is every record of the calibration split (the committed records grow while the
    # all-of-MMLU run lands, so the count is read, not written here).
    records = pd.read_parquet(DATA_DIR / "results" / "mmlu" / "smollm2-135m.parquet", columns=["split"])
    calibration = int((records["split"] == "calibration").sum())
    assert f"calibrated for <= 2 pt at delta 0.2 on {calibration:,} calibration questions" in out
    found = read_policy_file(locations().policies / "two.json", expect_stages=STAGES)
    assert found.guarantee["target_pt"] == 2.0 and found.guarantee["delta"] == 0.2
    assert found.provenance["questions"] == calibration and set(found.provenance["records_sha256"]) == set(STAGES)
    assert found.policy["stages"][-1]["enabled"]
    again = found.calibrated()  # what `route` runs is the policy that was calibrated
    assert again.policy == applied_policy(load_preset(preset)).policy
    assert again.rule == found.guarantee["rule"] == "pt_only"
    assert again.guarantee.delta == 0.2 and again.guarantee.target == pytest.approx(0.02)


@pytest.mark.model
def test_route_uses_the_calibrated_policy_and_says_so(preset, capsys):
    assert main(["calibrate", "--preset", str(preset), "--rule", "pt_only"]) == 0
    capsys.readouterr()
    found = read_policy_file(locations().policies / "two.json")
    assert main(["route", "2+2?", "--options", "3", "4", "5", "6", "--preset", str(preset), "--json"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["thresholds"] == f"thresholds: {found.description}"
    small = found.policy["stages"][0]
    if small["enabled"]:
        assert trace["steps"][0]["stage"] == "small" and f"{small['tau_t']:.2f}" in trace["steps"][0]["reason"]
    else:  # calibration switched the first stage off: the trace says so, with the reason
        assert [o["stage"]
                for o in trace["off"]] == ["small"] and "calibration switched it off" in trace["off"][0]["reason"]
        assert [s["stage"] for s in trace["steps"]] == ["large"]
    assert main(["route", "2+2?", "--options", "3", "4", "--preset", str(preset), "--json", "--thresholds",
                 "preset"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["thresholds"].startswith("thresholds: from the preset file") and trace["off"] == []
    assert trace["steps"][0]["stage"] == "small"


def test_a_policy_file_for_other_stages_is_refused(preset, tmp_path):
    main(["calibrate", "--preset", str(preset), "--rule", "pt_only"])
    other = tmp_path / "two-renamed.toml"
    other.write_text(preset.read_text().replace('name = "large"', 'name = "big"'))
    renamed = load_preset(other)
    with pytest.raises(PolicyFileError,
                       match=r"made for stages \['small', 'large'\], but the preset runs \['small', 'big'\]"):
        applied_policy(renamed)


def test_thresholds_calibrated_without_a_file_names_the_command(preset):
    with pytest.raises(FileNotFoundError, match="calibrate --preset two"):
        applied_policy(load_preset(preset), thresholds="calibrated")


def test_letter_bias_is_fit_on_calibration_stored_and_applied_to_the_live_stages(preset):
    from cascade_core.bias import LetterBias
    from cascade_core.compose.policies import apply_to_stages
    from cascade_core.cascade import RuntimeStage

    assert main(["calibrate", "--preset", str(preset), "--rule", "pt_only", "--letter-bias"]) == 0
    found = read_policy_file(locations().policies / "two.json")
    assert found.guarantee["letter_bias"] is True
    first, last = found.biases
    assert last is None and first["kind"] == "letter_bias" and len(first["offsets"]) == 4
    # SmolLM2 answers "A" on nearly every question: its bias pushes "A" down the most.
    assert min(first["offsets"]) == first["offsets"][0]
    applied = applied_policy(load_preset(preset))
    stages = apply_to_stages([RuntimeStage(name=n, backend=None) for n in STAGES], applied, load_preset(preset))
    assert isinstance(stages[0].bias, LetterBias) and stages[1].bias is None
