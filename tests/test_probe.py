import json

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from cascade_core.signal_quality import auroc, expected_calibration_error
from cascade_core.io import CorruptFileError
from cascade_core.probe import PIKProbe, ProbeMismatchError, choose_layer, choose_probe, out_of_fold_p_ik


def _separable(n=1000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X[:, :3].sum(axis=1) > 0.3
    return X.astype(np.float32), y


def _noisy(n=1500, d=32, seed=0, strength=2.0):
    """Labels drawn from a known logistic model: the probe can learn it, not perfectly."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, size=d) + rng.normal(0, 100, size=d)
    z = (X - X.mean(0)) / X.std(0)
    y = rng.random(n) < 1 / (1 + np.exp(-(strength * z[:, 0] - 1.0)))
    return X, y


@pytest.fixture(scope="module")
def fitted():
    X, y = _separable()
    return PIKProbe(layer=12, model_id="org/model-a", C=1.0).fit(X, y, cv_folds=5), X, y


def test_separable_features_give_auroc_near_one(fitted):
    probe, X, y = fitted
    X_test, y_test = _separable(seed=1)
    assert auroc(probe.p_ik(X_test), y_test) > 0.98
    assert probe.metadata["cv_auroc"] > 0.97
    assert probe.metadata["n_train"] == 1000
    assert probe.metadata["positive_rate"] == pytest.approx(y.mean())


def test_random_labels_give_auroc_near_half():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1000, 32))
    y = rng.random(1000) < 0.3
    oof = out_of_fold_p_ik(X, y, folds=5, seed=0)
    assert auroc(oof, y) == pytest.approx(0.5, abs=0.06)


def test_predict_proba_shape_like_sklearn(fitted):
    probe, X, _ = fitted
    proba = probe.predict_proba(X[:7])
    assert proba.shape == (7, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 1], probe.p_ik(X[:7]))
    assert probe.p_ik(X[:1]).shape == (1,)


def test_matches_sklearn_pipeline(fitted):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe, X, y = fitted
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(X, y)
    np.testing.assert_allclose(probe.p_ik(X), reference.predict_proba(X)[:, 1], atol=1e-6)


def test_learned_probabilities_are_calibrated_without_class_weights():
    X, y = _noisy()
    oof = out_of_fold_p_ik(X, y, folds=5, seed=0)
    assert auroc(oof, y) > 0.8
    assert expected_calibration_error(oof, y) < 0.06
    balanced = out_of_fold_p_ik(X, y, folds=5, seed=0, class_weight="balanced")
    # "balanced" ranks the same way but moves predictions towards 0.5 on skewed labels
    assert auroc(balanced, y) == pytest.approx(auroc(oof, y), abs=0.02)
    assert abs(balanced.mean() - 0.5) < abs(oof.mean() - 0.5)


def test_out_of_fold_is_deterministic_and_differs_from_in_sample():
    X, y = _noisy(n=300, d=150, seed=5, strength=0.5)
    a = out_of_fold_p_ik(X, y, seed=1)
    np.testing.assert_array_equal(a, out_of_fold_p_ik(X, y, seed=1))
    in_sample = PIKProbe(0, "m").fit(X, y).p_ik(X)
    # d ~ n: the in-sample probe memorises; out-of-fold predictions do not
    assert auroc(in_sample, y) > auroc(a, y) + 0.1


def test_choose_layer_picks_the_informative_one():
    rng = np.random.default_rng(7)
    n = 600
    y = rng.random(n) < 0.4
    signal = y[:, None] * 1.5 + rng.normal(size=(n, 16))
    weak = y[:, None] * 0.1 + rng.normal(size=(n, 16))
    noise = rng.normal(size=(n, 16))
    best, scores = choose_layer({3: noise, 9: signal, 15: weak}, y, folds=4, seed=0)
    assert best == 9
    assert set(scores) == {3, 9, 15}
    assert scores[9] > 0.95 and scores[9] > scores[15] > scores[3] - 0.1
    assert abs(scores[3] - 0.5) < 0.1


def test_choose_probe_searches_layers_and_regularisation_together():
    rng = np.random.default_rng(3)
    n, d = 200, 400
    y = rng.random(n) < 0.5
    signal = rng.normal(size=(n, d))
    signal[:, :5] += y[:, None] * 0.8
    noise = rng.normal(size=(n, d))
    layer, C, scores = choose_probe({4: noise, 8: signal}, y, folds=4, seed=0, Cs=(1.0, 1e-3))
    assert set(scores) == {(4, 1e-3), (4, 1.0), (8, 1e-3), (8, 1.0)}
    assert (layer, C) == max(scores, key=scores.get) and layer == 8
    assert min(scores[(8, 1e-3)], scores[(8, 1.0)]) > max(scores[(4, 1e-3)], scores[(4, 1.0)])
    with pytest.raises(ValueError, match="Cs must be"):
        choose_probe({8: signal}, y, Cs=(0.0,))


def test_probe_grid_is_choose_probe_plus_the_chosen_pair_out_of_fold_bit_for_bit():
    """The grid computes fold by fold (one standardisation per fold for every C): its scores and
    the chosen pair's out-of-fold P(IK) are exactly what `choose_layer`/`out_of_fold_p_ik` give."""
    from cascade_core.probe import probe_grid

    rng = np.random.default_rng(4)
    n, d = 240, 30
    y = rng.random(n) < 0.6
    layers = {2: (rng.normal(size=(n, d)) + 0.7 * y[:, None]).astype(np.float16),
              5: rng.normal(size=(n, d)).astype(np.float16)}
    Cs = (1e-2, 1e-3, 1.0)
    layer, C, scores, oof = probe_grid(layers, y, folds=4, seed=1, Cs=Cs)
    assert list(scores) == [(k, c) for c in sorted(Cs) for k in (2, 5)]
    for c in Cs:
        _, per_layer = choose_layer(layers, y, folds=4, seed=1, C=c)
        assert {k: scores[(k, c)] for k in per_layer} == per_layer
    assert (layer, C) == choose_probe(layers, y, folds=4, seed=1, Cs=Cs)[:2]
    np.testing.assert_array_equal(oof, out_of_fold_p_ik(layers[layer], y, folds=4, seed=1, C=C))


def test_probe_grid_options_stop_the_path_and_warm_start_within_tolerance():
    """`stop_after_worse` leaves out the C values after k worse ones in a row (the scores say which
    were tried); `warm_start` changes the fits only within the solver's tolerance."""
    from cascade_core.probe import probe_grid

    rng = np.random.default_rng(7)
    n, d = 300, 60
    y = rng.random(n) < 0.5
    X = rng.normal(size=(n, d))
    X[:, :3] += 0.6 * y[:, None]
    Cs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    full = probe_grid({1: X}, y, folds=3, seed=0, Cs=Cs)
    curve = [full[2][(1, c)] for c in Cs]
    stopped = probe_grid({1: X}, y, folds=3, seed=0, Cs=Cs, stop_after_worse=1)
    best, tried = -np.inf, []
    for c, value in zip(Cs, curve):  # the rule, replayed on the full grid's scores
        tried.append(c)
        if value < best:
            break
        best = max(best, value)
    assert len(tried) < len(Cs) and list(stopped[2]) == [(1, c) for c in tried]
    assert all(stopped[2][k] == full[2][k] for k in stopped[2])
    warm = probe_grid({1: X}, y, folds=3, seed=0, Cs=Cs, warm_start=True)
    assert set(warm[2]) == set(full[2])
    assert max(abs(warm[2][k] - full[2][k]) for k in full[2]) < 1e-3
    with pytest.raises(ValueError, match="stop_after_worse"):
        probe_grid({1: X}, y, stop_after_worse=0)


def test_float32_solver_moves_the_fits_only_within_tolerance():
    """`float32` (the report's retrained probes) solves on float32 rows: the grid's scores, its
    out-of-fold P(IK) and a fitted probe stay within the solver's tolerance of the float64 ones,
    and a probe's arrays stay float64 (saved and predicted as before)."""
    from cascade_core.probe import probe_grid

    rng = np.random.default_rng(11)
    n, d = 400, 50
    y = rng.random(n) < 0.4
    X = rng.normal(size=(n, d))
    X[:, :4] += 0.5 * y[:, None]
    Cs = (1e-3, 1e-2, 1e-1)
    full = probe_grid({2: X}, y, folds=3, seed=0, Cs=Cs)
    single = probe_grid({2: X}, y, folds=3, seed=0, Cs=Cs, float32=True)
    assert set(single[2]) == set(full[2]) and single[:2] == full[:2]
    assert max(abs(single[2][k] - full[2][k]) for k in full[2]) < 1e-3
    assert single[3].dtype == np.float64 and np.abs(single[3] - full[3]).max() < 1e-3
    double = PIKProbe(layer=2, model_id="m", C=0.01).fit(X, y)
    fast = PIKProbe(layer=2, model_id="m", C=0.01).fit(X, y, float32=True)
    assert fast.coef_.dtype == np.float64 and fast.mean_.dtype == np.float64
    assert np.abs(fast.p_ik(X) - double.p_ik(X)).max() < 1e-3


def test_choose_layer_bad_input():
    with pytest.raises(ValueError, match="empty"):
        choose_layer({}, np.array([0, 1]))
    with pytest.raises(ValueError, match="layer 2 has 3 rows but y has 4"):
        choose_layer({2: np.zeros((3, 2))}, np.array([0, 1, 0, 1]))


def test_save_load_round_trip_is_exact(fitted, tmp_path):
    probe, X, _ = fitted
    path = probe.save(tmp_path / "sub" / "probe.npz")
    loaded = PIKProbe.load(path, expected_model_id="org/model-a", expected_feature_size=64, expected_layer=12)
    np.testing.assert_array_equal(loaded.p_ik(X), probe.p_ik(X))
    assert (loaded.layer, loaded.model_id, loaded.feature_size) == (12, "org/model-a", 64)
    assert loaded.metadata["cv_auroc"] == probe.metadata["cv_auroc"]
    assert loaded.metadata["code_version"] and loaded.metadata["created_at"]
    assert [p.name for p in path.parent.iterdir()] == ["probe.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as data:  # readable without pickle, JSON inside
        assert json.loads(str(data["metadata_json"]))["format"] == "cascade-pik-probe"


def test_extra_metadata_is_saved(tmp_path):
    X, y = _separable(n=100, d=8)
    probe = PIKProbe(1, "m").fit(X, y, metadata={"dataset": "mmlu", "split": "calibration"})
    loaded = PIKProbe.load(probe.save(tmp_path / "p.npz"))
    assert loaded.metadata["dataset"] == "mmlu" and loaded.metadata["cv_auroc"] is None


def test_load_mismatches_name_both_values(fitted, tmp_path):
    probe, _, _ = fitted
    path = probe.save(tmp_path / "probe.npz")
    with pytest.raises(ProbeMismatchError, match=r"'org/model-a', not 'org/model-b'"):
        PIKProbe.load(path, expected_model_id="org/model-b")
    with pytest.raises(ProbeMismatchError, match="feature size 64, but the model gives 576"):
        PIKProbe.load(path, expected_feature_size=576)
    with pytest.raises(ProbeMismatchError, match="layer 12, not layer 3"):
        PIKProbe.load(path, expected_layer=3)
    assert issubclass(ProbeMismatchError, ValueError)


def test_truncated_and_foreign_files_are_clear_errors(fitted, tmp_path):
    probe, _, _ = fitted
    path = probe.save(tmp_path / "probe.npz")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        broken = tmp_path / f"cut{cut}.npz"
        broken.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match=str(broken)):
            PIKProbe.load(broken)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    with pytest.raises(CorruptFileError, match="garbage.npz"):
        PIKProbe.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, coef=np.zeros(3))
    with pytest.raises(CorruptFileError, match="other.npz"):
        PIKProbe.load(other)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        PIKProbe.load(tmp_path / "missing.npz")


def test_feature_size_mismatch_at_predict_time(fitted):
    probe, _, _ = fitted
    with pytest.raises(ProbeMismatchError, match="expects 64 features, got 63"):
        probe.p_ik(np.zeros((2, 63)))
    with pytest.raises(ValueError, match=r"x\[None, :\]"):
        probe.p_ik(np.zeros(64))
    bad = np.zeros((3, 64))
    bad[1, 5] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
        probe.p_ik(bad)


def test_unfitted_and_bad_labels():
    with pytest.raises(NotFittedError, match="not fitted"):
        PIKProbe(0, "m").p_ik(np.zeros((1, 4)))
    X = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="at least 2 correct and 2 wrong"):
        PIKProbe(0, "m").fit(X, np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        PIKProbe(0, "m").fit(X, np.arange(10))
    with pytest.raises(ValueError, match="one label per row"):
        PIKProbe(0, "m").fit(X, np.ones(9))
    with pytest.raises(ValueError, match="C must be > 0"):
        PIKProbe(0, "m", C=0)
