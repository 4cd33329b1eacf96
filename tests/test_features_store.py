"""Committed single-layer features: written in the records' order, checked against them on load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.records.features import FeatureMismatchError, export_layer, load_layer, read_manifest
from cascade_core.io import CorruptFileError


def _data(n=50, d=16, seed=0):
    rng = np.random.default_rng(seed)
    qids = np.array([f"q{i}" for i in range(n)])
    return qids, rng.normal(size=(n, d)).astype(np.float32)


def test_export_follows_the_records_order_and_splits_into_parts(tmp_path):
    qids, features = _data()
    record_qids = qids[::-1].copy()  # the records list the questions in another order
    manifest = export_layer(tmp_path, record_qids, qids, features, layer=7, model_id="m", max_part_bytes=16 * 2 * 12)
    assert [p["rows"] for p in manifest["parts"]] == [12, 12, 12, 12, 2]
    loaded_qids, layers = load_layer(tmp_path, record_qids)
    assert list(loaded_qids) == list(record_qids) and list(layers) == [7]
    np.testing.assert_array_equal(layers[7], features[::-1].astype(np.float16).astype(np.float32))
    assert read_manifest(tmp_path)["rows"] == 50


def test_a_record_without_features_is_refused(tmp_path):
    qids, features = _data()
    with pytest.raises(ValueError, match="1 of 51 records have no features.*'extra'"):
        export_layer(tmp_path, [*qids, "extra"], qids, features, layer=1, model_id="m")


def test_qids_out_of_order_or_missing_name_the_part_file(tmp_path):
    qids, features = _data()
    export_layer(tmp_path, qids, qids, features, layer=3, model_id="m", max_part_bytes=16 * 2 * 20)
    swapped = qids.copy()
    swapped[[25, 26]] = swapped[[26, 25]]
    with pytest.raises(FeatureMismatchError, match=r"layer-3\.part-01\.npz.*rows 20"):
        load_layer(tmp_path, swapped)
    with pytest.raises(FeatureMismatchError, match="features have 50 rows, records 49"):
        load_layer(tmp_path, qids[:49])


def test_a_reexport_replaces_the_old_parts(tmp_path):
    qids, features = _data()
    export_layer(tmp_path, qids, qids, features, layer=3, model_id="m", max_part_bytes=16 * 2 * 10)
    export_layer(tmp_path, qids, qids, features, layer=5, model_id="m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer-5.part-00.npz", "manifest.json"]


def test_damaged_files_are_named(tmp_path):
    qids, features = _data()
    export_layer(tmp_path, qids, qids, features, layer=3, model_id="m")
    (tmp_path / "layer-3.part-00.npz").write_bytes(b"not an npz")
    with pytest.raises(CorruptFileError, match="layer-3.part-00.npz"):
        load_layer(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorruptFileError, match="manifest.json: not a hidden-features manifest"):
        load_layer(tmp_path)


def test_no_export_is_empty(tmp_path):
    qids, layers = load_layer(tmp_path / "none")
    assert len(qids) == 0 and layers == {}
