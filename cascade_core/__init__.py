"""Confidence-driven cascade of small-to-large models (Chen, Chen, Yen 2026, arXiv 2602.22090).

Pure functions over arrays: signals (P(T)), probes (P(IK)), routing policy, the live cascade,
offline replay, the Pareto frontier and statistics. Model I/O lives in the `models` package.
"""

__version__ = "0.1.0"
