"""The paper's experiment as numbers: records in, typed sections out (`build_report_sections`), one JSON-able
dict (`build_report`); docs/RESULTS.md renders either (`markdown.render`).

Every choice (thresholds, which stages run, the routing rule, the pre-generation router's
threshold, probes for the OOD and label-free studies) is made on the calibration split, and
every number reported is measured on the test split. Sections:

- `guarantee`: the Learn-then-Test choice and the re-split study of how often its promise held;
- `models`: each model alone: accuracy (Wilson 95% CI), mean cost, AUROC/ECE of P(T), P(IK);
- `cascades`: every 2-stage and the full local cascade at <= `target_max_loss` lost against its
  largest model (the paper's table): thresholds, accuracy, PD, compute reduction (bootstrap
  CI), escalation rates, McNemar p, and the oracle's saving for scale;
- `api`: local stage(s) -> recorded GPT-4: share of GPT-4 calls, tokens and dollars saved, for
  several variants (rule x thresholds global / per category / per subject x calibration
  target); the headline variant is picked by cross-validation INSIDE the calibration split;
- `ablations`: rule both / pt_only / pik_only / learned;
- `baselines`: random routing, the oracle and the pre-generation router, with AIQ and APGR;
- `ood`: probes and thresholds fit on three MMLU categories, reported on the fourth;
- `label_free`: a probe trained on "agrees with the largest model" against the gold probe.

One module per section (`models`, `cascades`, `api`, `ablations`, `baselines`, `ood`,
`label_free`), each returning small dataclasses; this module assembles them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from cascade_core.records.table import RecordTable
from cascade_core.report.ablations import AblationBlock
from cascade_core.report.api import ApiCascade, api_cascade, api_setups, pick_variant
from cascade_core.report.baselines import BaselineBlock, baseline_entry, oracle_curve, router_predictions, wants_router
from cascade_core.report.cascades import CascadeRow, cascade_section
from cascade_core.report.common import (REPORT_FORMAT, Part, Progress, ReportSettings, local_indices, outcome,
                                        policy_dict, policy_from_dict, policy_thresholds, split_tables, with_groups,
                                        with_p_ik)
from cascade_core.report.guarantee import GuaranteeSection, guarantee_cascade, guarantee_section, guarantee_setups
from cascade_core.report.jobs import Job, run_jobs
from cascade_core.report.label_free import (LabelFreeSection, agreement_labels, label_free_guarantee,
                                            label_free_section)
from cascade_core.report.models import ModelRow, model_section
from cascade_core.report.ood import OodSection, ood_categories, ood_section, ood_train_mask
from cascade_core.report.probes import assemble_p_ik, retrain_p_ik, retrain_stage
from cascade_core.report.ablations import ablation_section

__all__ = ["Report", "ReportSettings", "build_report", "build_report_sections", "oracle_curve", "outcome",
           "pick_variant", "policy_dict", "policy_from_dict", "policy_thresholds", "retrain_p_ik",
           "split_tables", "with_groups", "with_p_ik"]


@dataclass
class Report:
    """Every section's typed result; `to_json` is what `report --json` prints."""

    format: str
    meta: dict
    models: list[ModelRow]
    cascades: list[CascadeRow]
    api: list[ApiCascade]
    ablations: list[AblationBlock]
    baselines: list[BaselineBlock]
    ood: OodSection
    label_free: LabelFreeSection
    guarantee: GuaranteeSection

    def to_json(self) -> dict:
        out = {"format": self.format, "meta": self.meta, "guarantee": self.guarantee.headline(),
               "guarantee_study": self.guarantee.to_json()}
        for name in ("models", "cascades", "api", "ablations", "baselines"):
            out[name] = [part.to_json() for part in getattr(self, name)]
        out["ood"] = self.ood.to_json()
        out["label_free"] = self.label_free.to_json()
        return Part.to_json_value(out)

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        """The typed report from `to_json`'s dict (e.g. a saved `report --json`)."""
        return cls(format=data["format"], meta=data["meta"],
                   models=[ModelRow.from_json(d) for d in data["models"]],
                   cascades=[CascadeRow.from_json(d) for d in data["cascades"]],
                   api=[ApiCascade.from_json(d) for d in data["api"]],
                   ablations=[AblationBlock.from_json(d) for d in data["ablations"]],
                   baselines=[BaselineBlock.from_json(d) for d in data["baselines"]],
                   ood=OodSection.from_json(data["ood"]), label_free=LabelFreeSection.from_json(data["label_free"]),
                   guarantee=GuaranteeSection.from_json(data.get("guarantee_study") or {"skipped": "not in this "
                                                                                                   "report"}))


def build_report(table: RecordTable, questions: pd.DataFrame | None = None,
                 features: Mapping[str, tuple[np.ndarray, dict]] | None = None,
                 categories: np.ndarray | None = None, settings: ReportSettings = ReportSettings(),
                 meta: Mapping | None = None, progress: Progress | None = None, workers: int = 2) -> dict:
    """`build_report_sections(...).to_json()`: the JSON-able dict of every number (`workers`:
    worker processes of `report.jobs`, 1 = all in this one; the numbers are the same)."""
    return build_report_sections(table, questions, features, categories, settings, meta, progress,
                                 workers=workers).to_json()


def build_report_sections(*args, **kwargs) -> Report:
    """Every number of docs/RESULTS.md from the records (`_build`'s docstring), BLAS capped at one
    thread once for the whole report (its matrix products are small; see `sweep.blas_limit`)."""
    from cascade_core.choose.sweep import blas_limit

    with blas_limit(1):
        return _build(*args, **kwargs)


def _build(
    table: RecordTable,
    questions: pd.DataFrame | None = None,
    features: Mapping[str, tuple[np.ndarray, dict]] | None = None,
    categories: np.ndarray | None = None,
    settings: ReportSettings = ReportSettings(),
    meta: Mapping | None = None,
    progress: Progress | None = None,
    workers: int = 2,
) -> Report:
    """Every number of docs/RESULTS.md from the records (see the module docstring).

    `table`: the local stages (smallest first), optionally ending with one recorded stage
    (GPT-4) for the API scenario. `questions` (qid, subject, question, options) feeds the
    pre-generation router; `features` (stage -> (qids, {layer: array}), as bench.load_features
    gives) the OOD and label-free probes; `categories` per question (default: MMLU's, from the
    subjects). Sections whose inputs are missing say so instead of guessing.
    """
    progress = progress or (lambda message: None)
    local = local_indices(table)
    if not local:
        raise ValueError("the table has no local stage: nothing to cascade")
    if any(table.recorded[s] for s in range(table.n_stages - 1)):
        raise ValueError("a recorded stage can only be the last stage of the table")
    calib, test = split_tables(table)
    if categories is None:
        from cascade_core.records.mmlu import mmlu_category

        categories = np.array([mmlu_category(s) for s in table.subjects], dtype=object).astype(str)
    categories = np.asarray(categories).astype(str)
    if categories.shape != (table.n_questions,):
        raise ValueError(f"categories must have one entry per question ({table.n_questions}), got {categories.shape}")

    report_meta = {**dict(meta or {}), "stages": list(table.names), "model_ids": list(table.model_ids),
                   "recorded": [bool(r) for r in table.recorded],
                   "n_questions": {"calibration": calib.n_questions, "test": test.n_questions},
                   "has_p_ik": {n: bool(np.isfinite(table.p_ik[s]).all()) for s, n in enumerate(table.names)},
                   "settings": dataclasses.asdict(settings)}
    progress("models")
    models = model_section(table)
    has_features = features is not None and any(table.names[s] in features for s in local)
    run_ood = settings.ood and has_features and len(set(categories) - {""}) >= 2
    held_out = ood_categories(categories) if run_ood else []
    run_label_free_probes = settings.label_free and has_features and len(local) >= 2

    # Round 1: every piece that needs nothing from another (jobs.py), spread over `workers` processes.
    jobs = _independent_jobs(table, settings, questions, features, categories, held_out, run_label_free_probes,
                             progress)
    progress(f"{len(jobs)} independent jobs (re-splits, cascades, API variants, text router, probes) "
             f"over {workers} process{'es' if workers > 1 else ''}")
    done = run_jobs(jobs, workers)
    guarantee = guarantee_section(table, settings, progress,
                                  cascades=[done[f"guarantee {i}"] for i in range(len(guarantee_setups(table,
                                                                                                        settings)))])
    cascades, ablations = done["cascades"], done["ablations"]
    api = [done[f"api {i}"] for i in range(len(api_setups(table)))]
    api_rule = None
    if api:
        full = api[-1]
        api_rule = next(v["rule"] for v in full.variants if v["name"] == full.chosen)
    router = done.get("router")
    ood_probes = {held: assemble_p_ik(table, {s: done[f"ood {held} {s}"] for s in local
                                              if f"ood {held} {s}" in done})
                  for held in held_out if any(f"ood {held} {s}" in done for s in local)}
    free_probes = (assemble_p_ik(table, {s: done[f"label-free {s}"] for s in local[:-1]})
                   if run_label_free_probes else None)

    # Round 2: what reads round 1's results (the OOD and label-free cascades, the baselines).
    tail = []
    if run_ood:
        tail.append(Job("ood", 4.0, ood_section, (table, features, categories, settings, progress, held_out,
                                                  ood_probes)))
    if run_label_free_probes:
        tail.append(Job("label-free", 2.0, label_free_section, (table, features, settings, progress, free_probes)))
    tail.append(Job("baselines local", 2.0, baseline_entry, (table, local, "both", settings.unit, settings,
                                                             questions, progress, router)))
    if table.recorded[-1]:
        tail.append(Job("baselines api", 2.0, baseline_entry,
                        (table, local + [table.n_stages - 1], api_rule or "both", settings.api_unit, settings,
                         questions, progress, router)))
    done2 = run_jobs(tail, workers)
    baselines = [done2["baselines local"]] + ([done2["baselines api"]] if table.recorded[-1] else [])
    if run_ood:
        ood = done2["ood"]
    else:
        ood = OodSection(skipped="no hidden-state features" if not has_features else "fewer than 2 categories")
    if run_label_free_probes:
        label_free = done2["label-free"]
    else:
        label_free = LabelFreeSection(skipped="no hidden-state features" if not has_features else "one local stage")
    if settings.label_free:
        label_free.guarantee = done["label-free guarantee"]
    return Report(format=REPORT_FORMAT, meta=report_meta, models=models, cascades=cascades, api=api,
                  ablations=ablations, baselines=baselines, ood=ood, label_free=label_free, guarantee=guarantee)


def _independent_jobs(table: RecordTable, settings: ReportSettings, questions, features, categories: np.ndarray,
                      held_out: list[str], label_free_probes: bool, progress: Progress) -> list[Job]:
    """The report's round-1 jobs, each with a rough cost (CPU seconds on the 14,042-question
    stand-in; only their order matters: the longest start first)."""
    local = local_indices(table)
    jobs = []
    for i, setup in enumerate(guarantee_setups(table, settings)):
        stages, _, _, resplits, headline = setup
        compare = headline and settings.guarantee_compare_bound not in (None, settings.guarantee_bound)
        cost = 0.1 * resplits * len(stages) * (1.6 if compare else 1.0)
        jobs.append(Job(f"guarantee {i}", cost, guarantee_cascade, (table, settings, setup, progress)))
    for i, stages in enumerate(api_setups(table)):
        jobs.append(Job(f"api {i}", 3.0 * len(stages), api_cascade, (table, stages, categories, settings, progress)))
    jobs.append(Job("cascades", 1.0, cascade_section, (table, settings, progress)))
    jobs.append(Job("ablations", 1.0, ablation_section, (table, settings, progress)))
    if wants_router(questions, settings):
        jobs.append(Job("router", 15.0, router_predictions, (table, questions, settings)))
    if settings.label_free:
        jobs.append(Job("label-free guarantee", 1.5, label_free_guarantee, (table, settings, progress)))

    def probe_cost(s: int, mask: np.ndarray) -> float:  # lbfgs over the training rows, about rows x width
        _, layers = features[table.names[s]]
        return float(mask.sum()) * sum(a.shape[1] for a in layers.values()) / 3e5

    trainable = [s for s in local if not table.recorded[s] and table.names[s] in (features or {})]
    is_test = table.splits == "test"
    for held in held_out:
        mask = ood_train_mask(table, categories, held)
        if not (is_test & (categories == held)).any() or not mask.any():
            continue  # `ood_section` skips this category
        for s in trainable:
            jobs.append(Job(f"ood {held} {s}", probe_cost(s, mask), _progress_then,
                            (progress, f"ood: held-out category {held}, {table.names[s]}'s probe", retrain_stage,
                             (table, features, s, mask, settings))))
    if label_free_probes:
        cal = table.splits == "calibration"
        agree = agreement_labels(table)
        for s in local[:-1]:
            jobs.append(Job(f"label-free {s}", probe_cost(s, cal) if s in trainable else 0.0, _progress_then,
                            (progress, f"label-free probe of {table.names[s]}", retrain_stage,
                             (table, features, s, cal, settings, agree[s]))))
    return jobs


def _progress_then(progress: Progress, message: str, fn, args: tuple):
    progress(message)
    return fn(*args)
