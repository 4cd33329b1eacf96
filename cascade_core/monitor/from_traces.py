"""Re-calibration from traffic: a label-free policy file from the audited questions of a trace DB.

The audited questions (`audit`) are an unbiased sample of the traffic with every enabled
stage's answer and signals: a question the cascade escalated to its last stage visited them all,
one an early stage kept had the stages it skipped run by the audit. Those rows become a
`RecordTable` whose `correct` is agreement with the last stage (answer keys compared, `label_free`),
and the existing label-free calibration (`calibrated.calibrate_policy`, Learn-then-Test with the
betting bound) chooses the new thresholds, with the same guarantee statement as `calibrate
--label-free` and the audited sample's size. Stages the running policy had switched off were
never run on the traffic: they stay off, and the file says why.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade_core.monitor.trace_store import TraceStore

MIN_QUESTIONS = 30


def audited_table(store: TraceStore, kind: str = "free", policy_hash: str | None = None):
    """The audited rows of `kind` (of one policy, or of the newest policy of that kind) as a
    RecordTable over the policy's enabled stages, and the label-free loss (S, N)."""
    from cascade_core.monitor.service import PolicyInfo
    from cascade_core.records.table import RecordTable

    infos = [p for p in store.policies() if p["kind"] == kind and (policy_hash is None or p["hash"] == policy_hash)]
    if not infos:
        which = "policy " + policy_hash if policy_hash else kind + " policy"
        raise ValueError(f"{store.path}: no {which} in the traces")
    info = PolicyInfo.from_dict(infos[0]["info"])
    names = list(info.stages)
    cols = {k: [] for k in ("qid", "key", "prediction", "p_t", "p_ik", "margin", "entropy", "prompt_tokens",
                            "output_tokens", "flops", "seconds", "dollars")}
    model_ids = {}
    for row in store.rows(info.hash):
        if not row["sampled"] or row["audit"] not in ("done", "free") or row["fallback"]:
            continue
        by_stage = {s["stage"]: s for s in (row["steps"] or []) + (row["audit_steps"] or []) if not s.get("error")}
        if any(n not in by_stage for n in names):
            continue
        cols["qid"].append(f"trace-{row['id']}")
        for name in ("key", "p_t", "p_ik", "margin", "entropy", "prompt_tokens", "output_tokens", "flops", "seconds",
                     "dollars"):
            cols[name].append([by_stage[n].get(name) for n in names])
        cols["prediction"].append([by_stage[n].get("index") if by_stage[n].get("index") is not None else 0
                                   for n in names])
        for n in names:
            model_ids.setdefault(n, by_stage[n].get("model_id") or n)
    n = len(cols["qid"])
    if n < MIN_QUESTIONS:
        raise ValueError(f"{store.path}: {n} audited question(s) of policy {info.hash[:12]} have every stage's answer; "
                         f"re-calibration needs at least {MIN_QUESTIONS} (raise --audit-share or wait for more "
                         f"traffic)")
    keys = np.array(cols["key"], dtype=object).T  # (S, N)
    loss = np.array([[a != b for a, b in zip(row, keys[-1])] for row in keys], dtype=bool)
    arr = lambda name: np.array([[np.nan if v is None else v for v in r] for r in cols[name]], dtype=np.float64).T  # noqa: E731
    table = RecordTable(names=tuple(names), model_ids=tuple(model_ids[n] for n in names), qids=np.array(cols["qid"]),
                        subjects=np.full(n, ""), splits=np.full(n, "calibration"), correct=~loss,
                        prediction=np.array(cols["prediction"], dtype=np.int64).T, p_t=arr("p_t"), p_ik=arr("p_ik"),
                        margin=arr("margin"), entropy=arr("entropy"), prompt_tokens=arr("prompt_tokens"),
                        output_tokens=arr("output_tokens"), flops=arr("flops"), seconds=arr("seconds"),
                        dollars=arr("dollars"), has_hidden=np.isfinite(arr("p_ik")).any(axis=1),
                        recorded=np.zeros(len(names), dtype=bool))
    return table, loss, info


def calibrate_from_traces(db: Path | str, preset, *, kind: str = "free", policy_hash: str | None = None,
                          target_pt: float = 1.0, delta: float = 0.1, rule: str = "auto", seed: int = 0,
                          out: Path | str | None = None):
    """Write the new policy file (default: where `calibrate` writes the preset's policy for this
    kind of question); (path, PolicyFile)."""
    from cascade_core.records.runner import code_version
    from cascade_core.choose.calibrated_policy import calibrate_policy
    from cascade_core.locations import locations
    from cascade_core.compose.policies import (kind_dataset, label_free_figures, calibration_stages,
                                               policy_path)
    from cascade_core.choose.label_free import LOSS_NAME, label_free_table
    from cascade_core.policy import CascadePolicy, StagePolicy
    from cascade_core.choose.policy_file import file_sha256, policy_file_from_calibrated, write_policy_file
    from cascade_core.presets import Preset, load_preset

    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    with TraceStore(db, read_only=True) as store:
        table, loss, info = audited_table(store, kind, policy_hash)
    all_stages = calibration_stages(preset)
    missing = [n for n in table.names if n not in all_stages]
    if missing:
        raise ValueError(f"the traces' stages {', '.join(missing)} are not enabled stages of preset {preset.name!r}")
    rules = ("pt_only", "both") if rule == "auto" else (rule,)
    if not table.has_hidden[:-1].any():
        rules = tuple(r for r in rules if r == "pt_only") or ("pt_only",)
    calib = label_free_table(table, loss)
    chosen = calibrate_policy(calib, target_max_loss=target_pt / 100.0, delta=delta, unit="flops", rules=rules,
                              seed=seed)
    by_name = dict(zip(table.names, chosen.policy.stages))
    full = CascadePolicy(tuple(by_name.get(n, StagePolicy(enabled=False)) for n in all_stages))
    chosen = replace(chosen, policy=full, stages=tuple(all_stages))
    chosen = label_free_figures(chosen, None)
    provenance = {"dataset": f"traces ({kind})", "split": "audited traffic", "questions": int(table.n_questions),
                  "records_sha256": {"traces": file_sha256(db)}, "traces": str(db), "policy_hash": info.hash,
                  "code_version": code_version()}
    import datetime as _dt

    provenance["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    found = policy_file_from_calibrated(chosen, preset.name, provenance, target_pt=target_pt, rule_choice=rule)
    never_run = {n: "not run on the audited traffic (the running policy had it off); calibrate it from records"
                 for n in all_stages if n not in table.names}
    found = replace(found, guarantee={**found.guarantee, "loss": "label_free", "loss_name": LOSS_NAME},
                    off_reasons={**found.off_reasons, **never_run})
    dataset = kind_dataset(kind == "mc")
    path = Path(out) if out else policy_path(preset, locations(), dataset)
    return write_policy_file(path, found), found
