"""Section 0, the guarantee: the Learn-then-Test choice on the committed split, and the re-split
study that measures how often its promise held (`cascade_core.choose.resplit`).

For the API scenario the headline cascade is the largest local stage -> GPT-4 (`resplits`
re-splits); the full local cascade -> GPT-4 and the local cascade alone get `resplits_others`.
The rule is chosen by cross-validation inside each calibration half among `guarantee_rules`;
thresholds are global (per-group thresholds at delta / G each certify almost nothing on groups
of a few dozen questions).
"""

from __future__ import annotations

from dataclasses import dataclass

from cascade_core.records.table import RecordTable
from cascade_core.report.common import Part, Progress, ReportSettings, local_indices, policy_thresholds, split_tables
from cascade_core.choose.resplit import choose, coded_subjects, loss_and_saving, resplit_study


@dataclass
class GuaranteeSection(Part):
    omit_none = True
    delta: float | None = None
    target_pt: float | None = None
    rules: list | None = None
    folds: int | None = None
    bound: str | None = None
    cascades: list | None = None  # per cascade: stages, unit, cost_unit, headline, committed, study
    skipped: str | None = None

    def headline(self) -> dict | None:
        """The top-level `"guarantee"` object of `report --json`: the headline API cascade."""
        if not self.cascades:
            return None
        c = next((c for c in self.cascades if c["headline"]), self.cascades[0])
        study = c["study"]
        return {"cascade": " -> ".join(c["stages"]), "variant": self.variant_name(),
                "delta": self.delta, "target_pt": self.target_pt, "resplits": study["resplits"],
                "held_share": study["chosen"]["held_share"], "saving_mean": study["chosen"]["saving_mean"],
                "saving_p05": study["chosen"]["saving_p05"], "unit": c["unit"], "bound": self.bound,
                "rules": {r: {k: v[k] for k in ("held_share", "saving_mean", "saving_p05")}
                          for r, v in study["rules"].items()}}

    def variant_name(self) -> str:
        return (f"learn-then-test (delta {self.delta:g}, {self.bound} bound), rule by {self.folds}-fold CV among "
                f"{'/'.join(self.rules)}, global thresholds")


def _setups(table: RecordTable, settings: ReportSettings) -> list[tuple[list[int], str, str, int, bool]]:
    """(stages, saving unit, cost unit, re-splits, headline) per studied cascade."""
    local = local_indices(table)
    out = []
    if table.recorded[-1]:
        last = table.n_stages - 1
        out.append(([local[-1], last], "calls", settings.api_unit, settings.resplits, True))
        if len(local) > 1:
            out.append((local + [last], "calls", settings.api_unit, settings.resplits_others, False))
    if len(local) > 1:
        out.append((local, settings.unit, settings.unit, settings.resplits_others, not table.recorded[-1]))
    return out


def guarantee_setups(table: RecordTable, settings: ReportSettings) -> list[tuple[list[int], str, str, int, bool]]:
    """The studied cascades, in the section's order (each is computed by `guarantee_cascade`)."""
    return _setups(table, settings)


def guarantee_cascade(table: RecordTable, settings: ReportSettings, setup, progress: Progress) -> dict:
    """One studied cascade of the section (`guarantee_setups`' entry `setup`): the committed
    split's choice and its re-split study; independent of the other cascades, so the report can
    compute them in different processes."""
    stages, unit, cost_unit, resplits, headline = setup
    rules = list(settings.guarantee_rules)
    sub = table.stage_subset(stages)
    progress(f"guarantee {' -> '.join(sub.names)}: {resplits} re-splits")
    calib, test = split_tables(sub)
    bound = settings.guarantee_bound
    chosen, policies, cv = choose(calib, tuple(rules), settings.target_max_loss, settings.delta, cost_unit,
                                  settings.guarantee_folds, settings.seed, unit, bound)
    loss, saving = loss_and_saving(policies[chosen], test, unit)
    per_rule = {}
    for rule, policy in policies.items():
        r_loss, r_saving = loss_and_saving(policy, test, unit)
        per_rule[rule] = {"accuracy_loss": r_loss, "saving": r_saving,
                          "thresholds": policy_thresholds(policy, sub)}
    coded, fits = coded_subjects(sub), {}  # both studies below share the keep scores' fits
    study = resplit_study(coded, target=settings.target_max_loss, delta=settings.delta, resplits=resplits,
                          rules=tuple(rules), unit=unit, cost_unit=cost_unit, folds=settings.guarantee_folds,
                          seed=settings.seed, bound=bound, fits=fits)
    compare = None
    if headline and settings.guarantee_compare_bound not in (None, bound):
        progress(f"guarantee {' -> '.join(sub.names)}: {resplits} re-splits, "
                 f"{settings.guarantee_compare_bound} bound")
        compare = {"bound": settings.guarantee_compare_bound, **resplit_study(
            coded, target=settings.target_max_loss, delta=settings.delta, resplits=resplits, rules=tuple(rules),
            unit=unit, cost_unit=cost_unit, folds=settings.guarantee_folds, seed=settings.seed,
            bound=settings.guarantee_compare_bound, fits=fits).to_json()}
    return {
        "stages": list(sub.names), "unit": unit, "cost_unit": cost_unit, "headline": headline,
        "committed": {"rule": chosen, "cv": {r: {"accuracy_loss": v[0], "saving": v[1]} for r, v in cv.items()},
                      "thresholds": policy_thresholds(policies[chosen], sub),
                      "accuracy_loss": loss, "saving": saving,
                      "held": loss <= settings.target_max_loss + 1e-12, "rules": per_rule},
        "study": study.to_json(),
        **({"study_compare": compare} if compare else {}),
    }


def guarantee_section(table: RecordTable, settings: ReportSettings, progress: Progress,
                      cascades: list[dict] | None = None) -> GuaranteeSection:
    """The section; `cascades`: `guarantee_cascade` of every setup, already computed (else computed here)."""
    if cascades is None:
        cascades = [guarantee_cascade(table, settings, setup, progress) for setup in _setups(table, settings)]
    if not cascades:
        return GuaranteeSection(skipped="a guarantee needs a cascade of at least two stages")
    return GuaranteeSection(delta=settings.delta, target_pt=settings.target_max_loss * 100,
                            rules=list(settings.guarantee_rules), folds=settings.guarantee_folds,
                            bound=settings.guarantee_bound, cascades=cascades)
