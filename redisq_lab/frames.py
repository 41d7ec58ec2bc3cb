"""Models to numbers and DataFrames: the one place the lab computes its statistics.

Percentiles, the server clock and the depth-by-priority sum are defined here once;
monitors, dashboards, the load generator, the demo and the benchmarks use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np

__all__ = ["QUANTILES", "percentiles"]

#: the percentiles every summary reports
QUANTILES: Final = (50, 95, 99)


def percentiles(
    values: Iterable[float | None], qs: Sequence[float] = QUANTILES
) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of the finite numbers in ``values``
    (linear interpolation, as numpy and pandas compute them); every value is None
    when there are none."""
    clean = np.array([v for v in values if v is not None and math.isfinite(v)], dtype="float64")
    if clean.size == 0:
        return {f"p{q:g}": None for q in qs}
    got = np.percentile(clean, list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, got, strict=True)}
