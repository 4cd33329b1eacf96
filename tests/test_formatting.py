"""formatting: a missing number is "–" whatever its type (a numpy float32 NaN included)."""

from __future__ import annotations

import numpy as np

from cascade_core.formatting import MISSING, ci, has_value, num, pct, pts, pvalue


def test_nan_of_any_float_type_is_missing():
    for nan in (float("nan"), np.float64("nan"), np.float32("nan"), np.float16("nan"), None):
        assert not has_value(nan)
        assert pct(nan) == num(nan) == pts(nan) == pvalue(nan) == ci({"value": nan}) == MISSING
    assert pct(np.float32(0.5)) == "50.0%" and num(np.inf) == "inf" and has_value(0.0)
