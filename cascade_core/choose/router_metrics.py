"""Router metrics read off a set of (cost, accuracy) points: the paper's cost reduction at iso-
accuracy and accuracy difference, RouteLLM's APGR and RouterBench's AIQ.

`points` is (cost, accuracy) arrays or a frame with `accuracy` and one cost column (a sweep's
`frame()`, a frontier), so the metrics need no sweep or record table of their own.
"""

from __future__ import annotations

import numpy as np
import pandas

from cascade_core.choose.frontier import upper_hull
from cascade_core.cost import compute_reduction

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


def _points(points) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(points, pandas.DataFrame):
        cost_columns = [c for c in points.columns if c == "cost" or c.startswith("cost")]
        if "accuracy" not in points.columns or len(cost_columns) != 1:
            raise ValueError("a points frame needs an 'accuracy' column and exactly one cost column")
        return points[cost_columns[0]].to_numpy(float), points["accuracy"].to_numpy(float)
    cost, accuracy = points
    cost, accuracy = np.asarray(cost, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if cost.shape != accuracy.shape:
        raise ValueError(f"cost and accuracy differ in shape: {cost.shape} vs {accuracy.shape}")
    return cost, accuracy


def cheapest_at_accuracy(points, min_accuracy: float) -> int:
    """Index of the cheapest point whose accuracy >= `min_accuracy` (ties: more accurate), or -1."""
    cost, accuracy = _points(points)
    ok = np.flatnonzero(accuracy >= min_accuracy - 1e-12)
    if ok.size == 0:
        return -1
    return int(ok[np.lexsort((-accuracy[ok], cost[ok]))[0]])


def cost_reduction_at_iso_accuracy(points, ref_acc: float, ref_cost: float, tolerance: float = 0.0) -> float:
    """The paper's headline: 1 - (cost of the cheapest point with accuracy >= ref_acc - tolerance)
    / ref_cost, with the reference usually the largest model alone (Chen, Chen, Yen 2026). `points`
    is (cost, accuracy) arrays or a frame with `accuracy` and one cost column. NaN if no point
    qualifies.
    """
    index = cheapest_at_accuracy(points, ref_acc - tolerance)
    if index < 0:
        return float("nan")
    cost, _ = _points(points)
    return compute_reduction(cost[index], ref_cost)


def accuracy_difference(accuracy, reference_accuracy):
    """PD: the accuracy difference to the largest model, accuracy - reference (negative = a drop),
    as the paper reports it next to the cost reduction; its CI and McNemar test live in `stats`.
    """
    out = np.asarray(accuracy, dtype=np.float64) - float(reference_accuracy)
    return float(out) if out.ndim == 0 else out


def apgr(points, weak: tuple[float, float], strong: tuple[float, float]) -> float:
    """APGR (RouteLLM, Ong et al. 2024, `evaluate.py`): the router's area under its accuracy-vs-
    cost curve, minus the weak model's, over the strong model's minus the weak model's.

    RouteLLM's x-axis is the share of calls to the strong model; ours generalises it to the cost
    normalised as (cost - cost_weak) / (cost_strong - cost_weak). As in RouteLLM, the trapezoid
    rule runs over the given points sorted by cost, so it equals the mean performance gap
    recovered, PGR = (acc - acc_weak) / (acc_strong - acc_weak), over the points' cost range.
    `weak` and `strong` are (cost, accuracy); pass a curve (e.g. a frontier), at least 2 points.
    """
    cost, accuracy = _points(points)
    (cost_w, acc_w), (cost_s, acc_s) = weak, strong
    if acc_s == acc_w:
        raise ValueError("APGR is undefined when the strong and the weak model are equally accurate")
    if cost_s == cost_w:
        raise ValueError("APGR needs the strong and the weak model to differ in cost")
    if len(cost) < 2:
        raise ValueError("APGR needs a curve of at least 2 points")
    order = np.argsort(cost, kind="stable")
    x = (cost[order] - cost_w) / (cost_s - cost_w)
    if x[-1] == x[0]:
        raise ValueError("APGR needs points that differ in cost")
    pgr = (accuracy[order] - acc_w) / (acc_s - acc_w)
    return float(_trapezoid(pgr, x) / (x[-1] - x[0]))


def aiq(points, cost_range: tuple[float, float] | None = None) -> float:
    """AIQ (RouterBench, Hu et al. 2024): area under the non-decreasing convex hull of the
    (cost, accuracy) points, divided by the cost range, i.e. 1/(c_max - c_min) * integral of the
    hull over [c_min, c_max]. Beyond its last point the hull stays flat (RouterBench extends it to
    c_max); before its first point it counts 0. Default range: the points' own min and max cost.
    """
    cost, accuracy = _points(points)
    x, y = upper_hull(cost, accuracy)
    if len(x) == 0:
        raise ValueError("AIQ needs at least one finite point")
    finite = cost[np.isfinite(cost)]
    lo, hi = (float(finite.min()), float(finite.max())) if cost_range is None else map(float, cost_range)
    if not hi > lo:
        raise ValueError(f"AIQ needs a cost range with max > min, got [{lo}, {hi}]")
    start = max(lo, float(x[0]))
    if start >= hi:
        return 0.0
    xs = np.concatenate([[start], x[(x > start) & (x < hi)], [hi]])
    ys = np.interp(xs, x, y)  # flat beyond the last hull point
    return float(_trapezoid(ys, xs) / (hi - lo))
