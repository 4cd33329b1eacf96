"""The composition layer: one answer to "where does it live", the P(IK) write-back, the Route
page's threshold question, and the CascadeError trace attribute."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cascade_core.cascade import CascadeError, RuntimeStage, run_cascade
from cascade_core.compose.jobs import with_p_ik
from cascade_core.locations import DATA_DIR, locations
from cascade_core.policy import LearnedCombiner, StagePolicy, keep_mask
from cascade_core.presets import StageConfig
from cascade_core.records.schema import RUNNER_COLUMNS, RecordSchemaError
from cascade_core.types import Question
from app_ui.view_model import thresholds_applied

ENV = ("CASCADE_RESULTS_DIR", "CASCADE_FEATURES_DIR", "CASCADE_PROBES_DIR", "CASCADE_POLICIES_DIR",
       "CASCADE_HIDDEN_DIR")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_locations_default_to_the_repository_data(clean_env):
    where = locations()
    assert where.results == DATA_DIR / "results" and where.features == DATA_DIR / "features"
    assert where.probes == DATA_DIR / "probes" and where.hidden == DATA_DIR / "hidden"
    assert where.record_path("s") == DATA_DIR / "results" / "mmlu" / "s.parquet" and where.is_default_results


def test_environment_overrides_and_explicit_arguments_win(clean_env, tmp_path):
    clean_env.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "r"))
    where = locations()
    assert where.results == tmp_path / "r" and not where.is_default_results
    assert where.features == tmp_path / "features"  # beside a results folder from the environment
    clean_env.setenv("CASCADE_FEATURES_DIR", str(tmp_path / "f"))
    clean_env.setenv("CASCADE_PROBES_DIR", str(tmp_path / "p"))
    where = locations()
    assert (where.features, where.probes) == (tmp_path / "f", tmp_path / "p")
    assert where.features_dir("s", "mmlu") == tmp_path / "f" / "mmlu" / "s"
    assert locations(results_dir=tmp_path / "x").results == tmp_path / "x"  # a CLI flag beats the variable


def test_probe_path_is_the_presets_else_the_probes_folder(clean_env, tmp_path):
    where = locations(probes_dir=tmp_path)
    named = StageConfig(name="a", backend="packaged", model="m", probe="data/probes/a.npz")
    assert where.probe_path(named) == DATA_DIR / "probes" / "a.npz"
    assert where.probe_path(StageConfig(name="b", backend="packaged", model="m")) == tmp_path / "b.npz"


def test_p_ik_write_back_follows_the_schema():
    records = pd.DataFrame({"qid": ["a", "b"], "split": ["calibration", "test"], "correct": [True, False],
                            "prediction": [0, 1], "p_t": [0.9, 0.4]})
    out = with_p_ik(records, np.array([0.7, 0.2]), "x.parquet")
    assert out["p_ik_source"].tolist() == ["out-of-fold", "probe"] and out["p_ik"].tolist() == [0.7, 0.2]
    with pytest.raises(RecordSchemaError, match="x.parquet: column 'p_ik'"):
        with_p_ik(records, np.array([0.7, 1.2]), "x.parquet")
    assert "p_ik" not in RUNNER_COLUMNS  # derived, never written by the runner


def _flips(policy, signal, p_t, p_ik, margin, entropy):
    """Brute force: does sweeping this one signal over [0, 1] change keep_mask's decision?"""
    grid = np.linspace(0, 1, 401)
    values = {"p_t": np.full(grid.size, p_t), "p_ik": np.full(grid.size, p_ik)}
    values[signal] = grid
    decided = keep_mask(policy, values["p_t"], values["p_ik"], np.full(grid.size, margin), np.full(grid.size, entropy))
    return decided.any() and not decided.all()


@pytest.mark.parametrize("rule", ["both", "pt_only", "pik_only", "learned"])
@pytest.mark.parametrize("p_ik", [0.2, 0.8, math.nan])
def test_thresholds_applied_agrees_with_keep_mask(rule, p_ik):
    combiner = LearnedCombiner(("p_t", "p_ik"), (2.0, 3.0), 0.0, (0.5, 0.5), (0.2, 0.2)) if rule == "learned" else None
    policy = StagePolicy(tau_t=0.6, tau_ik=0.5, rule=rule, combiner=combiner)
    applied = thresholds_applied(policy, 0.3, p_ik, 0.1, 0.5)
    if rule == "learned" and not math.isnan(p_ik):
        assert applied == {"tau_t": False, "tau_ik": False}  # the combined score decides, not τ_T or τ_IK
        return
    # τ_T applies iff P(T) alone can flip the decision once P(IK) passes (or is missing).
    assert applied["tau_t"] == _flips(policy, "p_t", 0.3, p_ik if math.isnan(p_ik) else 1.0, 0.1, 0.5)
    expected_ik = not math.isnan(p_ik) and _flips(policy, "p_ik", 1.0, p_ik, 0.1, 0.5)
    assert applied["tau_ik"] == expected_ik


class _Failing:
    model_id, has_hidden_states, total_params, non_embedding_params = "broken", False, 1, 1

    def score_options(self, prompts, n_options, layers=None):
        raise RuntimeError("boom")


def test_cascade_error_carries_its_trace():
    with pytest.raises(CascadeError) as err:
        run_cascade([RuntimeStage(name="only", backend=_Failing())], Question("q?", ("a", "b")))
    assert str(err.value) == "stage 'only' failed: RuntimeError: boom"
    assert err.value.trace.steps[0].decision == "error" and err.value.trace.steps[0].stage == "only"


def test_probes_train_cli_writes_the_probe_and_p_ik_where_the_variables_say(tmp_path, clean_env, capsys):
    from _records import write_synthetic_records
    from cascade_core.cli import main
    from cascade_core.io import atomic_write_npz
    from cascade_core.probe import PIKProbe

    results, features, probes = tmp_path / "results", tmp_path / "features", tmp_path / "probes"
    table = write_synthetic_records(results, n=300, names=("s1",))
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(table.n_questions, 12)) + 1.5 * table.correct[0][:, None] * (np.arange(12) < 3)
    atomic_write_npz(features / "mmlu" / "s1" / "chunk-0.npz", qid=table.qids, layer_4=hidden.astype(np.float16))
    preset = tmp_path / "one.toml"  # no `probe` key: the probe goes to $CASCADE_PROBES_DIR, never data/probes/
    preset.write_text('name = "one"\n[[stages]]\nname = "s1"\nbackend = "packaged"\nmodel = "smollm2-135m"\n')
    clean_env.setenv("CASCADE_RESULTS_DIR", str(results))
    clean_env.setenv("CASCADE_PROBES_DIR", str(probes))
    assert main(["probes", "train", "--preset", str(preset)]) == 0
    assert "s1: layer 4" in capsys.readouterr().out
    probe = PIKProbe.load(probes / "s1.npz")
    records = pd.read_parquet(results / "mmlu" / "s1.parquet")
    assert probe.layer == 4 and records["p_ik"].between(0, 1).all()
    assert set(records["p_ik_source"]) == {"out-of-fold", "probe"}
    test = records["split"] == "test"
    assert np.allclose(records.loc[test, "p_ik"], probe.p_ik(hidden[test.to_numpy()].astype(np.float16)))


@pytest.mark.model
def test_bench_stage_writes_records_and_features_in_the_locations(tmp_path, smollm2_backend):
    from cascade_core.records.runner import load_features, load_records
    from cascade_core.compose.jobs import bench_questions, bench_stage

    where = locations(tmp_path / "r", tmp_path / "f")
    config = StageConfig(name="smollm2-135m", backend="packaged", model="smollm2-135m")
    questions = bench_questions(per_subject=2, subjects=["astronomy", "virology"]).head(4)
    records = bench_stage(config, questions, where, backend=smollm2_backend, batch_size=2)
    assert len(records) == 4 and where.record_path(config.name).exists()
    assert load_records(where.record_path(config.name))["qid"].tolist() == records["qid"].tolist()
    qids, layers = load_features(where.features_dir(config.name))
    assert sorted(qids) == sorted(records["qid"]) and layers
    assert records["model_hash"].str.len().gt(0).all()  # describe_backend: the packaged GGUF's hash


def test_a_stage_without_a_probe_key_reads_the_probe_probes_train_wrote(tmp_path, clean_env):
    """`probes train` writes <probes>/<stage>.npz for a preset without `probe` keys; the live stage
    must read that file (route, serve, the app), not silently route on P(T) alone."""
    from cascade_core.compose.live import load_probe
    from cascade_core.probe import PIKProbe

    class _Hidden:
        has_hidden_states = True
        model_id = "smollm2-135m"

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(80, 6)), rng.random(80) < 0.5
    PIKProbe(layer=3, model_id="smollm2-135m").fit(X, y).save(tmp_path / "probes" / "s1.npz")
    config = StageConfig(name="s1", backend="packaged", model="smollm2-135m")
    assert load_probe(config, _Hidden()) is None  # no s1.npz in data/probes/
    clean_env.setenv("CASCADE_PROBES_DIR", str(tmp_path / "probes"))
    probe = load_probe(config, _Hidden())
    assert probe is not None and probe.layer == 3
    assert load_probe(StageConfig(name="s2", backend="packaged", model="smollm2-135m"), _Hidden()) is None
