"""Bootstrap intervals over windows for the ablation effects (percentile, seeded).

Tokens of one window share a context, so they are not independent draws: the unit resampled is the
window. Each replicate draws W of the W windows with replacement; every summary of
`effects.summarise` (means over tokens, the mediated shares, which are ratios of sums) is recomputed
from the per-window sums the effects pass keeps, `counts @ window_sums`, so no model is rerun and
R replicates cost one [R, W] x [W, m] product per summed quantity.

    window_replicates(effects, n_boot, seed)          -> name -> [R, m] summaries per replicate
    interval_columns(replicates, names)               -> {<name>_lo, <name>_hi: [m]}
    median_intervals(replicates, rows, prefix, names) -> {<prefix>/<name>/median_lo, ..._hi}
"""

from __future__ import annotations

import warnings

import numpy as np

from intraneuron.analyses.confidence.effects import NeuronEffects, summarise

LEVEL = 0.95
# the effects with intervals: the norm-mediated shares and the entropy changes
INTERVAL_OF = ("ln_mediated", "freq_mediated", "mean_dentropy_te", "mean_dentropy_de", "mean_abs_dentropy_te")


def resample_counts(n_windows: int, n_boot: int, seed) -> np.ndarray:
    """[R, W]: how often each window is drawn in each replicate (W draws with replacement)."""
    draws = np.random.default_rng(seed).integers(0, n_windows, size=(n_boot, n_windows))  # [R, W]
    offsets = np.arange(n_boot)[:, None] * n_windows
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_windows).reshape(n_boot, n_windows)


def window_replicates(effects: NeuronEffects, n_boot: int, seed) -> dict[str, np.ndarray]:
    """Every summary of `effects` on `n_boot` resamples of its windows: name -> [R, m]. A
    replicate that draws no counted token gives NaN (as does a 0/0 share)."""
    tokens = effects.window_tokens.double().numpy()  # [W]
    counts = resample_counts(tokens.size, n_boot, seed).astype(np.float64)  # [R, W]
    sums = {k: counts @ v.numpy().T for k, v in effects.window_sums.items()}  # [R, m]
    with np.errstate(divide="ignore", invalid="ignore"):
        return summarise(sums, (counts @ tokens)[:, None])


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """values [R, ...] -> (lo, hi) [...]: the (1 - level) / 2 and (1 + level) / 2 quantiles over the
    finite replicates (NaN where none is finite)."""
    tail = (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN columns (a neuron with no loss effect) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(_finite(values), [tail, 1 - tail], axis=0)
    return lo, hi


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def interval_columns(replicates: dict[str, np.ndarray], names=INTERVAL_OF) -> dict[str, np.ndarray]:
    """Per neuron: <name>_lo and <name>_hi [m] for each of `names` the replicates have."""
    out = {}
    for name in names:
        if name in replicates:
            out[f"{name}_lo"], out[f"{name}_hi"] = percentile_interval(replicates[name])
    return out


def median_intervals(replicates: dict[str, np.ndarray], rows: np.ndarray, prefix: str,
                     names=INTERVAL_OF) -> dict[str, float]:  # fmt: skip
    """The interval of the median over the neurons `rows` (column indices into the replicates),
    each replicate's median taken over the same resample of windows: layer metrics
    <prefix>/<name>/median_lo and _hi."""
    out: dict[str, float] = {}
    if rows.size == 0:
        return out
    for name in names:
        if name in replicates:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                medians = np.nanmedian(_finite(replicates[name][:, rows]), axis=1)  # [R]
            lo, hi = percentile_interval(medians)
            out[f"{prefix}/{name}/median_lo"], out[f"{prefix}/{name}/median_hi"] = float(lo), float(hi)
    return out
