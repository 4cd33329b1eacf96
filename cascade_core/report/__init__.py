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
from cascade_core.report.ablations import AblationBlock, ablation_section
from cascade_core.report.api import ApiCascade, api_section, pick_variant
from cascade_core.report.baselines import BaselineBlock, baseline_section, oracle_curve
from cascade_core.report.cascades import CascadeRow, cascade_section
from cascade_core.report.common import (REPORT_FORMAT, Part, Progress, ReportSettings, _local_indices,
                                            outcome, policy_dict, policy_from_dict, policy_thresholds,
                                            split_tables, with_groups, with_p_ik)
from cascade_core.report.guarantee import GuaranteeSection, guarantee_section
from cascade_core.report.label_free import LabelFreeSection, label_free_guarantee, label_free_section
from cascade_core.report.models import ModelRow, model_section
from cascade_core.report.ood import OodSection, join_ood, ood_categories, ood_section
from cascade_core.report.probes import retrain_p_ik

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
    processes, 1 or 2; the numbers are the same)."""
    return build_report_sections(table, questions, features, categories, settings, meta, progress,
                                 workers=workers).to_json()


def build_report_sections(*args, **kwargs) -> Report:
    """Every number of docs/RESULTS.md from the records (`_build`'s docstring), BLAS capped at one
    thread once for the whole report (its matrix products are small; see `sweep.blas_limit`)."""
    from cascade_core.choose.sweep import blas_limit

    with blas_limit(1):
        return _build(*args, **kwargs)


def _side_sections(table: RecordTable, settings: ReportSettings, questions=None, progress: Progress | None = None,
                   features=None, categories=None, ood_held_out=()):
    """The work that needs nothing from the API section: the guarantee study, the local cascades,
    the ablations, the text router's predictions and the OOD study of the categories
    `ood_held_out` (in a second process when the report has two workers)."""
    from cascade_core.choose.sweep import blas_limit
    from cascade_core.report.baselines import router_predictions, wants_router

    progress = progress or (lambda message: None)
    with blas_limit(1):
        return (guarantee_section(table, settings, progress), cascade_section(table, settings, progress),
                ablation_section(table, settings, progress),
                router_predictions(table, questions, settings) if wants_router(questions, settings) else None,
                ood_section(table, features, categories, settings, progress, held_out=ood_held_out)
                if ood_held_out else None)


def _start_side_sections(table: RecordTable, settings: ReportSettings, questions, progress: Progress, workers: int,
                         features=None, categories=None, ood_held_out=()):
    """Start `_side_sections`; returns a function that waits for its result. With `workers` >= 2
    and fork available, a forked child computes them while this process does the API scenario,
    the baselines, the other OOD categories and the label-free probes (the two halves take about
    as long; the machine has two cores). The child inherits its inputs (only its result comes
    back through a pipe). The numbers are the same either way: every section is a pure, seeded
    function of the table."""
    import multiprocessing

    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        result = _side_sections(table, settings, questions, progress, features, categories, ood_held_out)
        return lambda: result
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def run() -> None:
        try:
            outcome = ("ok", _side_sections(table, settings, questions, progress, features, categories, ood_held_out))
        except BaseException as err:  # noqa: BLE001 -- any failure goes back to the parent, named
            import traceback

            outcome = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        send.send(outcome)
        send.close()

    progress("guarantee, cascades, ablations, text router" + (f", OOD {'/'.join(ood_held_out)}" if ood_held_out else "")
             + " (in a second process)")
    child = context.Process(target=run, name="report-side-sections", daemon=True)
    child.start()
    send.close()

    def wait():
        try:
            kind, value = receive.recv()
        except EOFError:
            child.join()
            raise RuntimeError(f"the report's second process ended without a result (exit code "
                               f"{child.exitcode})") from None
        finally:
            receive.close()
        child.join()
        if kind == "error":
            raise RuntimeError(f"the report's second process failed: {value}")
        return value

    return wait


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
    local = _local_indices(table)
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
    # The second process also takes the later half of the OOD categories (each trains its own probes).
    side_ood = tuple(held_out[len(held_out) // 2:]) if workers >= 2 else tuple(held_out)
    side = _start_side_sections(table, settings, questions, progress, workers, features, categories, side_ood)
    api = api_section(table, categories, settings, progress)
    here = [c for c in held_out if c not in side_ood]
    ood_here = ood_section(table, features, categories, settings, progress, held_out=here) if here else None
    # Section 7 needs nothing from the second process either: done before waiting for it.
    if settings.label_free and has_features and len(local) >= 2:
        label_free = label_free_section(table, features, settings, progress)
    else:
        label_free = LabelFreeSection(skipped="no hidden-state features" if not has_features else "one local stage")
    if settings.label_free:
        label_free.guarantee = label_free_guarantee(table, settings, progress)
    guarantee, cascades, ablations, router, ood_side = side()
    api_rule = None
    if api:
        full = api[-1]
        api_rule = next(v["rule"] for v in full.variants if v["name"] == full.chosen)
    baselines = baseline_section(table, settings, questions, api_rule, progress, router=router)
    if run_ood:
        ood = join_ood([part for part in (ood_here, ood_side) if part is not None], categories)
    else:
        ood = OodSection(skipped="no hidden-state features" if not has_features else "fewer than 2 categories")
    return Report(format=REPORT_FORMAT, meta=report_meta, models=models, cascades=cascades, api=api,
                  ablations=ablations, baselines=baselines, ood=ood, label_free=label_free, guarantee=guarantee)
