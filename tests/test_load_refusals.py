"""Refused at load, naming the file and the key or column (issue 13 item 5): presets, probes, records.

These belong in the bad-input corpus (tests/test_bad_inputs.py, section "presets, probes,
records"); they live here until that file exists. Each case runs the real loader, and the CLI
cases the real `python -m cascade_core` entry point (in-process), with no model loaded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _records import write_synthetic_records
from cascade_core.cli import main
from cascade_core.compose.live import load_probe
from cascade_core.compose.tables import load_preset_table
from cascade_core.io import CorruptFileError
from cascade_core.presets import PresetError, load_preset
from cascade_core.probe import PIKProbe
from cascade_core.record_schema import RecordSchemaError

STAGE = """
[[stages]]
name = "small"
backend = "packaged"
model = "smollm2-135m"
"""


def write_preset(tmp_path, extra: str) -> str:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n{STAGE}{extra}\n', encoding="utf-8")
    return str(path)


# -- presets ------------------------------------------------------------------------------------------
def test_a_missing_probe_file_is_refused_at_load_naming_file_and_key(tmp_path):
    path = write_preset(tmp_path, f'probe = "{tmp_path}/absent.npz"')
    load_preset(path)  # reading the preset alone (listing, report, bench) does not need the probe
    with pytest.raises(PresetError) as err:
        load_preset(path, check_files=True)
    assert str(tmp_path / "p.toml") in str(err.value) and "stages.0.probe" in str(err.value)
    assert "absent.npz" in str(err.value) and "probe_optional" in str(err.value)


def test_route_refuses_a_missing_probe_before_loading_any_model(tmp_path, capsys):
    path = write_preset(tmp_path, f'probe = "{tmp_path}/absent.npz"')
    code = main(["route", "2+2?", "--options", "3", "4", "--preset", path])
    err = capsys.readouterr().err
    assert code == 2 and "stages.0.probe" in err and "absent.npz" in err and "Traceback" not in err


class _HiddenBackend:
    model_id, has_hidden_states = "m", True


def test_probe_optional_routes_on_p_t_alone(tmp_path):
    preset = load_preset(write_preset(tmp_path, f'probe = "{tmp_path}/absent.npz"\nprobe_optional = true'),
                         check_files=True)
    assert preset.stages[0].probe_optional and load_probe(preset.stages[0], _HiddenBackend()) is None
    strict = load_preset(write_preset(tmp_path, f'probe = "{tmp_path}/absent.npz"'))
    with pytest.raises(PresetError, match="absent.npz"):
        load_probe(strict.stages[0], _HiddenBackend())


def test_shipped_presets_pass_the_file_check():
    from cascade_core.presets import list_presets

    for name in list_presets():
        preset = load_preset(name, check_files=True)
        preset.check_files([s.name for s in preset.stages + preset.extra_stages])


@pytest.mark.parametrize("line, key", [
    ('tau_t = "0.5"', "stages.0.tau_t"), ('tau_ik = "0.5"', "stages.0.tau_ik"),
    ('tau_learned = "0.5"', "stages.0.tau_learned"), ('price_in = "2.5"', "stages.0.price_in"),
    ("tau_t = true", "stages.0.tau_t"), ('enabled = "yes"', "stages.0.enabled"),
    ('batch_size = "8"', "stages.0.batch_size"), ('probe_optional = "true"', "stages.0.probe_optional"),
])
def test_non_numeric_thresholds_and_strings_for_numbers_are_refused(tmp_path, line, key):
    with pytest.raises(PresetError) as err:
        load_preset(write_preset(tmp_path, line))
    assert key in str(err.value) and "p.toml" in str(err.value)


def test_numbers_written_as_integers_still_load(tmp_path):
    stage = load_preset(write_preset(tmp_path, "tau_t = 1\ntau_ik = 0\nprice_in = 3")).stages[0]
    assert (stage.tau_t, stage.tau_ik, stage.price_in) == (1.0, 0.0, 3.0)


# -- probes -------------------------------------------------------------------------------------------
def test_random_bytes_are_not_a_probe_file(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CorruptFileError) as err:
        PIKProbe.load(path)
    assert str(path) in str(err.value) and "not a probe file" in str(err.value)
    assert "pickle" not in str(err.value)


def test_an_npz_without_the_probe_arrays_is_not_a_probe_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(CorruptFileError, match="other.npz is not a probe file"):
        PIKProbe.load(path)


# -- records ------------------------------------------------------------------------------------------
@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    write_synthetic_records(root, n=200)
    return root


def damage(results, column: str, value, row: int = 5, stage: str = "smollm2-135m"):
    path = results / "mmlu" / f"{stage}.parquet"
    frame = pd.read_parquet(path)
    if column == "p_ik_source":
        frame[column] = "probe"
    else:
        if isinstance(value, str):  # a column of text, e.g. numbers hand-edited into strings
            frame[column] = frame[column].astype(str)
        frame.loc[row, column] = value
    frame.to_parquet(path)
    return path


@pytest.mark.parametrize("column, value, words", [
    ("p_t", np.nan, "NaN"), ("p_t", 7.0, "[0, 1]"), ("p_t", -0.1, "[0, 1]"),
    ("p_ik", 1.5, "[0, 1]"), ("margin", np.nan, "NaN"), ("margin", 2.0, "[0, 1]"),
    ("prompt_tokens", -3, ">= 0"), ("output_tokens", -1, ">= 0"), ("flops", -1e9, ">= 0"),
    ("seconds", -0.5, ">= 0"), ("dollars", np.inf, ">= 0"), ("p_t", "high", "numeric"),
])
def test_records_out_of_schema_are_refused_naming_file_and_column(results, column, value, words):
    path = damage(results, column, value)
    with pytest.raises(RecordSchemaError) as err:
        load_preset_table("default", results_dir=results, include_recorded=False)
    text = str(err.value)
    assert str(path) in text and f"column {column!r}" in text and words in text


def test_p_ik_lost_where_a_probe_scored_it_is_refused(results):
    path = damage(results, "p_ik_source", None)
    frame = pd.read_parquet(path)
    frame.loc[3, "p_ik"] = np.nan
    frame.to_parquet(path)
    with pytest.raises(RecordSchemaError, match="'p_ik' is NaN where p_ik_source says a probe scored it"):
        load_preset_table("default", results_dir=results, include_recorded=False)


def test_p_ik_not_yet_scored_is_allowed(results):
    path = results / "mmlu" / "smollm2-135m.parquet"
    frame = pd.read_parquet(path)
    frame.loc[3, "p_ik"] = np.nan  # benchmarked after the probe was trained: no P(IK) yet
    frame.to_parquet(path)
    table = load_preset_table("default", results_dir=results, include_recorded=False)
    assert np.isnan(table.p_ik[0]).sum() == 1


def test_report_cli_refuses_out_of_range_p_t(results, capsys):
    path = damage(results, "p_t", 7.0)
    code = main(["report", "--results-dir", str(results), "--out", "", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "'p_t'" in err and "Traceback" not in err


def test_environment_results_dir_is_honoured_by_the_cli(results, monkeypatch, capsys):
    damage(results, "p_t", np.nan)
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(results))
    code = main(["report", "--out", "", "--quiet"])
    assert code == 2 and str(results) in capsys.readouterr().err
