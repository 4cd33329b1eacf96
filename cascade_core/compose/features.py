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

from cascade_core.records.runner import load_features
from cascade_core.locations import Locations
from cascade_core.records.features import export_layer, load_layer, read_manifest


def stage_features(where: Locations, stage: str, record_qids, dataset: str = "mmlu",
                   ) -> tuple[np.ndarray, dict[int, np.ndarray], str]:
    """(qids, {layer: features}, source) for one stage's records; empty when neither source covers them.

    `source` is "local" (the chunks: every layer kept), "committed" (one layer, checked row by
    row against `record_qids`: a mismatch raises FeatureMismatchError naming the file) or
    "local+committed" (a committed checkpoint's layer completed by the local chunks).
    """
    wanted = np.asarray(record_qids).astype(str)
    qids, layers = load_features(where.features_dir(stage, dataset))
    if layers and np.isin(wanted, qids).all():
        return qids, layers, "local"
    committed = where.hidden_dir(dataset) / stage
    manifest = read_manifest(committed)
    # A checkpoint of a run resumed elsewhere, or an export the records have outgrown (a checkpoint
    # committed while the run went on adding records): its rows plus the local chunks' may cover them.
    if manifest is not None and (not manifest.get("complete", True) or manifest["rows"] < len(wanted)):
        qids, layers, _ = stage_features_any(where, stage, dataset)
        if layers and np.isin(wanted, qids).all():
            return qids, layers, "local+committed"
        return np.array([], dtype=str), {}, ""
    qids, layers = load_layer(committed, wanted)
    if layers:
        return qids, layers, "committed"
    return np.array([], dtype=str), {}, ""


def checkpoint_qids(where: Locations, stage: str, dataset: str = "mmlu") -> set[str]:
    """The qids a committed checkpoint (a partial export) already has features for; empty when none."""
    committed = where.hidden_dir(dataset) / stage
    manifest = read_manifest(committed)
    if manifest is None or manifest.get("complete", True):
        return set()
    qids, _ = load_layer(committed)
    return set(qids.tolist())


def checkpoint_features(where: Locations, stage: str, records: pd.DataFrame, layer: int,
                        dataset: str = "mmlu") -> dict | None:
    """Commit-ready copy of `layer` for the records that have features so far (a long benchmark's
    hourly checkpoint; `features_store.export_layer(partial=True)`); returns the manifest, None
    when the stage has no features of that layer yet."""
    qids, layers, _ = stage_features_any(where, stage, dataset)
    if layer not in layers:
        return None
    return export_layer(where.hidden_dir(dataset) / stage, records["qid"].astype(str).to_numpy(), qids,
                        layers[layer], layer=layer, model_id=str(records["model_id"].iloc[0]), partial=True)


def stage_features_any(where: Locations, stage: str, dataset: str = "mmlu") -> tuple[np.ndarray, dict[int, np.ndarray],
                                                                                     str]:
    """Whatever features exist for a stage, covering all its records or not: the local chunks, merged
    with a committed export's rows when there is one. The merge keeps only the export's layer, the
    one both sources have: a run resumed on another machine holds the other layers only for what it
    computed itself."""
    qids, layers = load_features(where.features_dir(stage, dataset))
    committed = where.hidden_dir(dataset) / stage
    manifest = read_manifest(committed)
    if manifest is None:
        return qids, layers, "local"
    c_qids, c_layers = load_layer(committed)
    ((layer, c_rows),) = c_layers.items()
    if layer not in layers:
        return c_qids, c_layers, "committed"
    extra = ~np.isin(c_qids, qids)
    return (np.concatenate([qids, c_qids[extra]]),
            {layer: np.concatenate([layers[layer], c_rows[extra]])}, "local+committed")


def export_probe_layer(where: Locations, stage: str, records: pd.DataFrame, qids: np.ndarray,
                       layers: dict[int, np.ndarray], layer: int, dataset: str = "mmlu") -> Path:
    """Commit-ready copy of the probe's layer in the records' order (see `features_store`)."""
    out = where.hidden_dir(dataset) / stage
    export_layer(out, records["qid"].astype(str).to_numpy(), qids, layers[layer], layer=layer,
                 model_id=str(records["model_id"].iloc[0]))
    return out
