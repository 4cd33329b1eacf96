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


SI_WORDS = ((1e12, "trillions of"), (1e9, "billions of"), (1e6, "millions of"), (1e3, "thousands of"))
STAR = ("path://M50,0 L61,35 L98,35 L68,57 L79,91 L50,70 L21,91 L32,57 L2,35 L39,35 Z")
CROSS = "path://M10,0 L50,40 L90,0 L100,10 L60,50 L100,90 L90,100 L50,60 L10,100 L0,90 L40,50 L0,10 Z"


def axis_scale(largest: float) -> tuple[float, str]:
    """A power of a thousand to divide costs by, and its words for the axis title: ECharts draws
    axis labels without a number format, so 8.7e9 FLOPs become '8.7' on an axis 'billions of FLOPs'
    instead of '8,700,000,000'."""
    for factor, words in SI_WORDS:
        if abs(largest) >= factor:
            return factor, words
    return 1.0, ""


def option_scale(option: dict) -> tuple[float, str]:
    """The factor and words the chart's cost axis is drawn in (`frontier_option`'s x axis), so that
    a cost typed by the user is read in the unit the chart shows ("billions of FLOPs" -> 1e9)."""
    name = str(option.get("xAxis", {}).get("name", ""))
    return next(((f, w) for f, w in SI_WORDS if f"({w} " in name), (1.0, ""))


def label_sides(xs: Sequence[float], x_range: tuple[float, float]) -> list[str]:
    """Where each single model's label goes: to the right of a point in the left half of the plot and
    to the left of one in the right half, so no label runs off an edge (ECharts' labelLayout then
    moves labels that would overlap apart vertically)."""
    lo, hi = x_range
    span = (hi - lo) or 1.0
    return ["right" if (float(x) - lo) / span < 0.5 else "left" for x in xs]


def _points(xs, ys, x_factor: float, rounded: bool = False) -> list[list[float]]:
    """[cost / x_factor, accuracy %] pairs; `rounded` to what a chart can show, for the many points
    of the sweep (it keeps the option sent on every change small); single points stay exact."""
    x = np.asarray(xs, dtype=float) / x_factor
    y = np.asarray(ys, dtype=float) * 100.0
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    return (np.c_[np.round(x, 5), np.round(y, 3)] if rounded else np.c_[x, y]).tolist()


def frontier_option(*, cloud: tuple[np.ndarray, np.ndarray], cloud_label: str, frontier: tuple[np.ndarray, np.ndarray],
                    singles: Sequence[dict], oracle: tuple[float, float], random_curve: tuple[np.ndarray, np.ndarray],
                    random_point: tuple[float, float], current: tuple[float, float], unit_label: str,
                    current_label: str, previous: tuple[float, float] | None = None) -> dict:
    """Accuracy versus mean cost per question, as an ECharts option for `st.echarts_chart`: every
    swept policy, the Pareto frontier, each model alone, the oracle, random routing, and the current
    operating point (drawn last and highest, with its previous position faint).

    ECharts, not Plotly, because Streamlit gives a keyed ECharts chart a stable identity and updates
    it in place, while a Plotly chart's identity hashes its figure, so every threshold change
    remounted it (most of the time a change took in a browser: docs/BENCHMARKS.md, "Explorer latency in
    a real browser").
    `aria` is on: the chart describes its series (the operating point's values included) to screen
    readers, which is also how the browser tests read the point."""
    cloud_x, cloud_y = (np.asarray(v, dtype=float) for v in cloud)
    single_x = np.array([s["cost"] for s in singles], dtype=float)
    xs = np.concatenate([cloud_x, single_x, [oracle[0], current[0]]])
    xs = xs[np.isfinite(xs)]
    factor, words = axis_scale(float(np.abs(xs).max()) if xs.size else 0.0)
    x_range = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
    sides = label_sides(single_x, x_range)

    def scatter(name, xy, size, color, z, **extra):
        return {"type": "scatter", "name": name, "data": xy, "symbolSize": size, "z": z,
                "itemStyle": {"color": color, **extra.pop("item", {})}, **extra}

    series = [
        scatter(cloud_label, _points(cloud_x, cloud_y, factor, rounded=True), 4, "#cbd5e1", 1, silent=True, large=True),
        {"type": "line", "name": "random routing", "data": _points(*random_curve, factor, rounded=True),
         "showSymbol": False,
         "lineStyle": {"color": GREY, "type": "dotted", "width": 2}, "itemStyle": {"color": GREY}, "z": 2},
        {"type": "line", "name": "Pareto frontier", "data": _points(*frontier, factor, rounded=True), "step": "end",
         "symbolSize": 5, "lineStyle": {"color": BLUE, "width": 2}, "itemStyle": {"color": BLUE}, "z": 3},
        scatter("single models", [
            {"name": s["label"], "value": _points([s["cost"]], [s["accuracy"]], factor)[0],
             "label": {"position": side},
             "itemStyle": {"color": "#ffffff", "borderColor": INK, "borderWidth": 2} if s.get("recorded") else {}}
            for s, side in zip(singles, sides) if np.isfinite(s["cost"]) and np.isfinite(s["accuracy"])],
            13, INK, 4, symbol="diamond",
            label={"show": True, "formatter": "{b}", "color": INK, "fontSize": 12, "distance": 10,
                   "backgroundColor": "rgba(255,255,255,0.8)", "padding": [2, 4]},
            labelLayout={"moveOverlap": "shiftY"}, labelLine={"show": True, "lineStyle": {"color": GREY}}),
        scatter("oracle", _points([oracle[0]], [oracle[1]], factor), 18, GREEN, 5, symbol=STAR),
        scatter("random routing at these rates", _points([random_point[0]], [random_point[1]], factor), 11, GREY, 5,
                symbol=CROSS),
    ]
    if previous is not None and tuple(previous) != tuple(current):
        series.append(scatter("previous position", _points([previous[0]], [previous[1]], factor), 16, ORANGE, 9,
                              item={"opacity": 0.3}))
    series.append(scatter(current_label, _points([current[0]], [current[1]], factor), 24, ORANGE, 10,
                          item={"borderColor": INK, "borderWidth": 2}))
    unit_words = f"{words} {unit_label}" if words else unit_label
    return {
        "animation": False,
        "aria": {"enabled": True, "data": {"maxCount": 1}},
        "grid": {"left": 56, "right": 24, "top": 40, "bottom": 96, "containLabel": False},
        "legend": {"bottom": 0},
        "tooltip": {"trigger": "item"},
        "xAxis": {"type": "value", "name": f"mean cost per question ({unit_words})", "nameLocation": "middle",
                  "nameGap": 30, "scale": True, "boundaryGap": ["6%", "6%"],
                  **({"min": 0} if x_range[0] >= 0 and x_range[0] <= 0.05 * x_range[1] else {}),
                  "splitLine": {"lineStyle": {"color": "#e2e8f0"}}},
        # the axis title above the axis, not rotated beside it: at 400 px a single model's label drawn left
        # of its point overlapped a rotated title
        "yAxis": {"type": "value", "name": "accuracy (%)", "nameLocation": "end", "nameGap": 12, "scale": True,
                  "boundaryGap": ["8%", "8%"], "splitLine": {"lineStyle": {"color": "#e2e8f0"}}},
        "series": series,
    }


def gauge(value: float, threshold: float | None, title: str, applies: bool = True) -> go.Figure:
    """A 0-1 gauge with the stage's threshold marked (dashed grey when the rule ignores it)."""
    good = threshold is None or (not math.isnan(value) and value >= threshold)
    bar = GREEN if good else ORANGE
    steps = [] if threshold is None else [dict(range=[0, threshold], color="#f1f5f9")]
    fig = go.Figure(go.Indicator(
        mode="gauge+number", value=None if math.isnan(value) else value,
        number=dict(valueformat=".2f", font=dict(color=INK)),
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
            customdata=curve["count"][filled],
            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} questions"))
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
             'edge [fontname="Helvetica", fontsize=10];',
             'question [label="question", shape=ellipse, fillcolor="#e2e8f0"];']
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
        edge_label = "escalate" if step is not None and step.decision == "escalate" else "on error"
        style = f'color="{ORANGE}", penwidth=2, label="{edge_label}"' if taken else 'color="#cbd5e1", style=dashed'
        lines.append(f"n{i} -> n{i + 1} [{style}];")
    lines.append("}")
    return "\n".join(lines)
