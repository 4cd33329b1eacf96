"""Cached records for the pages: the preset's record table, its threshold sweep, MMLU questions.

Records come from the benchmark's files (data/results/<dataset>/<stage>.parquet, or the folder
named by $CASCADE_RESULTS_DIR: `compose.locations`). They are cached (shared, read-only) under a key that includes
each file's size and modification time, so records a benchmark adds show up on the next rerun
while an unchanged file is read once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import streamlit as st

from cascade_core.locations import RESULTS_DOC, Locations, locations
from cascade_core.choose.sweep import SweepResult, sweep
from cascade_core.presets import Preset, StageConfig, parse_preset
from cascade_core.records.table import RecordTable

DATASET = "mmlu"
SPLIT_CHOICES = ("test", "calibration", "all")


def where() -> Locations:
    """The app's folders (`compose.locations`: $CASCADE_RESULTS_DIR and friends, else data/)."""
    return locations()


def results_dir() -> Path:
    """Where benchmark records live: $CASCADE_RESULTS_DIR, else data/results in the repository."""
    return where().results


def features_dir() -> Path:
    """Where a benchmark run from the app keeps hidden-state features (see `compose.locations`)."""
    return where().features


def report_path() -> Path | None:
    """docs/RESULTS.md (what `python -m cascade_core report` writes) when it exists and describes
    the records the app reads (the default results folder)."""
    return RESULTS_DOC if RESULTS_DOC.exists() and where().is_default_results else None


def _signature(paths: list[Path]) -> tuple:
    out = []
    for path in paths:
        try:
            stat = path.stat()
            out.append((str(path), stat.st_mtime_ns, stat.st_size))
        except OSError:
            out.append((str(path), None, None))
    return tuple(out)


def recorded_choices(preset: Preset) -> dict[str, StageConfig]:
    """Recorded stages that can end a cascade in the explorer, by stage name: the preset's own,
    else GPT-4 (compose.tables.GPT4_STAGE, with its list prices) and Mixtral (no price: compare it in
    FLOPs, tokens or calls)."""
    from cascade_core.compose.tables import GPT4_STAGE

    own = [s for s in preset.stages if s.backend == "recorded"]
    if own:
        return {s.name: s for s in own}
    mixtral = StageConfig(name="mixtral-recorded", label="Mixtral-8x7B-Instruct (recorded)", backend="recorded",
                          model="mixtral-8x7b-instruct")
    return {GPT4_STAGE.name: GPT4_STAGE, mixtral.name: mixtral}


def _local_stages(preset: Preset) -> list[StageConfig]:
    return [s for s in preset.stages if s.backend != "recorded" and s.enabled]


def _build_table(preset: Preset, recorded: StageConfig | None, root: Path, dataset: str) -> tuple[RecordTable | None,
                                                                                                  tuple[str, ...]]:
    """Records of every enabled local stage that has them, in preset order, ended by `recorded`
    (compose.tables.load_preset_table, the loader the report uses). Returns (table or None, names of
    the local stages without records)."""
    from cascade_core.compose.tables import MissingRecordsError, load_preset_table

    local = [s.name for s in _local_stages(preset)]
    try:
        table = load_preset_table(preset, dataset, root, include_recorded=recorded or False, skip_missing=True)
    except MissingRecordsError:
        return None, tuple(local)
    return table, tuple(n for n in local if n not in table.names)


@dataclass(frozen=True)
class Loaded:
    """A record table for a page, or None, with what is missing and why."""

    table: RecordTable | None
    missing: tuple[str, ...]
    error: str | None = None


@st.cache_resource(show_spinner="Loading benchmark records…", max_entries=24)
def _cached_table(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                  signature: tuple) -> Loaded:
    # cache_resource, not cache_data: cache_data unpickles a copy on every call, i.e. on every rerun of
    # the explorer; a RecordTable's arrays are read-only, so every session can share one.
    preset = parse_preset(json.loads(preset_json), "session preset")
    recorded = StageConfig.model_validate_json(recorded_json) if recorded_json else None
    try:
        table, missing = _build_table(preset, recorded, Path(root), dataset)
    except (ValueError, OSError, KeyError) as err:
        return Loaded(None, (), f"{type(err).__name__}: {err}")
    if table is not None and split != "all":
        if not (table.splits == split).any():
            return Loaded(None, missing, f"the records have no question in the {split} split")
        table = table.subset(split)
    return Loaded(table, missing)


def load_table(preset: Preset, split: str = "test", recorded: StageConfig | None = None,
               dataset: str = DATASET) -> Loaded:
    """The preset's record table on `split` ("calibration", "test" or "all"), cached.

    `recorded` ends the cascade with a recorded stage (GPT-4, Mixtral) when given.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_CHOICES)}")
    return _cached_table(*_table_key(preset, split, recorded, dataset))


def _table_key(preset: Preset, split: str, recorded: StageConfig | None, dataset: str) -> tuple:
    """The arguments `_cached_table` is keyed by: what the table is made of, and the record files'
    sizes and times (a new benchmark run makes a new key)."""
    paths = [where().record_path(s.name, dataset) for s in _local_stages(preset)]
    return (preset.model_dump_json(), recorded.model_dump_json() if recorded else None, str(results_dir()), dataset,
            split, _signature(paths))


@st.cache_resource(show_spinner="Sweeping thresholds over the records…", max_entries=12)
def _cached_sweep(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                  signature: tuple, rule: str) -> SweepResult:
    # cache_resource, not cache_data: a 4-stage sweep holds ~150k policies (tens of MB) that
    # cache_data would copy on every rerun; the result is never modified, so sharing it is safe.
    loaded = _cached_table(preset_json, recorded_json, root, dataset, split, signature)
    return sweep(loaded.table, rule=rule)


@st.cache_data(max_entries=48, show_spinner=False)
def _cached_frontier(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                     signature: tuple, rule: str, unit: str, max_points: int) -> dict:
    result = _cached_sweep(preset_json, recorded_json, root, dataset, split, signature, rule)
    cost, accuracy = result.cost(unit), result.accuracy
    front = result.frontier(unit)
    cloud = np.arange(len(result))
    if len(cloud) > max_points:
        cloud = np.sort(np.random.default_rng(0).choice(len(cloud), max_points, replace=False))
    return {"policies": len(result), "cloud": (cost[cloud], accuracy[cloud]), "sampled": len(cloud) < len(result),
            "frontier": (cost[front], accuracy[front])}


def load_frontier(preset: Preset, split: str, recorded: StageConfig | None, rule: str, unit: str,
                  max_points: int = 6000, dataset: str = DATASET) -> dict:
    """What the explorer's chart needs from the sweep, small: the Pareto frontier in `unit`, a
    sample of at most `max_points` swept policies, and how many policies there are."""
    return _cached_frontier(*_table_key(preset, split, recorded, dataset), rule, unit, max_points)


@st.cache_data(max_entries=64, show_spinner=False)
def _cached_references(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                       signature: tuple, enabled: tuple[bool, ...], unit: str) -> dict:
    from cascade_core.choose.baselines import oracle, single_models
    from app_ui.view_model import random_routing_curve

    table = _cached_table(preset_json, recorded_json, root, dataset, split, signature).table
    curve = random_routing_curve(table, list(enabled), unit)
    best = oracle(table, unit)
    singles = single_models(table)
    return {"random_curve": (curve["cost"].to_numpy(), curve["accuracy"].to_numpy()),
            "oracle": (float(best.mean_cost[unit]), float(best.accuracy)),
            "singles": [(r.stage, float(getattr(r, f"cost_{unit}")), float(r.accuracy)) for r in singles.itertuples()]}


def load_references(preset: Preset, split: str, recorded: StageConfig | None, enabled: Sequence[bool], unit: str,
                    dataset: str = DATASET) -> dict:
    """What the explorer draws around the operating point and that does not move with the thresholds:
    random routing over the enabled stages, the oracle, each model alone (stage, cost, accuracy)."""
    return _cached_references(*_table_key(preset, split, recorded, dataset), tuple(bool(e) for e in enabled), unit)


@st.cache_data(show_spinner="Loading MMLU…", max_entries=2)
def mmlu_questions(split: str = "test"):
    """MMLU questions of one split (a DataFrame: qid, subject, question, options, answer)."""
    from cascade_core.records.mmlu import load_mmlu

    return load_mmlu(split=split)


@st.cache_data(show_spinner="Choosing thresholds on the calibration split…", max_entries=8)
def _cached_headline(preset_json: str, root: str, dataset: str, signature: tuple, target: float) -> dict | None:
    from cascade_core.choose.router_metrics import accuracy_difference
    from cascade_core.choose.selection import evaluate_on, select_policy

    calib = _cached_table(preset_json, None, root, dataset, "calibration", signature)
    test = _cached_table(preset_json, None, root, dataset, "test", signature)
    if calib.table is None and test.table is None and not (calib.error or test.error):
        return None
    if calib.table is None or test.table is None:
        return {"error": calib.error or test.error or "records of one split are missing"}
    try:
        chosen = select_policy(calib.table, target_max_loss=target, unit="flops")
        result = evaluate_on(test.table, chosen.policy)
    except ValueError as err:
        return {"error": str(err)}
    table = test.table
    return {
        "questions": table.n_questions, "accuracy": result.accuracy, "reference": table.names[-1],
        "pd": float(accuracy_difference(result.accuracy, table.correct[-1].mean())),
        "reduction": result.compute_reduction["flops"], "mean_flops": result.mean_cost["flops"],
        "stages": " → ".join(n for n, s in zip(table.names, chosen.policy.stages) if s.enabled),
        "missing": list(test.missing),
    }


def headline(preset: Preset, target: float = 0.01, dataset: str = DATASET) -> dict | None:
    """The headline on the cached records, reported on test: the preset's calibrated policy when it
    has one (`applied`), else thresholds chosen here on calibration for at most `target` accuracy
    loss against the largest stage. Says which (`source`) and which stages calibration switched off."""
    root = results_dir()
    paths = [where().record_path(s.name, dataset) for s in _local_stages(preset)]
    found, problem = applied(preset)
    if found.source == "calibrated":
        return _calibrated_headline(preset, found, dataset, paths)
    out = _cached_headline(preset.model_dump_json(), str(root), dataset, _signature(paths), target)
    if out is not None and "error" not in out:
        out = {**out, "source": "chosen here", "off": {}, "problem": problem}
    return out


def _calibrated_headline(preset: Preset, found, dataset: str, paths: list[Path]) -> dict:
    from cascade_core.compose.policies import calibration_stages
    from cascade_core.choose.router_metrics import accuracy_difference
    from cascade_core.choose.selection import evaluate_on

    own = [c for c in preset.stages if c.backend == "recorded" and c.enabled]
    test = _cached_table(preset.model_dump_json(), own[-1].model_dump_json() if own else None, str(results_dir()),
                         dataset, "test", _signature(paths))
    names = calibration_stages(preset)
    if test.table is None or list(test.table.names) != names:
        have = ", ".join(test.table.names) if test.table is not None else "none"
        return {"error": f"the calibrated policy covers {', '.join(names)}; the test records cover {have}"}
    if any(b is not None for b in getattr(found, "biases", ())):
        return {"error": "the calibrated policy debiases letters, and the app does not replay that yet: "
                         "`python -m cascade_core report` gives its figures"}
    from app_ui.view_model import last_stage_calls_saved

    result = evaluate_on(test.table, found.policy)
    table = test.table
    # A cascade that ends with a recorded stage counts the calls it saves that stage (as the report
    # does): its FLOPs are unknown, and its dollars hide what was skipped behind token counts.
    unit = "calls" if table.recorded[-1] else "dollars" if table.cost("dollars").any() else "flops"
    unit_reduction = last_stage_calls_saved(table, found.policy) if unit == "calls" else result.compute_reduction[unit]
    return {
        "questions": table.n_questions, "accuracy": result.accuracy, "reference": table.names[-1],
        "pd": float(accuracy_difference(result.accuracy, table.correct[-1].mean())),
        "reduction": result.compute_reduction["flops"], "mean_flops": result.mean_cost["flops"],
        "unit": unit, "unit_reduction": unit_reduction, "last_stage": table.names[-1],
        "stages": " → ".join(n for n, s in zip(table.names, found.policy.stages) if s.enabled),
        "missing": list(test.missing), "source": "calibrated", "description": found.description,
        "off": {n: found.off_reasons.get(n, "switched off")
                for n, s in zip(names, found.policy.stages) if not s.enabled},
        "problem": None,
    }


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_applied(preset_json: str, policies: str, signature: tuple, dataset: str = "mmlu"):
    from cascade_core.locations import locations as make_locations
    from cascade_core.compose.policies import applied_policy

    preset = parse_preset(json.loads(preset_json), "session preset")
    try:
        return applied_policy(preset, make_locations(policies_dir=policies), dataset=dataset), None
    except (ValueError, OSError, KeyError) as err:
        fallback = applied_policy(preset, thresholds="preset")
        return fallback, f"the calibrated policy file cannot be used here: {err}"


def applied(preset: Preset, dataset: str = "mmlu"):
    """(AppliedPolicy, problem or None): the thresholds the preset runs with (`compose.policies`):
    its calibrated policy file when there is one and it fits these stages, else the preset's own;
    `problem` says why a policy file present was not used (e.g. stages added on the Settings page).
    `dataset`: whose policy (`compose.policies.FREE_FORM_DATASET` for free-form questions)."""
    from cascade_core.compose.policies import policy_path

    path = policy_path(preset, where(), dataset)
    return _cached_applied(preset.model_dump_json(), str(where().policies), _signature([path]), dataset)


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_question_policy(preset_json: str, policies: str, signature: tuple, multiple_choice: bool,
                            dataset: str | None):
    from cascade_core.compose.policies import QuestionPolicy, kind_dataset, policy_for_question
    from cascade_core.locations import locations as make_locations

    preset = parse_preset(json.loads(preset_json), "session preset")
    where_ = make_locations(policies_dir=policies)
    try:
        return policy_for_question(preset, multiple_choice, dataset, where_), None
    except (ValueError, OSError, KeyError) as err:
        fallback = policy_for_question(preset, multiple_choice, dataset, where_, thresholds="preset")
        return (QuestionPolicy(fallback.applied, dataset or kind_dataset(multiple_choice), False,
                               f"the policy file cannot be used here ({err}): the preset's own thresholds apply",
                               multiple_choice),
                f"the calibrated policy file cannot be used here: {err}")


def question_policy(preset: Preset, multiple_choice: bool, dataset: str | None):
    """(QuestionPolicy, problem or None): the policy a question drawn from `dataset` (None: typed) runs
    with, as `route` and `serve` choose it (`compose.policies.policy_for_question`: its dataset's own
    policy file, else its kind's); a file present but unusable gives the preset's thresholds and the
    problem, as `applied` does."""
    from cascade_core.compose.policies import kind_dataset, policy_path

    looked_at = dict.fromkeys(filter(None, (dataset, kind_dataset(multiple_choice))))
    paths = [policy_path(preset, where(), d) for d in looked_at]
    return _cached_question_policy(preset.model_dump_json(), str(where().policies), _signature(paths),
                                   bool(multiple_choice), dataset)


@st.cache_data(show_spinner=False, max_entries=4)
def dataset_questions(name: str, split: str = "test"):
    """A shipped dataset's questions of one split (qid, subject, question, options, references), as
    the registry resolves them; nothing is written."""
    from cascade_core.records.registry import resolve_dataset, select_questions

    return select_questions(resolve_dataset(name, where().results, write=False), split)


def prompt_limit() -> int:
    """The longest question (with its options) the app accepts: the servers' prompt limit, one number."""
    from cascade_core.server.common import DEFAULT_MAX_PROMPT_CHARS

    return int(DEFAULT_MAX_PROMPT_CHARS)


# ---- the Route page's accuracy target and its examples ----------------------------------------------
def shipped_target(preset: Preset) -> tuple[float, float] | None:
    """(target in points, delta) of the preset's MMLU policy file when it promises an accuracy
    target (`calibrate --target`), else None (no file, a budget file, or one that cannot be used)."""
    from cascade_core.choose.policy_file import read_policy_file

    found, problem = applied(preset)
    if problem or found.policy is None or found.file is None:
        return None
    try:
        g = read_policy_file(found.file).guarantee
    except (ValueError, OSError):
        return None
    if g.get("mode") != "target" or g.get("target_pt") is None or g.get("loss") == "label_free":
        return None
    return float(g["target_pt"]), float(g["delta"])


def _own_recorded(preset: Preset) -> StageConfig | None:
    own = [c for c in preset.stages if c.backend == "recorded" and c.enabled]
    return own[-1] if own else None


def _target_unit(preset: Preset) -> str:
    """What a target policy minimises: dollars when a stage has prices, else FLOPs (as `calibrate`)."""
    return "dollars" if any(c.price_in or c.price_out for c in preset.stages if c.enabled) else "flops"


@st.cache_resource(show_spinner="Calibrating for this target (Learn-then-Test on the calibration split)…",
                   max_entries=16)
def _cached_target_policy(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                          signature: tuple, target_pt: float, delta: float, unit: str):
    from app_ui.view_model import policy_for_target

    calib = _cached_table(preset_json, recorded_json, root, dataset, split, signature)
    if calib.table is None:
        return None, calib.error or "no calibration records"
    try:
        return policy_for_target(calib.table, target_pt, delta, unit), None
    except ValueError as err:
        return None, str(err)


def target_policy(preset: Preset, target_pt: float, delta: float):
    """(ui_data.TargetPolicy or None, problem): the policy `calibrate --target target_pt` would choose
    on the preset's calibration records, computed once per records version and shared by sessions."""
    from cascade_core.compose.policies import calibration_stages

    recorded = _own_recorded(preset)
    key = _table_key(preset, "calibration", recorded, DATASET)
    found, problem = _cached_target_policy(*key, float(target_pt), float(delta), _target_unit(preset))
    if found is not None and len(found.policy) != len(calibration_stages(preset)):
        return None, "the records do not cover every stage of the preset"
    return found, problem


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_examples(preset_json: str, recorded_json: str | None, root: str, dataset: str, split: str,
                     signature: tuple, policy_json: str) -> dict:
    from cascade_core.policy import CascadePolicy
    from app_ui.view_model import route_examples

    test = _cached_table(preset_json, recorded_json, root, dataset, split, signature).table
    if test is None:
        return {}
    questions = mmlu_questions("test")
    lengths = {q: len(t) + sum(len(o) for o in opts)
               for q, t, opts in zip(questions["qid"], questions["question"], questions["options"])}
    return route_examples(test, CascadePolicy.from_dict(json.loads(policy_json)), lengths)


def route_examples(preset: Preset, policy) -> dict:
    """{"keep": RouteExample, "escalate": RouteExample} (as far as the test records have them) for
    `policy` (a CascadePolicy over the preset's enabled stages), cached per records version."""
    recorded = _own_recorded(preset)
    key = _table_key(preset, "test", recorded, DATASET)
    return _cached_examples(*key, json.dumps(policy.to_dict(), sort_keys=True))


def guarantee_headline() -> dict | None:
    """The report's guaranteed headline (`ui_data.guarantee_headline` of docs/RESULTS.md), or None
    when there is no report for the records the app reads."""
    from app_ui.view_model import guarantee_headline as parse

    path = report_path()
    if path is None:
        return None
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def policy_at_target(preset: Preset, target: float):
    """(AppliedPolicy or None, TargetPolicy or None, problem) of the Route page's promise `target`:
    the shipped policy file at its own target, else the policy `target_policy` certifies (None, with
    the problem, where none can be)."""
    from cascade_core.compose.policies import AppliedPolicy

    found, _ = applied(preset)
    shipped = shipped_target(preset)
    if shipped is None or target == shipped[0]:
        return found, None, None
    chosen, problem = target_policy(preset, target, shipped[1])
    if chosen is None:
        return None, None, problem
    return (AppliedPolicy("calibrated", f"{chosen.description} (recalibrated here)", policy=chosen.policy,
                          off_reasons=chosen.off_reasons), chosen, None)


def route_targets(preset: Preset) -> tuple[list[float], float] | None:
    """The Route page's promises and the one it opens on: the tightest at which a stage before the
    last is in use, so a newcomer sees a keep and an escalation (the shipped one where none routes);
    None without a shipped accuracy-target policy."""
    from app_ui.view_model import ROUTE_TARGETS_PT

    shipped = shipped_target(preset)
    if shipped is None:
        return None
    targets = sorted({shipped[0], *ROUTE_TARGETS_PT})
    for target in targets:
        found = policy_at_target(preset, target)[0]
        if found is not None and sum(bool(p.enabled) for p in found.policy.stages) > 1:
            return targets, target
    return targets, shipped[0]
