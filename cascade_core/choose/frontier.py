"""The Pareto frontier of (cost, accuracy) points and its upper convex hull.

Its own module because the sweep (`sweep.SweepResult.frontier`), the router metrics
(`router_metrics.aiq`) and the report all read it, and it needs nothing but numpy.
"""

from __future__ import annotations

import numpy as np


def pareto_frontier(cost, accuracy) -> np.ndarray:
    """Indices of the non-dominated points (no other point is as cheap and as accurate, one
    strictly), sorted by cost. Of identical points only the first is kept; NaN points are skipped.
    """
    cost = np.asarray(cost, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if cost.shape != accuracy.shape or cost.ndim != 1:
        raise ValueError(f"cost and accuracy must be 1-D arrays of one length, got {cost.shape} and {accuracy.shape}")
    valid = np.flatnonzero(np.isfinite(cost) & np.isfinite(accuracy))
    order = valid[np.lexsort((valid, -accuracy[valid], cost[valid]))]
    acc_sorted = accuracy[order]
    best_before = np.concatenate([[-np.inf], np.maximum.accumulate(acc_sorted)[:-1]])
    return order[acc_sorted > best_before]


def upper_hull(cost, accuracy) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing concave (convex-hull) envelope of (cost, accuracy) points, by cost.

    Any point on it is reachable by mixing two policies at random, which is why RouterBench's AIQ
    integrates it rather than the raw points.
    """
    front = pareto_frontier(cost, accuracy)
    x = np.asarray(cost, dtype=np.float64)[front]
    y = np.asarray(accuracy, dtype=np.float64)[front]
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (x[a] - x[o]) * (y[i] - y[o]) - (y[a] - y[o]) * (x[i] - x[o])
            if cross >= 0:  # a lies on or under the chord o -> i
                hull.pop()
            else:
                break
        hull.append(i)
    return x[hull], y[hull]
