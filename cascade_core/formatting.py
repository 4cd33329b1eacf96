"""Numbers as text and as JSON, one way everywhere (report, CLI, app).

NaN, inf and None are "no number": shown as "–" and written to JSON as null, so a missing value
is never printed as 0 or as "nan". Pure functions, no project imports: anything may use them.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

MISSING = "–"


def has_value(x) -> bool:
    """A value to show: not None and not a float NaN (inf still formats); what every formatter here tests."""
    return x is not None and not (isinstance(x, (float, np.floating)) and math.isnan(x))  # np.float32 too


def pct(x, digits: int = 1, signed: bool = False) -> str:
    """0.123 -> "12.3%"."""
    if not has_value(x):
        return MISSING
    return f"{x * 100:+.{digits}f}%" if signed else f"{x * 100:.{digits}f}%"


def pts(x, digits: int = 1) -> str:
    """An accuracy difference in percentage points ("0.0 pt" rather than "-0.0 pt")."""
    if not has_value(x):
        return MISSING
    value = round(x * 100, digits)
    return f"{0.0:.{digits}f} pt" if value == 0 else f"{value:+.{digits}f} pt"


def num(x, spec: str = ".3f") -> str:
    return MISSING if not has_value(x) else format(x, spec)


def ci(e: dict | None, fmt=num, **kw) -> str:
    """An estimate dict {"value", "low", "high"} as "v [lo, hi]" ("v" alone without an interval)."""
    if not e or not has_value(e.get("value")):
        return MISSING
    if not has_value(e.get("low")):
        return fmt(e["value"], **kw)
    return f"{fmt(e['value'], **kw)} [{fmt(e['low'], **kw)}, {fmt(e['high'], **kw)}]"


def pvalue(p) -> str:
    if not has_value(p):
        return MISSING
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- JSON ---------------------------------------------------------------------------------------
def json_number(x) -> float | None:
    """A float for JSON; None for NaN / inf / None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def json_estimate(e) -> dict:
    """(value, low, high) -> {"value", "low", "high"} with JSON numbers."""
    return {"value": json_number(e[0]), "low": json_number(e[1]), "high": json_number(e[2])}


def clean_json(obj):
    """Recursively turn numpy scalars/arrays into plain Python and NaN into None (JSON-safe)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [clean_json(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return json_number(obj)
    return obj
