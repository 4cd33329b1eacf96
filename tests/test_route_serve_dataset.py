"""`route --dataset NAME` / `serve --dataset NAME` and `--policy FILE` (issue 20 item 7): the questions of
that dataset's kind run with its own calibrated policy file, else their kind's, else the preset's
thresholds (`compose.policies.served_policies`, through `policy_for_question`); `--policy FILE` wins;
`route`'s trace and the server's /health and traces say which file, which guarantee and why.

The policy files are calibrated here from synthetic free-form records (`test_freeform_bench.
_synthetic_free_form`: no model), in temporary results/policies/probes folders. The refusals and the
resolution load no model; `route` (in process) and `serve` (its own process on loopback) run the
real SmolLM2-135M (marked `model`).
"""

from __future__ import annotations

import json

import httpx
import pytest

from _loopback import SubprocessServer
from cascade_core.choose.policy_file import file_sha256
from cascade_core.cli import main
from cascade_core.compose.policies import served_policies
from cascade_core.locations import locations
from cascade_core.presets import load_preset
from test_freeform_bench import _synthetic_free_form


@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    """A two-stage preset with free-form policy files: label-free for `arith`, labelled for a file dataset `sums`."""
    for name, sub in (("RESULTS", "results"), ("POLICIES", "policies"), ("PROBES", "probes")):
        monkeypatch.setenv(f"CASCADE_{name}_DIR", str(tmp_path / sub))
    for dataset in ("arith", "sums"):
        preset = _synthetic_free_form(tmp_path, n=400, dataset=dataset)
        assert main(["calibrate", "--dataset", dataset, "--preset", str(preset), "--rule", "pt_only",
                     "--target", "5"] + (["--label-free"] if dataset == "arith" else [])) == 0
    return preset


def test_an_unknown_dataset_is_refused_with_the_known_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    assert main(["route", "What is 2 + 2?", "--dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--dataset: unknown dataset 'nope'" in err and "mmlu, arith, mmlu-open" in err
    assert main(["serve", "--dataset", "nope"]) == 2  # before any model loads
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_a_question_of_the_other_kind_and_conflicting_flags_are_refused(calibrated, tmp_path, capsys):
    assert main(["route", "2+2?", "--options", "3", "4", "--preset", str(calibrated), "--dataset", "arith"]) == 2
    assert "--dataset arith holds free-form questions" in capsys.readouterr().err
    assert main(["route", "2+2?", "--preset", str(calibrated), "--policy", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "--policy" in err and "no such file" in err
    sums = locations().policies / "sums" / "two.json"
    assert main(["route", "2+2?", "--preset", str(calibrated), "--policy", str(sums), "--thresholds", "preset"]) == 2
    assert "give one" in capsys.readouterr().err


def test_each_kind_resolves_through_the_one_resolver(calibrated):
    preset = load_preset(calibrated)
    where = locations()
    arith, sums = where.policies / "arith" / "two.json", where.policies / "sums" / "two.json"
    default = served_policies(preset)  # no --dataset: each kind's policy (free-form: arith's)
    assert default[False].applied.file == arith and default[True].applied.file is None
    own = served_policies(preset, "sums")
    assert own[False].own and own[False].dataset == "sums" and own[False].applied.file == sums
    assert "sums has its own calibrated policy file" in own[False].reason
    assert own[True].dataset == "mmlu" and own[True].applied.file is None  # the other kind: its kind's
    named = served_policies(preset, "arith", policy_file=sums)  # --policy wins
    assert named[False].applied.file == sums and named[True].applied.file == sums
    assert f"--policy {sums} names it" in named[False].reason and named[False].dataset == "sums"
    record = own[False].to_dict()
    assert record["file"] == sums.name and record["file_sha256"] == file_sha256(sums)  # outside the repo: no folder
    assert record["guarantee"].startswith("labelled: at most 5 accuracy pt")


@pytest.mark.model
def test_route_with_dataset_arith_states_arith_s_policy(calibrated, capsys):
    arith = locations().policies / "arith" / "two.json"
    question = "What is 2 + 2? Answer with the number only."
    capsys.readouterr()
    assert main(["route", question, "--preset", str(calibrated), "--dataset", "arith", "--json",
                 "--max-new-tokens", "4"]) == 0
    trace = json.loads(capsys.readouterr().out)
    policy = trace["policy"]
    assert policy["dataset"] == "arith" and policy["file"] == arith.name and policy["kind"] == "free-form"
    assert policy["guarantee"].startswith("label-free: at most 5 pt") and "arith has its own" in policy["reason"]
    assert "free-form policy, arith" in trace["thresholds"]
    sums = locations().policies / "sums" / "two.json"
    assert main(["route", question, "--preset", str(calibrated), "--dataset", "arith", "--policy", str(sums),
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"policy (free-form): {sums}; labelled: at most 5 accuracy pt") and f"--policy {sums}" in out


@pytest.mark.model
def test_serve_with_dataset_states_its_policy_in_health_and_traces(calibrated, tmp_path):
    """... and its monitor (`--traces`) watches that policy file too."""
    sums = locations().policies / "sums" / "two.json"
    server = SubprocessServer("cascade_core", ["serve", "--preset", str(calibrated), "--dataset", "sums",
                                               "--max-new-tokens", "4", "--traces", str(tmp_path / "traces.db")],
                              log_path=tmp_path / "serve.log")
    with server:
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        free, mc = health["policies"]["cascade-two"]["free_form"], health["policies"]["cascade-two"]["multiple_choice"]
        assert free["file"] == sums.name and free["file_sha256"] == file_sha256(sums)
        assert free["own"] and "sums has its own" in free["reason"]
        assert mc["dataset"] == "mmlu" and mc["file"] is None and mc["guarantee"].startswith("no guarantee")
        assert health["monitor"]["policies"]["free"]["policy"] == file_sha256(sums)
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "cascade-two", "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is 2 + 2? Answer with the number only."}]})
        assert r.status_code == 200, r.text
        assert r.json()["cascade"]["policy"] == free


def test_a_shipped_policy_is_named_by_its_path_inside_the_repository():
    """/health answers without a key: a policy file is named inside the repository, never by a folder of the host."""
    from cascade_core.compose.policies import policy_for_question
    from cascade_core.locations import REPO_ROOT

    stated = policy_for_question("default", multiple_choice=False, dataset="arith").to_dict()
    assert stated["file"] == "data/policies/arith/default.json" and str(REPO_ROOT) not in json.dumps(stated)
    assert stated["file_sha256"] == file_sha256(REPO_ROOT / "data/policies/arith/default.json")
