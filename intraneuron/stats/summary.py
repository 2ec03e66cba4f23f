"""Summaries over neurons: distributions of a per-neuron statistic, fractions significant after
multiple testing. Shared by every analysis that reports a layer as a few flat metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

QUANTILES = (0.1, 0.25, 0.75, 0.9)


def distribution(values: pd.Series | np.ndarray) -> dict[str, float]:
    """mean, median, q10, q25, q75, q90 and n over the finite values (NaN when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    keys = ["mean", "median", *(f"q{round(q * 100):02d}" for q in QUANTILES)]
    if values.size == 0:
        return {**dict.fromkeys(keys, np.nan), "n": 0.0}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        **{f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES},
        "n": float(values.size),
    }


def significant_fraction(p_values: pd.Series | np.ndarray, alpha: float, bh: bool) -> float:
    """Fraction of finite p-values below alpha, after Benjamini-Hochberg across them if bh."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return np.nan
    if bh:
        p = stats.false_discovery_control(p, method="bh")
    return float(np.mean(p < alpha))
