"""One-sided p values of observations against a sample of null draws (e.g. a layer's pseudo-neurons),
and each draw against the others: the null's own calibration.

p = (1 + #{draws >= x}) / (1 + R), ties counted as in the permutation tests, so a value on an
atom of the null (ARI 0 shared by many draws, a bounded statistic at its bound) gets at least the
atom's mass. Where fewer than MIN_EXCEEDANCES draws reach x and none ties it, the generalized
Pareto fit to the draws' upper tail (`tail.gpd_tail_fit`, Knijnenburg et al. 2009) gives p when
it is accepted (it needs R >= 500: 50 exceedances, 10% of the draws), never less than the share
of draws that reach x (c / (1 + R): a gap below an atom is no tail); otherwise the empirical p
stands, floored at 1 / (1 + R). Never a normal curve: the nulls this serves are skewed, bounded
and zero-inflated.

Matching on a covariate (keys: one per draw and per observation, e.g. selectivity): each
observation is compared with the k draws around its key among the draws sorted by key (k / 2 below,
k / 2 above, give or take k / 32; at the ends the k lowest or highest), each moved along the least-squares line of value
on key over those k to the observation's own key (x_j + b (key - key_j)). The window makes the
null local; the shift removes the trend left within it, which matters at the ends of the range,
where an observation sits at the edge of its window (or beyond the draws: the line extrapolates).
Ties are counted on the values before the shift, so atoms keep their mass.

Leave-one-out (`leave_one_out_p`): each draw against the k others around it (all others without
matching) by the same procedure. For exchangeable draws these p are uniform, so the share below a
level, or discovered by BH, measures what the procedure gives on pure null data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from intraneuron.stats.permutation import TIE_TOLERANCE
from intraneuron.stats.tail import TailFit, gpd_tail_fit

MIN_EXCEEDANCES = 10  # below this many draws at or above x, the tail fit replaces the count
WINDOW_GRID = 16  # an observation's window starts on a grid of k / 16 draws (not for leave-one-out)
_CHUNK = 256  # observations per gathered [chunk, window] block


class NullComparison(NamedTuple):
    """p [n]: one-sided (observed above the null); median [n]: the median of the (shifted) draws
    each observation was compared with; n_null: how many draws that was (the same for every one)."""

    p: np.ndarray
    median: np.ndarray
    n_null: int


def upper_p(
    null: np.ndarray, observed: np.ndarray, *, null_key: np.ndarray | None = None,
    key: np.ndarray | None = None, k: int | None = None,
) -> NullComparison:  # fmt: skip
    """Each observed value [n] against the finite draws of null [R]; with null_key [R] and key [n],
    matched on the key: the k draws nearest in key (all of them when k is None or >= R), shifted
    along their trend to the observation's key. No matching when a key of a finite draw or
    observation is not finite. NaN observations get NaN."""
    null, null_key = _finite_draws(null, null_key)
    observed = np.asarray(observed, dtype=np.float64)
    if key is not None:
        key = np.where(np.isfinite(observed), np.asarray(key, dtype=np.float64), 0.0)
    if key is None or not np.isfinite(key).all():
        null_key = None
    values, sorted_keys = _arranged(null, null_key)
    size = values.size if k is None or sorted_keys is None else min(int(k), values.size)
    lo = np.zeros(observed.size, dtype=np.intp)
    if sorted_keys is not None and size < values.size:
        # windows start on a grid of k / 16 draws, so that observations share their tail fits
        step = max(1, size // WINDOW_GRID)
        first = np.round((np.searchsorted(sorted_keys, key) - size // 2) / step).astype(np.intp) * step
        lo = np.clip(first, 0, values.size - size)
    return _compare(values, sorted_keys, lo, size, observed, key, own=None)


def leave_one_out_p(null: np.ndarray, *, null_key: np.ndarray | None = None, k: int | None = None) -> np.ndarray:
    """Each finite draw of null [R] against the other draws (the k nearest in null_key with
    matching), as `upper_p` would judge a new observation; p [R] (NaN for NaN draws)."""
    null = np.asarray(null, dtype=np.float64)
    p = np.full(null.size, np.nan)
    draws, draw_keys = _finite_draws(null, null_key)
    if draws.size < 2:
        return p
    values, sorted_keys = _arranged(draws, draw_keys)
    others = draws.size - 1 if k is None or sorted_keys is None else min(int(k), draws.size - 1)
    own = np.arange(draws.size)  # each draw's position among the arranged values
    lo = np.clip(own - others // 2, 0, draws.size - (others + 1))  # its window: itself and the others
    found = _compare(values, sorted_keys, lo, others + 1, values, sorted_keys, own=own).p
    order = np.argsort(draw_keys, kind="stable") if sorted_keys is not None else own
    p[np.flatnonzero(np.isfinite(null))[order]] = found
    return p


def _finite_draws(null, null_key) -> tuple[np.ndarray, np.ndarray | None]:
    null = np.asarray(null, dtype=np.float64)
    keep = np.isfinite(null)
    return null[keep], (None if null_key is None else np.asarray(null_key, dtype=np.float64)[keep])


def _arranged(null, null_key) -> tuple[np.ndarray, np.ndarray | None]:
    """(draws [R] sorted by key, their sorted keys), or (draws, None) when a key is missing."""
    if null_key is None or not np.isfinite(null_key).all():
        return null, None
    order = np.argsort(null_key, kind="stable")
    return null[order], null_key[order]


def _compare(values, keys, lo, size, observed, obs_key, own) -> NullComparison:
    """p and median of each observed [n] against values[lo : lo + size] (without values[own] when
    own is given: the observation is that draw), shifted along their key trend when keys are given.

    Shifting draw j to the observation's key, x_j + b (key - key_j), and comparing with x is
    comparing the window's detrended draws r_j = x_j - b (key_j - mean key) with the detrended
    observation x - b (key - mean key): r depends on the window alone, so observations that share a
    window share its tail fit."""
    n = observed.size
    n_null = size - (own is not None)
    p, median = np.full(n, np.nan), np.full(n, np.nan)
    offsets = np.arange(size)
    fits: dict[tuple[int, int], TailFit] = {}
    for start in range(0, n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n))
        idx = lo[rows, None] + offsets  # [chunk, size]
        raw = values[idx]
        if own is not None:
            raw[idx == own[rows, None]] = np.nan  # the draw itself is not its own null
        x = observed[rows]
        if keys is None:
            null, y = raw, x
        else:
            null, y = _detrended(raw, keys[idx], x, obs_key[rows])  # [chunk, size], [chunk]
        tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(np.nan_to_num(x)))[:, None]
        tie = np.abs(raw - x[:, None]) <= tol
        at_or_above = np.sum((null >= y[:, None] - tol) | tie, axis=1)
        median[rows] = np.nanmedian(null, axis=1) + (x - y)
        p[rows] = (1.0 + at_or_above) / (1.0 + n_null)
        beyond = np.isfinite(x) & (at_or_above < MIN_EXCEEDANCES) & (tie.sum(axis=1) == 0)
        for j in np.flatnonzero(beyond):
            window = (int(lo[rows[j]]), -1 if own is None else int(own[rows[j]]))
            if window not in fits:
                fits[window] = gpd_tail_fit(null[j][np.isfinite(null[j])])
            tail = fits[window].tail_p(y[j])
            if np.isfinite(tail):  # never below the share of draws that do reach x (an atom in the tail)
                p[rows[j]] = max(float(tail), at_or_above[j] / (1.0 + n_null))
    p[~np.isfinite(observed)] = np.nan
    return NullComparison(p, median, int(n_null))


def _detrended(raw: np.ndarray, keys: np.ndarray, x: np.ndarray, to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw [c, size] - b (keys - mean key), x [c] - b (to - mean key)): the draws and the
    observation of each row with the row's least-squares line of value on key taken out (slope b
    [c] over the row's finite draws; 0 when its keys do not vary)."""
    keys = np.where(np.isnan(raw), np.nan, keys)
    centre = np.nanmean(keys, axis=1, keepdims=True)  # [c, 1]
    ds = keys - centre
    dx = raw - np.nanmean(raw, axis=1, keepdims=True)
    spread = np.nansum(ds * ds, axis=1)
    slope = np.divide(np.nansum(ds * dx, axis=1), spread, out=np.zeros_like(spread), where=spread > 0)
    return raw - slope[:, None] * ds, x - slope * (to - centre[:, 0])
