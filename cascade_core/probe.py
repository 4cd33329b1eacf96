"""The P(IK) probe: logistic regression on one layer's hidden state, predicting "this answer is right".

It feels like a scikit-learn estimator (`fit`, `predict_proba`), but prediction is plain numpy
over four stored arrays, so a probe loaded from disk gives bit-for-bit the predictions it gave
before saving, and the live cascade needs nothing but numpy to use it.

File format (one file, no pickle): a `.npz` holding `coef` (d,), `intercept` (1,), `mean` (d,),
`scale` (d,) — the standardisation fitted on the training rows — and `metadata_json`, a 0-d
string array with JSON: format, format_version, layer, model_id, feature_size, n_train,
positive_rate, C, class_weight, cv_auroc, cv_folds, created_at, code_version (+ any extras the
trainer added). It is written atomically (temp file + rename), so a crash never leaves half a
probe behind.

Default `class_weight=None`: the probe's output is then an estimate of P(correct) and can be
read as a probability by a threshold and by the calibration plots. "balanced" can raise the
AUROC a little on very skewed labels but pushes every prediction towards 0.5.
"""

from __future__ import annotations

import datetime as _dt
import json
import zipfile
import zlib
from pathlib import Path

from typing import Sequence

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from cascade_core import __version__
from cascade_core.blas import blas_threads
from cascade_core.signal_quality import auroc
from cascade_core.io import CorruptFileError, atomic_write_npz

FORMAT = "cascade-pik-probe"
FORMAT_VERSION = 1


class ProbeMismatchError(ValueError):
    """A probe used with a model, layer or feature size it was not trained for."""


def _check_features(X, name: str = "X", dtype=np.float64) -> np.ndarray:
    X = np.asarray(X, dtype=dtype)
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (rows, features), got shape {X.shape}; for one row use x[None, :]"
        )
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"{name} has non-finite values (inf/NaN) in rows {bad[:10].tolist()}")
    return X


MIN_PER_CLASS = 2  # a probe learns from at least this many right and this many wrong answers


def _check_labels(y, n_rows: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_rows:
        raise ValueError(f"y must be 1-D with one label per row ({n_rows}), got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("y must hold booleans or 0/1 (1 = the model's answer was correct)")
        y = y.astype(bool)
    positives = int(y.sum())
    if min(positives, n_rows - positives) < MIN_PER_CLASS:
        raise ValueError(
            f"a probe needs at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} wrong answers, "
            f"got {positives} correct and {n_rows - positives} wrong"
        )
    return y


def _feature_dtype(float32: bool):
    """The rows' dtype before standardisation: float32 rows (`probe_grid`'s option) are standardised
    straight into the float32 rows the solver reads. Their means and scales are still float64, and
    the same as from the float64 rows wherever the features are float32 values (as stored ones are)."""
    return np.float32 if float32 else np.float64


def _fit_arrays(X: np.ndarray, y: np.ndarray, C: float, class_weight, max_iter: int):
    """Standardise, fit, return (mean, scale, coef, intercept) for the numpy predictor: all float64,
    also when X is float32 (the solver then runs on float32 rows)."""
    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, solver="lbfgs")
    model.fit(scaler.transform(X), y)
    return (scaler.mean_.copy(), scaler.scale_.copy(), model.coef_[0].astype(np.float64),
            float(model.intercept_[0]))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _p_correct(X: np.ndarray, mean, scale, coef, intercept) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as non-finite: `p_ik` refuses it
        return _sigmoid(((X - mean) / scale) @ coef + intercept)


class PIKProbe:
    """P(IK) for one model at one layer: StandardScaler + LogisticRegression, stored as arrays."""

    def __init__(
        self,
        layer: int,
        model_id: str,
        C: float = 1.0,
        class_weight: str | None = None,
        max_iter: int = 2000,
    ):
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        if class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        self.layer = int(layer)
        self.model_id = str(model_id)
        self.C = float(C)
        self.class_weight = class_weight
        self.max_iter = int(max_iter)
        self.metadata: dict = {}

    def __repr__(self) -> str:
        fitted = f", feature_size={self.n_features_in_}" if self.is_fitted else ", unfitted"
        return f"PIKProbe(layer={self.layer}, model_id={self.model_id!r}, C={self.C}{fitted})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "coef_")

    @property
    def feature_size(self) -> int:
        self._require_fitted()
        return self.n_features_in_

    def fit(self, X, y, cv_folds: int = 0, seed: int = 0, metadata: dict | None = None,
            float32: bool = False) -> "PIKProbe":
        """Fit on all rows. With `cv_folds >= 2`, also record the cross-validated AUROC.

        X: (n, d) hidden states of this model at `self.layer`; y: True where the model's answer
        was correct. `metadata` adds entries (dataset, split, ...) to the saved metadata.
        `float32`: the solver runs on float32 rows (`probe_grid`'s option of that name).
        """
        X = _check_features(X, dtype=_feature_dtype(float32))
        y = _check_labels(y, len(X))
        cv_auroc = None
        if cv_folds >= 2:
            oof = out_of_fold_p_ik(X, y, folds=cv_folds, seed=seed, C=self.C,
                                   class_weight=self.class_weight, max_iter=self.max_iter)
            cv_auroc = auroc(oof, y)
        self.mean_, self.scale_, self.coef_, self.intercept_ = _fit_arrays(
            X, y, self.C, self.class_weight, self.max_iter
        )
        self.n_features_in_ = X.shape[1]
        self.metadata = {
            "n_train": int(len(y)),
            "positive_rate": float(y.mean()),
            "cv_auroc": cv_auroc,
            "cv_folds": int(cv_folds) if cv_folds >= 2 else None,
            "seed": int(seed),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": __version__,
            **(metadata or {}),
        }
        return self

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self!r} is not fitted: call fit() or PIKProbe.load() first")

    def p_ik(self, X) -> np.ndarray:
        """P(IK) = P(correct) for each row of X, shape (n,)."""
        self._require_fitted()
        X = _check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ProbeMismatchError(
                f"the probe for {self.model_id!r} (layer {self.layer}) expects "
                f"{self.n_features_in_} features, got {X.shape[1]}"
            )
        p = _p_correct(X, self.mean_, self.scale_, self.coef_, self.intercept_)
        if not np.isfinite(p).all():
            # Fail closed: the cascade reads a NaN P(IK) as "no probe" and would keep on P(T) alone.
            # Raising makes the stage an error step, which escalates (or fails, never keeps).
            bad = np.flatnonzero(~np.isfinite(p))
            raise ValueError(f"the probe for {self.model_id!r} (layer {self.layer}) gave a non-finite P(IK) "
                             f"in rows {bad[:10].tolist()}: the stage cannot vouch for its answer")
        return p

    def predict_proba(self, X) -> np.ndarray:
        """(n, 2) like scikit-learn: column 0 = P(wrong), column 1 = P(correct)."""
        p = self.p_ik(X)
        return np.column_stack([1.0 - p, p])

    def save(self, path: Path | str) -> Path:
        """Write the probe to one `.npz` file atomically; returns the path."""
        self._require_fitted()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "model_id": self.model_id,
            "feature_size": int(self.n_features_in_),
            "C": self.C,
            "class_weight": self.class_weight,
            "max_iter": self.max_iter,
            **self.metadata,
        }
        path = Path(path)
        atomic_write_npz(
            path,
            coef=self.coef_,
            intercept=np.array([self.intercept_]),
            mean=self.mean_,
            scale=self.scale_,
            metadata_json=np.array(json.dumps(meta, sort_keys=True, allow_nan=False)),
        )
        return path

    @classmethod
    def load(
        cls,
        path: Path | str,
        expected_model_id: str | None = None,
        expected_feature_size: int | None = None,
        expected_layer: int | None = None,
    ) -> "PIKProbe":
        """Read a probe file; check it was trained for the model, feature size and layer given.

        Raises FileNotFoundError, CorruptFileError (damaged or not a probe file, naming the file)
        or ProbeMismatchError (naming the file and both values).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"probe file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in ("coef", "intercept", "mean", "scale", "metadata_json")}
            meta = json.loads(str(arrays["metadata_json"]))
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
            # Random bytes make numpy guess "pickled data"; say what the file is not, then why.
            why = "not an .npz archive" if not zipfile.is_zipfile(path) else f"{type(err).__name__}: {err}"
            raise CorruptFileError(f"{path} is not a probe file ({why})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a P(IK) probe file (format tag missing)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has probe format version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
            )
        for key in ("feature_size", "layer"):
            if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 0:
                raise CorruptFileError(f"{path} is damaged: metadata key {key!r} must be a whole number >= 0, "
                                       f"got {meta.get(key)!r}")
        if not isinstance(meta.get("model_id"), str):
            raise CorruptFileError(f"{path} is damaged: metadata key 'model_id' must be a string")
        d = int(meta["feature_size"])
        shapes_ok = (
            arrays["coef"].shape == (d,) and arrays["mean"].shape == (d,)
            and arrays["scale"].shape == (d,) and arrays["intercept"].shape == (1,)
        )
        if not shapes_ok:
            raise CorruptFileError(f"{path} is damaged: its arrays do not match feature_size={d}")
        for key in ("coef", "intercept", "mean", "scale"):  # fail closed: a NaN P(IK) must never be possible
            if not np.issubdtype(arrays[key].dtype, np.number) or np.issubdtype(arrays[key].dtype, np.complexfloating):
                raise CorruptFileError(f"{path} is damaged: key {key!r} holds {arrays[key].dtype}, not real numbers")
            bad = np.flatnonzero(~np.isfinite(arrays[key]))
            if bad.size:
                raise CorruptFileError(f"{path} is damaged: key {key!r} is not finite at index {int(bad[0])} "
                                       f"({arrays[key].flat[bad[0]]!r})")
        zero = np.flatnonzero(arrays["scale"] <= 0)
        if zero.size:
            raise CorruptFileError(f"{path} is damaged: key 'scale' must be > 0 (a standard deviation), "
                                   f"got {float(arrays['scale'][zero[0]])!r} at index {int(zero[0])}")
        if expected_model_id is not None and meta["model_id"] != expected_model_id:
            raise ProbeMismatchError(
                f"probe {path} was trained for model {meta['model_id']!r}, not {expected_model_id!r}"
            )
        if expected_feature_size is not None and d != int(expected_feature_size):
            raise ProbeMismatchError(
                f"probe {path} expects feature size {d}, but the model gives {int(expected_feature_size)}"
            )
        if expected_layer is not None and int(meta["layer"]) != int(expected_layer):
            raise ProbeMismatchError(
                f"probe {path} was trained on layer {meta['layer']}, not layer {int(expected_layer)}"
            )
        probe = cls(meta["layer"], meta["model_id"], C=meta.get("C", 1.0),
                    class_weight=meta.get("class_weight"), max_iter=meta.get("max_iter", 2000))
        probe.coef_ = arrays["coef"].astype(np.float64)
        probe.intercept_ = float(arrays["intercept"][0])
        probe.mean_ = arrays["mean"].astype(np.float64)
        probe.scale_ = arrays["scale"].astype(np.float64)
        probe.n_features_in_ = d
        reserved = {"format", "format_version", "layer", "model_id", "feature_size", "C", "class_weight", "max_iter"}
        probe.metadata = {k: v for k, v in meta.items() if k not in reserved}
        return probe


def out_of_fold_p_ik(
    X,
    y,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    class_weight: str | None = None,
    max_iter: int = 2000,
) -> np.ndarray:
    """P(IK) for every row from a probe trained on the other folds (stratified, shuffled).

    Use this for the calibration split: thresholds chosen on these values are chosen on
    predictions the probe never saw the labels of.
    """
    X = _check_features(X)
    y = _check_labels(y, len(X))
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    out = np.empty(len(y), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(X, y):
        if y[train].all() or not y[train].any():
            raise ValueError("a training fold has only one class: use fewer folds or more rows")
        params = _fit_arrays(X[train], y[train], C, class_weight, max_iter)
        out[test] = _p_correct(X[test], *params)
    return out


def choose_layer(
    features_by_layer: dict[int, np.ndarray],
    y,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    class_weight: str | None = None,
) -> tuple[int, dict[int, float]]:
    """The layer whose probe has the best cross-validated AUROC, and every layer's AUROC.

    All layers use the same folds (same seed), so their AUROCs are compared on equal terms. On a
    tie the lower layer wins.
    """
    if not features_by_layer:
        raise ValueError("features_by_layer is empty: no layer to choose from")
    scores: dict[int, float] = {}
    for layer in sorted(features_by_layer):
        X = features_by_layer[layer]
        if len(X) != len(np.asarray(y)):
            raise ValueError(f"layer {layer} has {len(X)} rows but y has {len(np.asarray(y))}")
        oof = out_of_fold_p_ik(X, y, folds=folds, seed=seed, C=C, class_weight=class_weight)
        scores[int(layer)] = auroc(oof, np.asarray(y).astype(bool))
    best = max(scores, key=lambda layer: (scores[layer], -layer))
    return best, scores


# Regularisation strengths tried by `choose_probe`. Hidden states are wide (576-1536 features) and
# calibration sets small (~1,000 rows), so strong regularisation wins: on Qwen2.5-Coder-1.5B's
# MMLU calibration half C = 0.001 gave a cross-validated AUROC of 0.73 against 0.68 at C = 0.1,
# and fit 10x faster than C = 1.
PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def probe_grid(
    features_by_layer: dict[int, np.ndarray],
    y,
    folds: int = 5,
    seed: int = 0,
    Cs: Sequence[float] = PROBE_CS,
    class_weight: str | None = None,
    max_iter: int = 2000,
    warm_start: bool = False,
    stop_after_worse: int | None = None,
    float32: bool = False,
) -> tuple[int, float, dict[tuple[int, float], float], np.ndarray]:
    """`choose_probe`'s search, also returning the out-of-fold P(IK) of the chosen (layer, C).

    The same numbers as `out_of_fold_p_ik` per (layer, C): each layer is converted to float64
    once, and each fold's standardisation (fit on that fold's training rows, whatever C is) is
    fitted once for every C instead of once per C. Each fit sees exactly the arrays it saw
    before, so every prediction is bit-for-bit the same.

    Options that change the search (off by default; `probes train` uses neither):
    `warm_start`: each fold's fit at one C starts from its solution at the next smaller C (fewer
    solver iterations; solutions then differ from cold-started ones within the solver's
    tolerance). `stop_after_worse=k`: a layer's path over increasing C stops once k consecutive
    C values scored below that layer's best so far (the weakly regularised fits are the slow
    ones, and past the peak they rarely win); the pairs not tried are absent from the scores.
    `float32`: the rows are standardised into float32 (means and scales in float64) and the solver
    runs on them; the held-out rows' P(IK) is computed in float64. Each solver step reads the whole
    training matrix twice, so its time is memory traffic, which float32 halves; scores move by
    about the solver's tolerance.
    """
    if not Cs or any(not (c > 0) for c in Cs):
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers, got {Cs!r}")
    if not features_by_layer:
        raise ValueError("features_by_layer is empty: no layer to choose from")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if stop_after_worse is not None and stop_after_worse < 1:
        raise ValueError(f"stop_after_worse must be >= 1 or None, got {stop_after_worse}")
    Cs = sorted(float(c) for c in Cs)
    n = len(np.asarray(y))
    truth = _check_labels(y, n)
    oof: dict[tuple[int, float], np.ndarray] = {}
    per_layer: dict[int, dict[float, float]] = {}
    with blas_threads(1):
        for layer in sorted(features_by_layer):
            X = features_by_layer[layer]
            if len(X) != n:
                raise ValueError(f"layer {layer} has {len(X)} rows but y has {n}")
            X = _check_features(X, dtype=_feature_dtype(float32))
            labels = _check_labels(y, len(X))
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = []
            keep_scaled = X.nbytes <= 64 * 2**20  # else re-standardise per C (same values, less memory)
            for train, test in splitter.split(X, labels):
                if labels[train].all() or not labels[train].any():
                    raise ValueError("a training fold has only one class: use fewer folds or more rows")
                scaler = StandardScaler().fit(X[train])
                # `_p_correct`'s standardisation of the held-out rows, done once for every C.
                held = (X[test] - scaler.mean_) / scaler.scale_
                parts.append([train, test, scaler, scaler.transform(X[train]) if keep_scaled else None, held, None])
            scores: dict[float, float] = {}
            worse = 0
            for C in Cs:
                out = np.empty(n, dtype=np.float64)
                for part in parts:
                    train, test, scaler, scaled, held, model = part
                    if warm_start and model is not None:
                        model.set_params(C=C)  # lbfgs starts from the previous C's coefficients
                    else:
                        model = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter,
                                                   solver="lbfgs", warm_start=warm_start)
                    model.fit(scaler.transform(X[train]) if scaled is None else scaled, labels[train])
                    part[5] = model
                    with np.errstate(over="ignore", invalid="ignore"):
                        out[test] = _sigmoid(held @ model.coef_[0].astype(np.float64) + float(model.intercept_[0]))
                oof[(int(layer), C)] = out
                best_before = max(scores.values(), default=-np.inf)
                scores[C] = auroc(out, truth)
                worse = worse + 1 if scores[C] < best_before else 0
                if stop_after_worse is not None and worse >= stop_after_worse:
                    break
            per_layer[int(layer)] = scores
    scores = {(layer, C): per_layer[layer][C] for C in Cs for layer in sorted(per_layer) if C in per_layer[layer]}
    best = max(scores, key=lambda key: (scores[key], -key[0], -key[1]))
    return best[0], best[1], scores, oof[best]


def choose_probe(
    features_by_layer: dict[int, np.ndarray],
    y,
    folds: int = 5,
    seed: int = 0,
    Cs: Sequence[float] = PROBE_CS,
    class_weight: str | None = None,
) -> tuple[int, float, dict[tuple[int, float], float]]:
    """The (layer, C) whose probe has the best cross-validated AUROC, and every pair's AUROC.

    One grid over layers and regularisation strengths, same folds for every pair. On a tie the
    lower layer and then the stronger regularisation (smaller C) wins. BLAS runs on one thread:
    these fits are small, and on a shared 2-core machine two threads made them far slower (`blas`).
    `probe_grid` does the work (and also returns the chosen pair's out-of-fold P(IK)).
    """
    layer, C, scores, _ = probe_grid(features_by_layer, y, folds=folds, seed=seed, Cs=Cs, class_weight=class_weight)
    return layer, C, scores
