"""Multiple testing over a layer's neurons: the share of true nulls (Storey's pi0), reported beside
every Benjamini-Hochberg fraction so that "few rejections" can be told from "no effect"."""

from __future__ import annotations

import numpy as np
import pandas as pd

STOREY_LAMBDA = 0.5


def storey_pi0(p_values: pd.Series | np.ndarray, lam: float = STOREY_LAMBDA) -> float:
    """pi0 = #{p > lam} / (m (1 - lam)), capped at 1, over the finite p values (NaN if none).

    Storey (2002): p values above lam come mostly from true nulls, which are uniform there.
    """
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must lie in (0, 1), got {lam}")
    p = np.asarray(p_values, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return np.nan
    return float(min(1.0, np.sum(p > lam) / (p.size * (1.0 - lam))))
