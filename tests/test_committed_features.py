"""A clone rebuilds the probes from the committed single layer alone, to the same AUROC.

Real records (the committed SmolLM2 ones) with made-up hidden states that carry some signal:
training from the local multi-layer chunks exports the chosen layer; with the chunks gone, the
same training from the committed layer gives the same probe and the same held-out AUROC.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from cascade_core.compose.features import stage_features
from cascade_core.compose.jobs import train_probes
from cascade_core.locations import DATA_DIR, Locations
from cascade_core.records.features import FeatureMismatchError, read_manifest
from cascade_core.io import atomic_write_npz
from cascade_core.presets import load_preset
from cascade_core.probe import PIKProbe

STAGE = "smollm2-135m"


def _one_stage_preset(tmp_path):
    """A preset of the one stage whose probe goes to `tmp_path/probes` (never data/probes/)."""
    preset_file = tmp_path / "p.toml"
    preset_file.write_text(f'name = "p"\n[[stages]]\nname = "{STAGE}"\nbackend = "packaged"\nmodel = "{STAGE}"\n'
                           f'probe = "{tmp_path / "probes" / (STAGE + ".npz")}"\nprobe_optional = true\n')
    return load_preset(preset_file)


@pytest.fixture
def setup(tmp_path):
    where = Locations(results=tmp_path / "results", features=tmp_path / "features", hidden=tmp_path / "hidden",
                      probes=tmp_path / "probes", policies=tmp_path / "policies")
    records_file = where.record_path(STAGE)
    records_file.parent.mkdir(parents=True)
    records = pd.read_parquet(DATA_DIR / "results" / "mmlu" / f"{STAGE}.parquet").iloc[:1200]
    records.to_parquet(records_file)
    rng = np.random.default_rng(0)
    signal = records["correct"].to_numpy(dtype=float)
    layers = {k: (rng.normal(size=(len(records), 24)) + np.outer(signal, rng.normal(size=24)) * 0.3 * k)
              for k in (1, 2, 3)}
    order = rng.permutation(len(records))  # chunks hold the questions in another order than the records
    for start in range(0, len(order), 400):
        rows = order[start:start + 400]
        atomic_write_npz(where.features_dir(STAGE) / f"chunk-{start:05d}.npz",
                         qid=records["qid"].to_numpy().astype(str)[rows],
                         **{f"layer_{k}": a[rows].astype(np.float16) for k, a in layers.items()})
    return where, _one_stage_preset(tmp_path), records


def test_probes_rebuilt_from_the_committed_layer_match(setup):
    where, preset, records = setup
    (first,) = train_probes(preset, where)
    assert first.trained and "(local features)" in first.message
    probe_file = where.probes / f"{STAGE}.npz"
    trained = PIKProbe.load(probe_file)
    manifest = read_manifest(where.hidden_dir() / STAGE)
    assert manifest["layer"] == trained.layer and manifest["rows"] == len(records)

    shutil.rmtree(where.features)
    qids, layers, source = stage_features(where, STAGE, records["qid"])
    assert source == "committed" and list(qids) == list(records["qid"]) and list(layers) == [trained.layer]
    (again,) = train_probes(preset, where)
    assert again.trained and "(committed features)" in again.message
    rebuilt = PIKProbe.load(probe_file)
    assert rebuilt.layer == trained.layer and rebuilt.C == trained.C
    assert abs(rebuilt.metadata["test_auroc"] - trained.metadata["test_auroc"]) <= 1e-6


def test_committed_features_in_another_order_than_the_records_are_refused(setup):
    where, preset, records = setup
    list(train_probes(preset, where))
    shutil.rmtree(where.features)
    shuffled = records["qid"].to_numpy()[::-1]
    with pytest.raises(FeatureMismatchError, match=r"layer-\d+\.part-00\.npz: qids differ from the records'"):
        stage_features(where, STAGE, shuffled)


def _keep_chunks(where, qids_kept: set[str]) -> None:
    """Leave in the chunks only the questions in `qids_kept` (another machine computed only those)."""
    for chunk in sorted(where.features_dir(STAGE).glob("chunk-*.npz")):
        with np.load(chunk) as data:
            arrays = {k: data[k] for k in data.files}
        keep = np.isin(arrays["qid"].astype(str), list(qids_kept))
        chunk.unlink()
        if keep.any():
            atomic_write_npz(chunk, **{k: v[keep] for k, v in arrays.items()})


def test_a_checkpoint_exports_what_has_features_and_is_refused_where_all_are_needed(setup):
    from cascade_core.compose.features import checkpoint_features, checkpoint_qids

    where, preset, records = setup
    qids = records["qid"].astype(str).to_numpy()
    _keep_chunks(where, set(qids[:700]))  # the run has features for 700 of its 1,200 records so far
    manifest = checkpoint_features(where, STAGE, records, layer=2)
    assert (manifest["rows"], manifest["records"], manifest["complete"], manifest["layer"]) == (700, 1200, False, 2)
    assert checkpoint_qids(where, STAGE) == set(qids[:700])
    shutil.rmtree(where.features)
    with pytest.raises(FeatureMismatchError, match="checkpoint of a benchmark still running.*700 of 1200"):
        from cascade_core.records.features import load_layer
        load_layer(where.hidden_dir() / STAGE, qids)
    assert stage_features(where, STAGE, records["qid"])[2] == ""  # not enough for a probe: none, no error
    assert checkpoint_features(where, STAGE, records, layer=3) is None  # a layer the checkpoint lacks


def test_a_run_resumed_on_another_machine_merges_the_checkpoint_with_its_own_chunks(setup):
    """The checkpoint holds the first 700 questions (layer 2); the new machine's chunks hold the other
    500 (all layers): together they cover every record in layer 2, the probe trains on it, and its
    export is complete."""
    from cascade_core.compose.features import checkpoint_features

    where, preset, records = setup
    qids = records["qid"].astype(str).to_numpy()
    saved = {c.name: c.read_bytes() for c in where.features_dir(STAGE).glob("chunk-*.npz")}
    _keep_chunks(where, set(qids[:700]))
    checkpoint_features(where, STAGE, records, layer=2)
    for name, body in saved.items():  # the other machine: only what it computed itself
        (where.features_dir(STAGE) / name).write_bytes(body)
    _keep_chunks(where, set(qids[700:]))
    got, layers, source = stage_features(where, STAGE, records["qid"])
    assert source == "local+committed" and list(layers) == [2] and set(got) == set(qids)
    (outcome,) = train_probes(preset, where)
    assert outcome.trained and "layer 2" in outcome.message and "(local+committed features)" in outcome.message
    manifest = read_manifest(where.hidden_dir() / STAGE)
    assert manifest["complete"] and manifest["rows"] == len(records)


def test_records_that_outgrew_a_complete_export_get_no_features_and_no_error(setup):
    """A checkpoint committed while the run went on: the export covers every record it saw (complete),
    the records file committed beside it already holds more. Readers fall back to "no features" (the
    probe sections say so) instead of failing the whole report."""
    where, preset, records = setup
    list(train_probes(preset, where))
    shutil.rmtree(where.features)
    grown = np.concatenate([records["qid"].astype(str).to_numpy(), ["later-1", "later-2"]])
    assert stage_features(where, STAGE, grown)[2] == ""
    assert stage_features(where, STAGE, records["qid"])[2] == "committed"  # the records it covers still load


def test_the_shipped_probe_is_rebuilt_from_the_shipped_layer(tmp_path):
    """The real thing, no made-up features: the committed SmolLM2 records and feature layer
    (`data/hidden/mmlu/`) alone retrain the shipped `data/probes/smollm2-135m.npz` (chosen on this
    machine's all-layer chunks) to the same layer, C and held-out AUROC. This is what lets a clone
    rebuild the report's probe sections without running a model."""
    where = Locations(results=tmp_path / "results", features=tmp_path / "no-features", hidden=DATA_DIR / "hidden",
                      probes=tmp_path / "probes", policies=tmp_path / "policies")
    shipped = PIKProbe.load(DATA_DIR / "probes" / f"{STAGE}.npz")
    records_file = where.record_path(STAGE)
    records_file.parent.mkdir(parents=True)
    shutil.copy(DATA_DIR / "results" / "mmlu" / f"{STAGE}.parquet", records_file)
    (outcome,) = train_probes(_one_stage_preset(tmp_path), where)
    assert outcome.trained and "(committed features)" in outcome.message
    rebuilt = PIKProbe.load(tmp_path / "probes" / f"{STAGE}.npz")
    assert (rebuilt.layer, rebuilt.C) == (shipped.layer, shipped.C)
    assert abs(rebuilt.metadata["test_auroc"] - shipped.metadata["test_auroc"]) <= 1e-6
