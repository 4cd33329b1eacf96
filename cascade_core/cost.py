"""The cost model: what one stage's answer to one question costs, in each unit we report.

One place for the formulas so that the benchmark records, the live cascade and the replay price
a question the same way. Units:

- ``flops``:   2 x non-embedding parameters x tokens processed (prompt + output), the usual
               forward-pass estimate (Kaplan et al. 2020); embeddings are a lookup, not a matmul.
- ``tokens``:  prompt + output tokens processed.
- ``dollars``: tokens_in x price_in / 1e6 + tokens_out x price_out / 1e6 (per-million prices).
- ``seconds``: measured wall time.
- ``calls``:   model (or API) calls, i.e. stages visited.

A cascade pays every stage it visits, so its cost on a question is the sum over those stages.
"""

from __future__ import annotations

import numpy as np

COST_UNITS: tuple[str, ...] = ("flops", "tokens", "dollars", "seconds", "calls")


def check_unit(unit: str) -> str:
    """`unit` itself, or a ValueError listing the units there are."""
    if unit not in COST_UNITS:
        raise ValueError(f"unknown cost unit {unit!r}; units: {', '.join(COST_UNITS)}")
    return unit


def flops(non_embedding_params, tokens):
    """Forward-pass FLOPs: 2 x non-embedding parameters x tokens processed (scalar or array)."""
    return 2.0 * np.asarray(non_embedding_params, dtype=np.float64) * np.asarray(tokens, dtype=np.float64)


def dollars(tokens_in, tokens_out, price_in: float, price_out: float):
    """API price of a call: prices are dollars per million input / output tokens."""
    if price_in < 0 or price_out < 0:
        raise ValueError(f"prices must be >= 0 dollars per million tokens, got {price_in}, {price_out}")
    tokens_in = np.asarray(tokens_in, dtype=np.float64)
    tokens_out = np.asarray(tokens_out, dtype=np.float64)
    return tokens_in * (price_in / 1e6) + tokens_out * (price_out / 1e6)


def compute_reduction(cascade_cost, reference_cost):
    """1 - cost(cascade) / cost(reference): the share of the reference's cost the cascade saves.

    Both costs must be on the same questions (totals or means alike). NaN where the reference
    costs nothing (e.g. dollars of a local model): there is nothing to reduce.
    """
    cascade_cost = np.asarray(cascade_cost, dtype=np.float64)
    reference_cost = np.asarray(reference_cost, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(reference_cost > 0, 1.0 - cascade_cost / np.where(reference_cost > 0, reference_cost, 1.0),
                       np.nan)
    return float(out) if out.ndim == 0 else out
