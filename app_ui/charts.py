"""Plotly figures and the routing-path picture. They draw numbers computed elsewhere."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from cascade_core.types import StageStep

BLUE, GREEN, ORANGE, GREY, RED, INK = "#2563eb", "#16a34a", "#ea580c", "#94a3b8", "#dc2626", "#0f172a"
_LAYOUT = dict(template="plotly_white", margin=dict(l=10, r=10, t=40, b=10), font=dict(size=13))


def fmt_number(value: float, digits: int = 3) -> str:
    """Compact engineering format (1.2e+11 -> '120G'), '–' for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def label_offsets(xs: Sequence[float], ys: Sequence[float], x_range: tuple[float, float]) -> list[tuple[int, int]]:
    """Pixel offsets (ax, ay) for the single models' labels: pointing inwards (a point in the left
    half gets its label to the right, so none is cut at an edge), and points close in cost
    stacked at different heights, so labels at the same cost (e.g. every local model in tokens)
    do not overlap."""
    lo, hi = x_range
    span = (hi - lo) or 1.0
    order = np.argsort(np.asarray(ys, dtype=float), kind="stable")
    out: list[tuple[int, int]] = [(0, 0)] * len(xs)
    placed: list[tuple[float, int]] = []
    for i in order:
        rel = (float(xs[i]) - lo) / span
        ax = 46 if rel < 0.5 else -46
        near = [ay for x, ay in placed if abs(x - rel) < 0.22]
        ay = -26
        while any(abs(ay - other) < 24 for other in near):
            ay = -ay if ay < 0 else -(ay + 24)
        placed.append((rel, ay))
        out[i] = (ax, ay)
    return out


def frontier_figure(*, cloud: tuple[np.ndarray, np.ndarray], cloud_label: str, frontier: tuple[np.ndarray, np.ndarray],
                    singles: Sequence[dict], oracle: tuple[float, float], random_curve: tuple[np.ndarray, np.ndarray],
                    random_point: tuple[float, float], current: tuple[float, float], unit_label: str,
                    current_label: str, previous: tuple[float, float] | None = None) -> go.Figure:
    """Accuracy versus mean cost per question: every swept policy, the Pareto frontier, each model
    alone, the oracle, random routing, and the current operating point (with its previous position
    faint). The cloud is WebGL, which Plotly paints above every SVG trace, so the operating point is
    WebGL too and added last: it stays on top of the cloud."""
    fig = go.Figure()
    cloud_x, cloud_y = cloud
    fig.add_trace(go.Scattergl(x=cloud_x, y=cloud_y, mode="markers", name=cloud_label,
                               marker=dict(size=4, color="#cbd5e1"), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=random_curve[0], y=random_curve[1], mode="lines", name="random routing",
                             line=dict(color=GREY, dash="dot")))
    fig.add_trace(go.Scatter(x=frontier[0], y=frontier[1], mode="lines+markers", name="Pareto frontier",
                             line=dict(color=BLUE, shape="hv"), marker=dict(size=5)))
    fig.add_trace(go.Scattergl(
        x=[s["cost"] for s in singles], y=[s["accuracy"] for s in singles], mode="markers",
        name="single models", text=[s["label"] for s in singles], hovertemplate="%{text}<extra></extra>",
        marker=dict(size=12, color=INK, symbol=["diamond-open" if s.get("recorded") else "diamond" for s in singles])))
    fig.add_trace(go.Scattergl(x=[oracle[0]], y=[oracle[1]], mode="markers", name="oracle",
                               marker=dict(size=14, color=GREEN, symbol="star")))
    fig.add_trace(go.Scattergl(x=[random_point[0]], y=[random_point[1]], mode="markers",
                               name="random routing at these rates", marker=dict(size=10, color=GREY, symbol="x")))
    if previous is not None and tuple(previous) != tuple(current):
        fig.add_trace(go.Scattergl(x=[previous[0]], y=[previous[1]], mode="markers", name="previous position",
                                   marker=dict(size=16, color=ORANGE, opacity=0.3)))
    fig.add_trace(go.Scattergl(x=[current[0]], y=[current[1]], mode="markers", name=current_label,
                               marker=dict(size=24, color=ORANGE, line=dict(color=INK, width=2))))
    xs = np.concatenate([np.ravel(cloud_x), [s["cost"] for s in singles], [oracle[0], current[0]]]).astype(float)
    ys = np.concatenate([np.ravel(cloud_y), [s["accuracy"] for s in singles], [oracle[1], current[1]]]).astype(float)
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    x_pad = max(0.08 * (xs.max() - xs.min()), 0.05 * abs(xs.max()), 1e-12) if xs.size else 1.0
    y_pad = max(0.08 * (ys.max() - ys.min()), 0.03) if ys.size else 0.1
    x_range = (xs.min() - x_pad, xs.max() + x_pad) if xs.size else (0.0, 1.0)
    offsets = label_offsets([s["cost"] for s in singles], [s["accuracy"] for s in singles], x_range)
    for s, (ax, ay) in zip(singles, offsets):
        fig.add_annotation(x=s["cost"], y=s["accuracy"], text=s["label"], ax=ax, ay=ay, showarrow=True,
                           arrowhead=0, arrowcolor=GREY, standoff=6, font=dict(size=12, color=INK),
                           xanchor="left" if ax > 0 else "right", bgcolor="rgba(255,255,255,0.8)")
    fig.update_layout(**_LAYOUT, height=480, legend=dict(orientation="h", y=-0.18), uirevision="frontier",
                      xaxis=dict(title=f"mean cost per question ({unit_label})", tickformat="~s",
                                 range=list(x_range) if xs.size else None),
                      yaxis=dict(title="accuracy", tickformat=".0%",
                                 range=[max(0.0, ys.min() - y_pad), min(1.0, ys.max() + y_pad)] if ys.size else [0, 1]))
    return fig


def gauge(value: float, threshold: float | None, title: str, applies: bool = True) -> go.Figure:
    """A 0-1 gauge with the stage's threshold marked (dashed grey when the rule ignores it)."""
    good = threshold is None or (not math.isnan(value) and value >= threshold)
    bar = GREEN if good else ORANGE
    steps = [] if threshold is None else [dict(range=[0, threshold], color="#f1f5f9")]
    fig = go.Figure(go.Indicator(
        mode="gauge+number", value=None if math.isnan(value) else value, number=dict(valueformat=".2f", font=dict(color=INK)),
        title=dict(text=title, font=dict(size=14)),
        gauge=dict(axis=dict(range=[0, 1], tickvals=[0, 0.25, 0.5, 0.75, 1]), bar=dict(color=bar), steps=steps,
                   threshold=None if threshold is None else dict(
                       line=dict(color=INK if applies else GREY, width=4), thickness=0.85, value=threshold)),
    ))
    fig.update_layout(template="plotly_white", height=190, margin=dict(l=25, r=25, t=45, b=5))
    return fig


def reliability_figure(curves: dict[str, dict], signal_label: str) -> go.Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration, one line per stage."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                             line=dict(color=GREY, dash="dash")))
    for name, item in curves.items():
        curve = item["curve"]
        filled = curve["count"] > 0
        fig.add_trace(go.Scatter(
            x=curve["mean_confidence"][filled], y=curve["accuracy"][filled], mode="lines+markers",
            name=f"{name} (ECE {item['ece']:.3f}, AUROC {item['auroc']:.3f})",
            customdata=curve["count"][filled], hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} questions"))
    fig.update_layout(**_LAYOUT, height=420, xaxis=dict(range=[0, 1], title=f"mean {signal_label} in bin"),
                      yaxis=dict(range=[0, 1], title="accuracy in bin"), legend=dict(orientation="h", y=-0.2))
    return fig


def subject_heatmap(frame, stages: Sequence[str]) -> go.Figure:
    """Subjects x stages accuracy (a frame from ui_data.per_subject_accuracy)."""
    values = frame[list(stages)].to_numpy()
    fig = go.Figure(go.Heatmap(z=values, x=list(stages), y=list(frame.index), zmin=0, zmax=1, colorscale="Blues",
                               colorbar=dict(title="accuracy"),
                               hovertemplate="%{y}<br>%{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(360, 17 * len(frame) + 80), yaxis=dict(autorange="reversed"))
    return fig


def _dot_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def routing_path_dot(stages: Sequence[tuple[str, str]], steps: Sequence[StageStep]) -> str:
    """Graphviz DOT of the cascade: visited stages filled, the answering stage highlighted in green,
    failed stages red, stages never reached dashed grey; arrows carry the decision."""
    by_name = {s.stage: s for s in steps}
    lines = ["digraph cascade {", "rankdir=LR;", 'bgcolor="transparent";',
             'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=12];',
             'edge [fontname="Helvetica", fontsize=10];', 'question [label="question", shape=ellipse, fillcolor="#e2e8f0"];']
    for i, (name, label) in enumerate(stages):
        step = by_name.get(name)
        if step is None:
            attrs = 'fillcolor="#ffffff", color="#94a3b8", fontcolor="#94a3b8", style="rounded,dashed"'
            text = f"{label}\nnot reached"
        elif step.decision in ("keep", "final"):
            attrs = f'fillcolor="#dcfce7", color="{GREEN}", penwidth=3'
            short = (step.answer or "").strip().replace("\n", " ")
            text = f"{label}\nanswered {short[:18] + '…' if len(short) > 18 else short}"
        elif step.decision == "error":
            attrs = f'fillcolor="#fee2e2", color="{RED}"'
            text = f"{label}\nfailed"
        else:
            attrs = 'fillcolor="#ffedd5", color="#ea580c"'
            text = f"{label}\nescalated"
        lines.append(f'n{i} [label="{_dot_label(text)}", {attrs}];')
    lines.append('question -> n0 [label=""];')
    for i in range(len(stages) - 1):
        step = by_name.get(stages[i][0])
        taken = step is not None and step.decision in ("escalate", "error")
        style = f'color="{ORANGE}", penwidth=2, label="{"escalate" if step is not None and step.decision == "escalate" else "on error"}"' if taken else 'color="#cbd5e1", style=dashed'
        lines.append(f"n{i} -> n{i + 1} [{style}];")
    lines.append("}")
    return "\n".join(lines)
