"""What every report section shares: settings, the typed-result base, the test outcome of a policy.

Sections return small dataclasses (`Part` subclasses) that the markdown renderer reads by
attribute; `Part.to_json` gives exactly the dict `report --json` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from cascade_core.cost import COST_UNITS
from cascade_core.formatting import clean_json, json_estimate, json_number
from cascade_core.policy import CascadePolicy
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import ReplayResult
from cascade_core.choose.selection import SubjectPolicy, evaluate_on, select_policy
from cascade_core.choose.paired_stats import accuracy_ci, accuracy_difference_ci, compute_reduction_ci, mcnemar_exact

Progress = Callable[[str], None]
REPORT_FORMAT = "cascade-report-v1"


@dataclass(frozen=True)
class ReportSettings:
    """Knobs of the report; the defaults are what docs/RESULTS.md uses."""

    target_max_loss: float = 0.01  # accuracy lost against the largest model (1 point)
    unit: str = "flops"  # cost of the local cascades
    api_unit: str = "dollars"  # cost of the API scenario (only GPT-4 costs dollars)
    rules: tuple[str, ...] = ("both", "pt_only", "pik_only", "learned")
    api_groupings: tuple[str, ...] = ("global", "category", "subject")
    api_calibration_targets: tuple[float, ...] = (0.01, 0.005, 0.0)
    cv_folds: int = 3  # folds inside calibration that pick the API variant
    probe_folds: int = 5
    # The OOD and label-free probes' search over C (increasing) stops once this many C values in a
    # row score below the best so far (`probe.probe_grid`): the weakly regularised fits are the slow
    # ones and rarely win past the peak; None searches the whole grid as `probes train` does.
    probe_path_stop: int | None = 2
    # ... their solver runs on float32 rows (`probe.probe_grid`): half the memory traffic of each
    # step, which is most of a fit's time on 14,042 questions; False solves in float64 as `probes train` does.
    probe_float32: bool = True
    # ... and each fold's fit at one C starts from its solution at the C before (fewer solver steps).
    probe_warm_start: bool = True
    n_resamples: int = 2000
    min_group_questions: int = 30
    # Per-category / per-subject variants only on cascades of at most this many stages: on the
    # 4-stage cascade every group x rule x CV fit sweeps ~130,000 policies (most of the report's time).
    api_group_max_stages: int = 2
    seed: int = 0
    ood: bool = True
    label_free: bool = True
    pregen: bool = True
    delta: float = 0.1  # risk of the Learn-then-Test guarantee
    resplits: int = 200  # re-splits of the headline cascade's guarantee study
    resplits_others: int = 20  # ... of the other studied cascades
    guarantee_rules: tuple[str, ...] = ("pt_only", "both", "learned", "loss_aware")
    guarantee_folds: int = 2  # CV folds inside each calibration half that pick the rule
    # The paired loss's p-value (`risk`): the betting bound is valid (tests/test_risk.py) and tighter
    # than the binomial one; the headline study is also run with `guarantee_compare_bound`.
    guarantee_bound: str = "wsr"
    guarantee_compare_bound: str | None = "binomial"


class Part:
    """A typed section result: dataclass fields in JSON order; nested values stay plain JSON."""

    omit_none: ClassVar[bool] = False  # sections whose absent parts are left out of the JSON

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and self.omit_none:
                continue
            out[f.name] = value.to_json() if isinstance(value, Part) else value
        return clean_json(out)

    to_json_value = staticmethod(clean_json)

    @classmethod
    def from_json(cls, data: dict):
        """Rebuild from `to_json`'s dict (a key it left out is None)."""
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


def split_tables(table: RecordTable) -> tuple[RecordTable, RecordTable]:
    """(calibration, test) halves; a clear error when either is empty."""
    for name in ("calibration", "test"):
        if not (table.splits == name).any():
            raise ValueError(f"the records have no question in the {name} split: a report needs both")
    return table.subset("calibration"), table.subset("test")


def with_groups(table: RecordTable, groups: np.ndarray) -> RecordTable:
    """The same table with `subjects` replaced (per-category thresholds reuse the per-subject code)."""
    return dataclasses.replace(table, subjects=np.asarray(groups).astype(str), _costs={})


def with_p_ik(table: RecordTable, p_ik: np.ndarray) -> RecordTable:
    """The same table with other P(IK) values (e.g. from an OOD or label-free probe)."""
    return dataclasses.replace(table, p_ik=np.asarray(p_ik, dtype=np.float64),
                               has_hidden=np.isfinite(p_ik).any(axis=1) | table.has_hidden, _costs={})


def subtable(table: RecordTable, stages: Sequence[int]) -> RecordTable:
    return table.stage_subset(list(stages))


def policy_thresholds(policy: CascadePolicy | SubjectPolicy, table: RecordTable) -> list[dict]:
    """Per stage: on/off, rule and thresholds (a SubjectPolicy shows its default policy).

    `routes_on` says what the stage's decision actually reads: a stage without P(IK) routes on
    P(T) alone whatever its rule, and the last enabled stage answers everything that reaches it.
    """
    base = policy.default if isinstance(policy, SubjectPolicy) else policy
    has_pik = np.isfinite(table.p_ik).all(axis=1)
    last = base.last_enabled
    out = []
    for s, (name, stage) in enumerate(zip(table.names, base.stages)):
        if not stage.enabled:
            routes_on = "off"
        elif s == last:
            routes_on = "answers the rest"
        elif stage.rule in ("learned", "loss_aware"):
            routes_on = stage.rule
        elif stage.rule == "pt_only" or not has_pik[s]:
            routes_on = "p_t"
        else:
            routes_on = {"both": "p_t+p_ik", "pik_only": "p_ik"}[stage.rule]
        row = {"stage": name, "enabled": stage.enabled, "rule": stage.rule, "routes_on": routes_on,
               "tau_t": stage.tau_t, "tau_ik": stage.tau_ik}
        if stage.rule in ("learned", "loss_aware"):
            row["tau_learned"] = stage.tau_learned
            if stage.combiner is not None:
                row["combiner_features"] = list(stage.combiner.features)
        out.append(row)
    return out


def policy_dict(policy: CascadePolicy | SubjectPolicy) -> dict:
    kind = "per-group" if isinstance(policy, SubjectPolicy) else "global"
    return {"kind": kind, **policy.to_dict()}


def policy_from_dict(data: dict) -> CascadePolicy | SubjectPolicy:
    """Inverse of `policy_dict`: the report's chosen policy, ready to replay."""
    if data.get("kind") == "per-group":
        return SubjectPolicy.from_dict(data)
    return CascadePolicy.from_dict(data)


# -- one outcome on the test split --------------------------------------------------------------
def outcome(test: RecordTable, result: ReplayResult, unit: str, n_resamples: int, seed: int) -> dict:
    """A policy's test numbers against the table's last stage alone (the reference)."""
    ref_correct = test.correct[-1]
    p, b, c = mcnemar_exact(result.correct, ref_correct)
    reference_cost = test.cost(unit)[-1]
    if reference_cost.sum() > 0:
        reduction = json_estimate(compute_reduction_ci(result.cost_per_question[unit], reference_cost,
                                              n_resamples=n_resamples, seed=seed))
    else:
        reduction = {"value": None, "low": None, "high": None}
    return {
        "n_questions": test.n_questions,
        "accuracy": json_estimate(accuracy_ci(result.correct)),
        "reference": test.names[-1],
        "reference_accuracy": float(ref_correct.mean()),
        "pd": json_estimate(accuracy_difference_ci(result.correct, ref_correct, n_resamples=n_resamples, seed=seed)),
        "mcnemar": {"p_value": p, "cascade_only_right": b, "reference_only_right": c},
        "unit": unit,
        "compute_reduction": reduction,
        "reductions": {u: json_number(result.compute_reduction[u]) for u in COST_UNITS},
        "mean_cost": {u: result.mean_cost[u] for u in COST_UNITS},
        "escalation_rate": {n: json_number(r) for n, r in zip(test.names, result.escalation_rate)},
        "answer_rate": {n: float(r) for n, r in zip(test.names, result.answer_rate)},
        "reach_rate": {n: float(r) for n, r in zip(test.names, result.reach_rate)},
    }


def local_indices(table: RecordTable) -> list[int]:
    return [s for s in range(table.n_stages) if not table.recorded[s]]


def choose_and_report(table: RecordTable, stages: Sequence[int], rule: str, unit: str, settings: ReportSettings,
                      target: float | None = None, grouping: np.ndarray | None = None) -> dict:
    """Select a policy on calibration for the sub-cascade `stages`, report it on test."""
    sub = subtable(table, stages)
    if grouping is not None:
        sub = with_groups(sub, grouping)
    calib, test = split_tables(sub)
    selection = select_policy(calib, target_max_loss=settings.target_max_loss if target is None else target,
                              unit=unit, rule=rule, per_subject=grouping is not None,
                              min_subject_questions=settings.min_group_questions)
    result = evaluate_on(test, selection.policy)
    return {
        "stages": list(sub.names), "rule": rule, "unit": unit,
        "target_max_loss": settings.target_max_loss if target is None else target,
        "policy": policy_dict(selection.policy),
        "thresholds": policy_thresholds(selection.policy, sub),
        "calibration": {"accuracy": selection.calibration.accuracy,
                        "reference_accuracy": selection.reference_accuracy,
                        "compute_reduction": json_number(selection.calibration.compute_reduction[unit]),
                        "n_policies": selection.n_policies},
        "test": outcome(test, result, unit, settings.n_resamples, settings.seed),
        "_result": result, "_test": test,
    }


def api_metrics(test: RecordTable, result: ReplayResult) -> dict:
    """GPT-4 (the last stage) calls, tokens and dollars saved; a question reaches it iff it answers it."""
    last = test.n_stages - 1
    reached = result.final_stage == last
    tokens = test.cost("tokens")[last]
    dollars = test.cost("dollars")[last]
    return {
        "calls_saved": float(1.0 - reached.mean()),
        "tokens_saved": json_number(1.0 - tokens[reached].sum() / tokens.sum()) if tokens.sum() > 0 else None,
        "dollars_saved": json_number(1.0 - dollars[reached].sum() / dollars.sum()) if dollars.sum() > 0 else None,
        "accuracy_loss": float(test.correct[last].mean() - result.accuracy),
    }

