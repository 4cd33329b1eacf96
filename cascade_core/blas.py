"""Cap BLAS threads around numeric work.

On a 2-core machine shared with a model run, two BLAS threads fight over the cores: a threshold
sweep and probe fitting ran several times slower than with one thread (docs/BENCHMARKS.md,
"Replay and threshold sweep").
"""

from __future__ import annotations

import contextlib


def blas_threads(limit: int | None):
    """A context that caps BLAS threads (threadpoolctl ships with scikit-learn); no-op for None."""
    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn always brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")
