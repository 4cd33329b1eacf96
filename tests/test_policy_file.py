"""Policy files round-trip, describe themselves, and refuse files made for other stages."""

from __future__ import annotations

import json

import pytest

from cascade_core.policy import CascadePolicy
from cascade_core.choose.policy_file import (PolicyFile, PolicyFileError, make_provenance, read_policy_file,
                                             write_policy_file)


def _file(tmp_path) -> PolicyFile:
    records = tmp_path / "a.parquet"
    records.write_bytes(b"records")
    policy = CascadePolicy.from_lists([0.7, 0.0], [0.4, 0.0], rule="both", enabled=[False, True])
    return PolicyFile(preset="p", stages=("a", "b"), policy=policy.to_dict(),
                      guarantee={"mode": "target", "target_pt": 1.0, "delta": 0.1, "bound": "binomial"},
                      provenance=make_provenance({"a": records}, "mmlu", "calibration", 7021),
                      off_reasons={"a": "no threshold passed the test"})


def test_round_trip_and_description(tmp_path):
    original = _file(tmp_path)
    path = write_policy_file(tmp_path / "p.json", original)
    loaded = read_policy_file(path, expect_stages=["a", "b"])
    assert loaded == original
    assert CascadePolicy.from_dict(loaded.policy).enabled_indices == (1,)
    assert loaded.description == "calibrated for <= 1 pt at delta 0.1 on 7,021 calibration questions"
    assert len(loaded.provenance["records_sha256"]["a"]) == 64


def test_a_file_for_other_stages_is_refused(tmp_path):
    path = write_policy_file(tmp_path / "p.json", _file(tmp_path))
    with pytest.raises(PolicyFileError,
                       match=r"p\.json: made for stages \['a', 'b'\], but the preset runs \['a', 'c'\]"):
        read_policy_file(path, expect_stages=["a", "c"])


@pytest.mark.parametrize("content, message", [
    ("{", "not a readable policy file"),
    (json.dumps({"format": "other"}), "not a policy file"),
    (json.dumps({"format": "cascade-policy-file", "version": 9}), "version 9"),
    (json.dumps({"format": "cascade-policy-file", "version": 1, "preset": "p", "stages": "a"}),
     "key 'stages' must be a list"),
    (json.dumps({"format": "cascade-policy-file", "version": 1, "preset": "p", "stages": ["a"], "guarantee": {},
                 "provenance": {}, "policy": {"stages": [{}, {}]}}), "the policy has 2 stages but 'stages' names 1"),
    (json.dumps({"format": "cascade-policy-file", "version": 1, "preset": "p", "stages": ["a"], "guarantee": {},
                 "provenance": {}, "policy": {"stages": [{}]}, "biases": [None, None]}),
                 "'biases' has 2 entries for 1 stages"),
])
def test_damaged_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PolicyFileError, match=message):
        read_policy_file(path)
