"""Which policy file a question runs with (compose.policies.policy_for_question): its own dataset's when
`calibrate --dataset X` wrote one, else its kind's (MMLU's for multiple choice, the shipped free-form
set's for free-form), else the preset's thresholds; with the guarantee and the reason in words.

The policy files are the committed ones (data/policies/), copied into a temporary policies folder;
no model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cascade_core.compose.policies import (FREE_FORM_DATASET, guarantee_summary, kind_dataset, policy_for_question,
                                           policy_path)
from cascade_core.choose.policy_file import read_policy_file
from cascade_core.locations import locations
from cascade_core.presets import load_preset

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "policies"


@pytest.fixture
def where(tmp_path):
    return locations(results_dir=tmp_path / "results", policies_dir=tmp_path / "policies",
                     probes_dir=tmp_path / "probes")


def ship(where, source: str, dataset: str) -> Path:
    """Copy a committed policy file of the default preset to where `calibrate --dataset <dataset>` writes."""
    target = policy_path(load_preset("default"), where, dataset)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED / source, target)
    return target


def test_kind_dataset():
    assert kind_dataset(True) == "mmlu" and kind_dataset(False) == FREE_FORM_DATASET


def test_a_dataset_s_own_policy_file_wins_over_its_kind_s(where):
    ship(where, "arith/default.json", FREE_FORM_DATASET)
    own = ship(where, "arith/default.json", "mmlu-open")
    chosen = policy_for_question("default", False, "mmlu-open", where)
    assert chosen.own and chosen.dataset == "mmlu-open" and chosen.applied.file == own
    assert "mmlu-open has its own calibrated policy file" in chosen.reason
    assert chosen.guarantee == guarantee_summary(read_policy_file(own).guarantee)


def test_without_its_own_file_a_question_runs_with_its_kind_s_policy(where):
    arith = ship(where, "arith/default.json", FREE_FORM_DATASET)
    mmlu = ship(where, "default.json", "mmlu")
    free = policy_for_question("default", False, "mmlu-open", where)
    assert not free.own and free.dataset == FREE_FORM_DATASET and free.applied.file == arith
    assert "mmlu-open has no calibrated policy file of its own" in free.reason
    assert str(policy_path(load_preset("default"), where, "mmlu-open")) in free.reason
    mc = policy_for_question("default", True, "sums", where)
    assert not mc.own and mc.dataset == "mmlu" and mc.applied.file == mmlu and "runs with the policy for its kind" in \
        mc.reason
    typed = policy_for_question("default", True, None, where)
    assert typed.applied.file == mmlu and "typed question" in typed.reason


def test_the_kind_s_own_dataset_is_its_own(where):
    arith = ship(where, "arith/default.json", FREE_FORM_DATASET)
    chosen = policy_for_question("default", False, FREE_FORM_DATASET, where)
    assert chosen.own and chosen.dataset == FREE_FORM_DATASET and chosen.applied.file == arith


def test_no_policy_file_anywhere_is_the_preset_s_thresholds_without_a_guarantee(where):
    chosen = policy_for_question("default", False, "mmlu-open", where)
    assert chosen.applied.policy is None and not chosen.own
    assert "the preset's own thresholds apply" in chosen.reason and chosen.guarantee.startswith("no guarantee")


def test_thresholds_preset_ignores_every_file(where):
    ship(where, "arith/default.json", "mmlu-open")
    chosen = policy_for_question("default", False, "mmlu-open", where, thresholds="preset")
    assert chosen.applied.policy is None and "thresholds=preset" in chosen.reason


def test_an_unusable_own_file_is_an_error_not_a_silent_fallback(where):
    ship(where, "arith/default.json", FREE_FORM_DATASET)
    bad = ship(where, "arith/default.json", "mmlu-open")
    data = json.loads(bad.read_text())
    data["stages"] = data["stages"][:2]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mmlu-open"):
        policy_for_question("default", False, "mmlu-open", where)


def test_guarantee_summary_says_labelled_or_label_free_target_and_delta():
    labelled = {"mode": "target", "target_pt": 1.0, "delta": 0.1}
    assert guarantee_summary(labelled) == ("labelled: at most 1 accuracy pt lost against the last stage, "
                                           "with probability >= 90% (delta 0.1)")
    free = {**labelled, "target_pt": 2.5, "delta": 0.05, "loss": "label_free"}
    assert guarantee_summary(free) == ("label-free: at most 2.5 pt lost against the last stage's answers, for any "
                                       "labels, with probability >= 95% (delta 0.05)")
    assert guarantee_summary({"mode": "budget", "budget": 3e9, "unit": "flops", "delta": 0.1}).startswith(
        "budget: at most 3e+09 flops per question")


# ---- apply_question_policy: a dataset's own policy reads P(IK) with that dataset's probes -------------
def lazy_stages(policies: dict):
    """The default preset's stages around LazyBackends (no model loads), with these stage policies."""
    from dataclasses import replace

    from cascade_core.compose.live import lazy_runtime_stage

    return [replace(lazy_runtime_stage(c), policy=policies.get(c.name, lazy_runtime_stage(c).policy))
            for c in load_preset("default").stages]


def test_own_dataset_policy_uses_its_probes_and_refuses_a_p_ik_rule_without_one(where, monkeypatch, tmp_path):
    from cascade_core.compose.policies import apply_question_policy
    from cascade_core.policy import StagePolicy

    monkeypatch.setenv("CASCADE_PROBES_DIR", str(tmp_path / "no-probes"))  # no free-form probe from data/probes
    own = ship(where, "arith/default.json", "mmlu-open")
    found = json.loads(own.read_text())  # SmolLM2 on with the paper's rule (P(T) and P(IK)) in this own policy
    found["policy"]["stages"][0].update(enabled=True, rule="both", tau_t=0.5, tau_ik=0.5)
    own.write_text(json.dumps(found))
    chosen = policy_for_question("default", False, "mmlu-open", where)
    stages = lazy_stages(dict(zip(chosen.applied.stages, chosen.applied.policy.stages)))
    # switched on by hand at the preset's thresholds (not the file's policy): it may route on P(T) alone
    by_hand = lazy_stages({"qwen2.5-coder-0.5b": StagePolicy(tau_t=0.5, tau_ik=0.5, rule="both", enabled=True)})
    assert apply_question_policy(by_hand[1:], chosen, multiple_choice=False, where=where)[0].free_form_probe is None
    with pytest.raises(ValueError, match=r"smollm2-135m, which has no probe trained on mmlu-open's records.*"
                                         r"probes train --dataset mmlu-open"):
        apply_question_policy(stages, chosen, multiple_choice=False, where=where)
    # with that dataset's probe (here the committed arith one, copied where `probes train --dataset mmlu-open`
    # writes): the stage reads P(IK) with it
    target = where.probes / "mmlu-open" / "smollm2-135m.npz"
    target.parent.mkdir(parents=True)
    shutil.copyfile(SHIPPED.parent / "probes" / "arith" / "smollm2-135m.npz", target)
    ran = apply_question_policy(stages, chosen, multiple_choice=False, where=where)
    assert ran[0].free_form_probe is not None and all(s.free_form_probe is None for s in ran[1:])
    # the kind's own policy (arith's for free-form) keeps the stages' probes as they are
    ship(where, "arith/default.json", FREE_FORM_DATASET)
    kind = policy_for_question("default", False, "sums", where)
    pt_only = lazy_stages({"smollm2-135m": StagePolicy(tau_t=0.5, rule="pt_only", enabled=True),
                           "qwen2.5-coder-0.5b": StagePolicy(enabled=False)})
    assert apply_question_policy(pt_only, kind, multiple_choice=False, where=where) == pt_only


def test_what_answers_without_a_key_never_names_a_folder_of_the_host(where, tmp_path):
    """/health and traces (`QuestionPolicy.to_dict`) name the files a reason mentions (a missing policy
    file, a `--policy` argument, a preset file) inside the repository or by their name alone; the
    local reason (`route`'s lines, the app) keeps the full path. /health is served for real on loopback
    by an app whose one stage points at an endpoint it never calls (no model loads)."""
    import httpx

    from _loopback import ThreadServer
    from cascade_core.cascade import RuntimeStage
    from cascade_core.server.cascade_app import create_cascade_app
    from models.openai_stage import OpenAIStage

    folders = {str(tmp_path), str(tmp_path.resolve())}
    missing = policy_for_question("default", False, "mmlu-open", where)  # no policy file anywhere
    own = policy_path(load_preset("default"), where, "mmlu-open")
    assert str(own) in missing.reason and f"writes {own.name})" in missing.shown_reason
    named = policy_for_question("default", False, None, where,
                                policy_file=ship(where, "arith/default.json", "elsewhere"))
    assert str(tmp_path) in named.reason and named.shown_reason.startswith("--policy default.json names it")
    preset_file = tmp_path / "mine.toml"
    shutil.copyfile(load_preset("default").source, preset_file)
    by_preset = policy_for_question(str(preset_file), True, None, where, thresholds="preset")
    stated = {"free_form": missing.to_dict(), "multiple_choice": by_preset.to_dict(), "named": named.to_dict()}
    assert by_preset.to_dict()["thresholds"] == "thresholds: from the preset file (mine.toml)"
    assert not any(folder in json.dumps(stated) for folder in folders)
    stage = OpenAIStage("never-called", "http://127.0.0.1:9/v1", timeout_s=1, max_retries=0)
    with ThreadServer(create_cascade_app({"default": [RuntimeStage("never-called", stage)]},
                                         policies={"default": stated})) as running:
        health = httpx.get(f"{running.url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["policies"]["cascade-default"]["free_form"] == stated["free_form"]
    assert not any(folder in health.text for folder in folders)
