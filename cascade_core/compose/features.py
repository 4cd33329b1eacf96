"""Which hidden-state features a stage has: the local chunks, else the committed single layer.

`bench` writes several layers of every question under `data/features/` (gitignored); a clone
has only `data/hidden/` (one layer per model, `features_store`). Probe training and the report's
OOD / label-free sections read whichever covers the stage's records, and training a probe from
the local chunks re-exports its layer, so the committed layer always is the probe's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cascade_core.bench import load_features
from cascade_core.compose.locations import Locations
from cascade_core.features_store import export_layer, load_layer


def stage_features(where: Locations, stage: str, record_qids, dataset: str = "mmlu",
                   ) -> tuple[np.ndarray, dict[int, np.ndarray], str]:
    """(qids, {layer: features}, source) for one stage's records; empty when neither source covers them.

    `source` is "local" (the chunks: every layer kept) or "committed" (one layer, checked row by
    row against `record_qids`: a mismatch raises FeatureMismatchError naming the file).
    """
    wanted = np.asarray(record_qids).astype(str)
    qids, layers = load_features(where.features_dir(stage, dataset))
    if layers and np.isin(wanted, qids).all():
        return qids, layers, "local"
    committed = where.hidden_dir(dataset) / stage
    qids, layers = load_layer(committed, wanted)
    if layers:
        return qids, layers, "committed"
    return np.array([], dtype=str), {}, ""


def export_probe_layer(where: Locations, stage: str, records: pd.DataFrame, qids: np.ndarray,
                       layers: dict[int, np.ndarray], layer: int, dataset: str = "mmlu") -> Path:
    """Commit-ready copy of the probe's layer in the records' order (see `features_store`)."""
    out = where.hidden_dir(dataset) / stage
    export_layer(out, records["qid"].astype(str).to_numpy(), qids, layers[layer], layer=layer,
                 model_id=str(records["model_id"].iloc[0]))
    return out
