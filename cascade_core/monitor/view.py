"""What `python -m cascade_core monitor DB` prints and the Monitor page shows, from the file alone.

Every number is recomputed from the trace database by the same code the server runs
(`service.PolicyWatch.replay`), so the terminal, the page and the server's /metrics agree, and
a database can be inspected after the server is gone. Read-only: it never writes the file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cascade_core.monitor.drift import DEFAULT_ALPHA
from cascade_core.monitor.service import PolicyInfo, PolicyWatch
from cascade_core.monitor.trace_store import TraceStore


def _watch_with_timeline(store: TraceStore, info: PolicyInfo, alpha: float, every: int) -> tuple[PolicyWatch, list]:
    watch = PolicyWatch(info, alpha)
    timeline, kept = [], []
    for i, row in enumerate(store.rows(info.hash), start=1):
        watch.add_row(row)
        kept.append(int(row["kept_early"]))
        if i % every == 0:
            cert = watch.certification()
            window = kept[-every * 5:]
            timeline.append({"question": i, "created": row["created"], "kept_share": sum(window) / len(window),
                             "loss_mean": cert.loss_mean, "lower": cert.lower, "upper": cert.upper,
                             "status": cert.status, "n_audited": cert.n_audited,
                             "drift_log_statistic": None if watch.drift is None
                             or watch.drift.log_statistic == -math.inf
                             else watch.drift.log_statistic})
    return watch, timeline


def summarise(db: Path | str, every: int = 10) -> dict:
    """Per policy (newest first): its summary (`PolicyWatch.summary`), the expected keep rates,
    a timeline (every `every` questions: recent keep share, bound, status) and its alarms; and
    the database's totals."""
    with TraceStore(db, read_only=True) as store:
        policies = []
        for entry in store.policies():
            info = PolicyInfo.from_dict(entry["info"])
            alpha = float(entry["info"].get("alpha", DEFAULT_ALPHA))
            watch, timeline = _watch_with_timeline(store, info, alpha, max(int(every), 1))
            summary = watch.summary()
            summary["expected_keep"] = {s["stage"]: s["keep_rate"] for s in (info.expectation or {}).get("stages", [])}
            summary["timeline"] = timeline
            summary["alarms"] = store.alarms(info.hash)
            summary["fallback"] = store.fallback(info.hash)
            summary["registered"] = entry["created"]
            policies.append(summary)
        return {"db": str(db), "questions": store.count(), "policies": policies,
                "alarms": store.alarms(limit=50), "read_at": time.time()}


def render_text(summary: dict) -> str:
    """The terminal view of `summarise`."""
    lines = [f"trace database {summary['db']}: {summary['questions']:,} questions"]
    for p in summary["policies"]:
        cert = p["certification"]
        lines += ["", f"policy {p['policy'][:12]} ({p['kind']}): {p['description']}",
                  f"  stages: {' -> '.join(p['stages'])}; {p['questions']:,} questions, {p['errors']} errors"]
        if p["fallback"]:
            lines.append(f"  FALLBACK (last stage alone) since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(p['fallback']['since']))} UTC")
        lines.append(f"  re-certification: {cert['message']}")
        expected = p["expected_keep"]
        drift = p["drift"]
        if drift is None:
            lines.append(f"  drift: off ({p['drift_note'] or 'no expectation'})")
        else:
            lines.append(f"  drift: {'ALARM at question ' + str(drift['fired_at']) if drift['alarm'] else 'quiet'} "
                         f"(statistic {drift['statistic']:.3g}, alarm at {drift['threshold']:.3g})")
            for s in drift["streams"][:3]:
                if s["n"]:
                    lines.append(f"    {s['stage']} {s['what']}: observed {s['observed']:.1%} (lately "
                                 f"{s['recent']:.1%}), "
                                 f"calibration {s['expected']:.1%}, band {s['band'][0]:.1%}-{s['band'][1]:.1%}")
        for stage, rate in expected.items():
            lines.append(f"  expected keep rate of {stage}: {rate:.1%}")
        share = p["kept_early_share"]
        lines.append(f"  kept by an early stage: {'n/a' if share is None else f'{share:.1%}'}")
        saved = p["cost_saved_estimate"]
        flops_saved = "n/a" if saved["flops"] is None else f"{saved['flops']:.1%}"
        lines.append(f"  cost: {p['cost']['flops']:.3g} FLOPs, ${p['cost']['dollars']:.4f}; saved against the last "
                     f"stage alone: {flops_saved} of FLOPs (estimated on {saved['sample']} audited questions)")
        a = p["audit"]
        lines.append(f"  audit: {a['sampled']} sampled ({a['done']} run, {a['free']} free, {a['pending']} running, "
                     f"{a['skipped']} skipped, {a['failed']} failed); audit cost {a['flops']:.3g} FLOPs, "
                     f"${a['dollars']:.4f}, {a['seconds']:.1f} s (not in the cost above)")
        for alarm in p["alarms"][:5]:
            lines.append(f"  alarm {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(alarm['created']))} UTC "
                         f"[{alarm['kind']}]: {alarm['message']}")
    return "\n".join(lines)
