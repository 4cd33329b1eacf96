"""Train a stage's P(IK) probe on the calibration split and give every record its P(IK).

Calibration records get out-of-fold predictions (no probe ever scores a question it was trained
on); test records get the probe trained on the whole calibration split. No test question ever
trains a probe: the training mask is built from the split column alone, and checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.blas import blas_threads
from cascade_core.signal_quality import auroc
from cascade_core.probe import PROBE_CS, PIKProbe, probe_grid


@dataclass
class ProbeResult:
    """A trained probe, the P(IK) of every record (aligned to the records' rows), and its layer scores."""

    probe: PIKProbe
    p_ik: np.ndarray
    layer_auroc: dict[int, float]  # best cross-validated AUROC of each layer over the C grid
    test_auroc: float
    grid_auroc: dict[tuple[int, float], float] | None = None  # every (layer, C) tried


def align_features(records: pd.DataFrame, qids: np.ndarray, features: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Feature rows in the order of `records.qid`; a record without features is a clear error."""
    position = pd.Series(np.arange(len(qids)), index=pd.Index(qids.astype(str)))
    wanted = records["qid"].astype(str)
    missing = wanted[~wanted.isin(position.index)]
    if len(missing):
        raise ValueError(
            f"{len(missing)} records have no hidden-state features (e.g. {missing.iloc[0]!r}); "
            "rerun `bench` to regenerate them"
        )
    rows = position.loc[wanted].to_numpy()
    return {layer: array[rows] for layer, array in features.items()}


def train_probe(
    records: pd.DataFrame,
    features: dict[int, np.ndarray],
    model_id: str,
    labels: np.ndarray | None = None,
    train_mask: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    Cs: Sequence[float] = PROBE_CS,
    grid_options: dict | None = None,
) -> ProbeResult:
    """Fit on rows in `train_mask` (default: the calibration split) with `labels` (default: correct).

    `labels` may be anything a deployment can know, e.g. "agrees with the largest model" for a
    label-free probe; AUROC is always measured against gold correctness on the rows not trained on.
    `grid_options`: `probe.probe_grid`'s search options (the report's retrained probes stop the C path
    and solve in float32; `float32` also applies to the final fit).
    """
    split = records["split"].astype(str).to_numpy()
    if train_mask is None:
        train_mask = split == "calibration"
    train_mask = np.asarray(train_mask, dtype=bool)
    if np.any(train_mask & (split == "test")):
        raise ValueError("a test-split record is in the probe's training set")
    if train_mask.sum() < 2 * folds:
        raise ValueError(f"only {int(train_mask.sum())} training records: too few to train a probe")
    gold = records["correct"].to_numpy(dtype=bool)
    y = gold if labels is None else np.asarray(labels, dtype=bool)
    # The grid's out-of-fold P(IK) of the chosen (layer, C) is what `out_of_fold_p_ik` would give again.
    layer, C, grid, oof = probe_grid({k: f[train_mask] for k, f in features.items()}, y[train_mask],
                                     folds=folds, seed=seed, Cs=Cs, **(grid_options or {}))
    layer_auroc: dict[int, float] = {}
    for (k, _), value in grid.items():
        layer_auroc[k] = max(layer_auroc.get(k, -np.inf), value)
    X = features[layer]
    p_ik = np.full(len(records), np.nan)
    with blas_threads(1):
        p_ik[train_mask] = oof
        probe = PIKProbe(layer=layer, model_id=model_id, C=C).fit(
            X[train_mask], y[train_mask], float32=bool((grid_options or {}).get("float32")))
    held_out = ~train_mask
    if held_out.any():
        p_ik[held_out] = probe.p_ik(X[held_out])
    test_auroc = auroc(p_ik[held_out], gold[held_out]) if held_out.any() else float("nan")
    return ProbeResult(probe=probe, p_ik=p_ik, layer_auroc=layer_auroc, test_auroc=test_auroc, grid_auroc=grid)
