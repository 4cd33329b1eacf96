"""Monitor: a served cascade watching itself, read from its trace database (`serve --traces DB`).

UI only: every number comes from `cascade_core.monitor.view.summarise` (the same code the
server's /metrics runs); the page re-reads the file every few seconds by itself.
"""

from __future__ import annotations

import os
import time

import pandas as pd
import streamlit as st

from cascade_core.monitor.view import summarise

STATUS_ICON = {"holds": "✅", "not yet known": "⏳", "at risk": "⚠️", "broken": "🛑", "no target": "–"}

st.title("Monitor")
st.caption("Every question `serve --traces DB` routed: the audited label-free loss with its anytime-valid bound "
           "against the policy's target, keep rates against calibration, cost, and the alarm history.")
db = st.text_input("Trace database", value=os.environ.get("CASCADE_TRACES_DB", "data/traces.db"), key="monitor_db")
refresh = st.number_input("Refresh every (seconds)", min_value=1, max_value=600, value=5, key="monitor_refresh")


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} pt"


@st.fragment(run_every=f"{int(refresh)}s")
def live() -> None:
    if not os.path.isfile(db):
        st.info(f"No trace database at {db} yet: start the server with `python -m cascade_core serve --traces {db}`.")
        return
    try:
        summary = summarise(db)
    except Exception as err:  # noqa: BLE001 - shown, not raised: a bad file must not break the page
        st.error(f"{db}: {err}")
        return
    st.caption(f"{summary['questions']:,} questions in {summary['db']}; read "
               f"{time.strftime('%H:%M:%S', time.localtime(summary['read_at']))}")
    if not summary["policies"]:
        st.info("No policy has routed a question yet.")
    for p in summary["policies"]:
        cert = p["certification"]
        kind = "multiple choice" if p["kind"] == "mc" else "free-form"
        st.subheader(f"{kind} policy {p['policy'][:12]}")
        st.caption(f"{p['description']} · stages: {' → '.join(p['stages'])}")
        if p["fallback"]:
            st.error("FALLBACK: the last stage answers every question until the policy is re-calibrated "
                     f"({p['fallback']['reason']})")
        drift = p["drift"]
        cols = st.columns(4)
        cols[0].metric("Re-certification", f"{STATUS_ICON.get(cert['status'], '')} {cert['status']}")
        cols[1].metric("Audited label-free loss", pct(cert["loss_mean"]),
                       delta=f"bound {pct(cert['upper'])} vs target {pct(cert['target'])}", delta_color="off")
        saved = p["cost_saved_estimate"]["flops"]
        cols[2].metric("FLOPs saved (estimate)", "n/a" if saved is None else f"{saved:.1%}",
                       delta=f"on {p['cost_saved_estimate']['sample']} audited", delta_color="off")
        cols[3].metric("Drift alarm", "ALARM" if drift and drift["alarm"] else ("off" if drift is None else "quiet"),
                       delta=None if drift is None else f"statistic {drift['statistic']:.3g} / "
                                                        f"{drift['threshold']:.3g}",
                       delta_color="off")
        st.write(cert["message"])
        if p["timeline"]:
            frame = pd.DataFrame(p["timeline"]).set_index("question")
            left, right = st.columns(2)
            with left:
                st.caption("Share kept by an early stage (last 50 questions) against calibration")
                keep = frame[["kept_share"]].rename(columns={"kept_share": "live"})
                for stage, rate in p["expected_keep"].items():
                    keep[f"calibration ({stage})"] = rate
                st.line_chart(keep)
            with right:
                st.caption("Audited label-free loss and its anytime bound against the target")
                bound = frame[["loss_mean", "lower", "upper"]].copy()
                if cert["target"] is not None:
                    bound["target"] = cert["target"]
                st.line_chart(bound)
        if drift is not None and drift["streams"]:
            st.caption("Signal and keep-rate streams, most drifted first")
            st.dataframe(pd.DataFrame([{"stage": s["stage"], "stream": s["what"], "calibration": s["expected"],
                                        "band": f"{s['band'][0]:.3f}-{s['band'][1]:.3f}", "observed": s["observed"],
                                        "lately": s["recent"], "questions": s["n"]} for s in drift["streams"][:12]]),
                         hide_index=True)
        elif drift is None:
            st.caption(f"Drift alarm off: {p['drift_note'] or 'no calibration expectation'}")
        audit = p["audit"]
        st.caption(f"Audit: {audit['sampled']} sampled ({audit['done']} run, {audit['free']} free, {audit['pending']} "
                   f"running, {audit['skipped']} skipped, {audit['failed']} failed); audit cost {audit['flops']:.3g} "
                   f"FLOPs, ${audit['dollars']:.4f}, {audit['seconds']:.1f} s, not in the cascade's cost "
                   f"({p['cost']['flops']:.3g} FLOPs, ${p['cost']['dollars']:.4f})")
    st.subheader("Alarm history")
    if summary["alarms"]:
        st.dataframe(pd.DataFrame([{"time (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["created"])),
                                    "policy": a["policy_hash"][:12], "kind": a["kind"], "message": a["message"]}
                                   for a in summary["alarms"]]), hide_index=True)
    else:
        st.write("No alarm.")


live()
