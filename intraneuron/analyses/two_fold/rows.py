"""Reading a layer's per-neuron rows (the columns of `neuron.ROW_KEYS`, maybe read back from a run):
a column as floats whatever it holds, which neurons a reason column left in, finite values."""

from __future__ import annotations

import numpy as np
import pandas as pd


def column(rows: pd.DataFrame, name: str) -> pd.Series:
    """rows[name] as floats (non-numbers NaN); all NaN when the column is missing."""
    if name in rows:
        return pd.to_numeric(rows[name], errors="coerce")
    return pd.Series(np.nan, index=rows.index, dtype=np.float64)


def blank(rows: pd.DataFrame, name: str) -> pd.Series:
    """True where the reason column is empty or missing (the neuron was not skipped)."""
    if name not in rows:
        return pd.Series(True, index=rows.index)
    return rows[name].fillna("").astype(str) == ""


def finite(values: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]
