"""Wiring: the `Monitor` of a served preset (composition layer: policy files and records).

For each kind of question it takes the policy the cascade runs with (`compose.policies.
served_policies`, as `build_cascade` does: `serve --dataset/--policy`'s, else the kind's, MMLU's
for multiple choice and `kind_dataset`'s for free-form), names it by the sha256 of its policy
file (of its thresholds when it runs the preset's own), reads the promise (a label-free target, or
none), the dataset's grader, and
builds the drift expectation by replaying the policy on its calibration records. A missing piece
(no records here, a policy without a target) leaves that part off with the reason shown, never
a guess.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cascade_core.monitor.service import Monitor, PolicyInfo
from cascade_core.monitor.trace_store import TraceStore


def policy_infos(preset, stages, thresholds: str = "auto", policies: dict | None = None) -> dict[str, PolicyInfo]:
    """kind -> PolicyInfo for the runtime `stages` built from `preset` (module docstring);
    `policies`: each kind's `QuestionPolicy` (True: multiple choice) the stages were built with."""
    from cascade_core.cascade import for_free_form
    from cascade_core.locations import locations
    from cascade_core.compose.policies import kind_dataset, policy_for_question
    from cascade_core.choose.policy_file import file_sha256, read_policy_file

    where = locations()
    out = {}
    for kind in ("mc", "free"):
        multiple_choice = kind == "mc"
        runtime = [for_free_form(s) for s in stages] if kind == "free" else list(stages)
        enabled = tuple(s.name for s in runtime if s.policy.enabled)
        dataset = kind_dataset(multiple_choice)
        if policies is not None:
            applied, dataset = policies[multiple_choice].applied, policies[multiple_choice].dataset
        else:
            try:
                chosen = policy_for_question(preset, multiple_choice, None, where,
                                             "preset" if thresholds == "preset" else thresholds)
                applied, dataset = chosen.applied, chosen.dataset
            except (FileNotFoundError, ValueError):
                applied = None
        target, delta, description = None, 0.1, runtime[0].policy_source if runtime else ""
        if applied is not None and applied.file is not None:
            digest = file_sha256(applied.file)
            found = read_policy_file(applied.file)
            g = found.guarantee
            if g.get("mode") == "target" and g.get("loss") == "label_free" and g.get("target_pt") is not None:
                target = float(g["target_pt"]) / 100.0
            delta = float(g.get("delta", 0.1))
            description = found.description
            policy = applied.policy
        else:
            from cascade_core.policy import CascadePolicy

            policy = CascadePolicy(tuple(s.policy for s in runtime))
            digest = hashlib.sha256(json.dumps([s.policy.to_dict() for s in runtime], sort_keys=True,
                                               default=str).encode()).hexdigest()
        grader, tolerance = ("mc", 1e-6) if kind == "mc" else _grader_of(dataset, where)
        expectation, note = None, ""
        if target is None and applied is not None and applied.file is not None:
            note = "the policy file promises no label-free loss (re-certification needs `calibrate --label-free`)"
        try:
            expectation = _expectation(preset, dataset, where, policy, [s.name for s in runtime])
        except Exception as err:  # noqa: BLE001 - no records here: the drift alarm is off, and says why
            note = (note + "; " if note else "") + f"no drift expectation: {err}"
        out[kind] = PolicyInfo(hash=digest, kind=kind, description=description, stages=enabled, target=target,
                               delta=delta, grader=grader, tolerance=tolerance, expectation=expectation,
                               expectation_note=note)
    return out


def _grader_of(dataset: str, where) -> tuple[str, float]:
    from cascade_core.records.registry import read_metadata

    g = read_metadata(dataset, where.results).get("grader") or {"name": "exact"}
    return str(g["name"]), float(g.get("tolerance", 1e-6))


def _expectation(preset, dataset: str, where, policy, names) -> dict:
    from cascade_core.compose.tables import load_preset_table
    from cascade_core.monitor.drift import expectation

    table = load_preset_table(preset, dataset, where.results, include_recorded=False)
    if list(table.names) != list(names):
        raise ValueError(f"records cover {list(table.names)}, the cascade runs {list(names)}")
    return expectation(table.subset("calibration"), policy)


def build_monitor(preset, stages, db: Path | str, *, thresholds: str = "auto", retention_days: float | None = None,
                  max_rows: int | None = None, store_questions: bool = False, audit_share: float = 0.02,
                  seed: int = 0, alpha: float | None = None, fallback: bool = False,
                  policies: dict | None = None) -> Monitor:
    """The monitor `serve --traces DB` runs (options as in `python -m cascade_core serve --help`)."""
    from cascade_core.monitor.drift import DEFAULT_ALPHA

    store = TraceStore(db, retention_days=retention_days, max_rows=max_rows, store_questions=store_questions)
    return Monitor(store, policy_infos(preset, stages, thresholds, policies), audit_share=audit_share, seed=seed,
                   alpha=DEFAULT_ALPHA if alpha is None else alpha, fallback=fallback)


def check_monitor_args(args) -> None:
    """Refuse bad `serve --traces` options before any model loads, naming the flag."""
    import math

    if not 0.0 <= args.audit_share <= 1.0:
        raise ValueError(f"--audit-share must be between 0 and 1, got {args.audit_share}")
    if args.retention_days is not None and not (math.isfinite(args.retention_days) and args.retention_days > 0):
        raise ValueError(f"--retention-days must be a number of days > 0, got {args.retention_days}")
    if args.max_traces is not None and args.max_traces < 1:
        raise ValueError(f"--max-traces must be at least 1, got {args.max_traces}")
    if args.drift_alpha is not None and not 0.0 < args.drift_alpha < 1.0:
        raise ValueError(f"--drift-alpha must be between 0 and 1, got {args.drift_alpha}")
    if Path(args.traces).is_dir():
        raise ValueError(f"--traces {args.traces} is a folder; give the database file's path")
