"""p values beyond the reach of the permutations: a generalized Pareto fit to the null's upper tail
(Knijnenburg et al. 2009, Bioinformatics 25:i161), used when fewer than 10 null draws reach the
observed statistic even at the largest permutation budget.

Accuracy (measured, 40 null samples of 100,000 standard-normal draws, 250 exceedances): the
median ratio of fitted to true tail is 1.07 at z = 4.0 (true p 3e-5), 0.91 at 4.5, 0.50 at 5.0,
0.18 at 5.5, 0.02 at 6.0; within a factor 3 in 93%, 68%, 40%, 15%, 5% of the samples. A fit
extrapolates about one decade below 1/P well, and no further; for BH over a layer of 1,536 neurons
that decade is what matters (a neuron is rejected once its p is below ~3e-5), not the digits of
a p of 1e-9, which are not to be read as such.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

TAIL_MAX = 250  # exceedances fitted at most (Knijnenburg et al.: 250, fewer if the fit is poor)
TAIL_FRACTION = 0.1  # and at most this share of the null
TAIL_MIN = 50  # below this many exceedances a fit is not trusted
TAIL_STEP = 10  # exceedances dropped per refit when the fit is poor
GOF_LEVEL = 0.05  # Cramer-von Mises goodness-of-fit p below which a fit is refused


@dataclass(frozen=True)
class TailFit:
    """p: the tail p value (NaN when no acceptable fit); shape, scale: the GPD's (scipy's c is the
    shape); threshold: where the tail starts; n_exceed: null values fitted; gof_p: Cramer-von Mises p;
    n_null: the finite null values the fit was drawn from (0 when unknown)."""

    p: float
    shape: float
    scale: float
    threshold: float
    n_exceed: int
    gof_p: float
    n_null: int = 0

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.p) and self.p > 0)

    def tail_p(self, observed: np.ndarray | float) -> np.ndarray:
        """P(null >= observed) = (n_exceed / n_null) * (1 - F(observed - threshold)) for each
        observed value beyond the threshold; NaN elsewhere, without a fit, or where the GPD puts
        observed beyond its upper end point (p = 0 would claim more than the data show)."""
        observed = np.asarray(observed, dtype=np.float64)
        if not (np.isfinite(self.scale) and self.n_null > 0):
            return np.full(observed.shape, np.nan)
        tail = stats.genpareto.sf(observed - self.threshold, self.shape, 0.0, self.scale)
        p = self.n_exceed / self.n_null * tail
        return np.where((observed > self.threshold) & (p > 0), p, np.nan)


_FAILED = TailFit(np.nan, np.nan, np.nan, np.nan, 0, np.nan)


def gpd_tail_p(null: np.ndarray, observed: float) -> TailFit:
    """P(null >= observed) from the GPD of `gpd_tail_fit(null)`: p = (N_exc / P) *
    (1 - F(observed - threshold)); NaN when no fit is accepted, the optimiser fails, or observed
    lies at or below the threshold or beyond the fitted upper end point."""
    if not np.isfinite(observed):
        return _FAILED
    fit = gpd_tail_fit(null)
    p = float(fit.tail_p(observed))
    return TailFit(p, fit.shape, fit.scale, fit.threshold, fit.n_exceed, fit.gof_p, fit.n_null) if np.isfinite(p) else _FAILED


def gpd_tail_fit(null: np.ndarray) -> TailFit:
    """A GPD fitted to the top min(250, 10% of P) null values, with the location fixed at the
    threshold halfway between the last fitted value and the next one (p NaN: `tail_p` evaluates
    it, for many observed values at once).

    When the Cramer-von Mises test refuses the fit (p < 0.05), 10 fewer exceedances are fitted, down
    to 50 (Knijnenburg et al. use Anderson-Darling; scipy has no such test for a fitted GPD). The
    fitted parameters make the test lenient, so it only catches gross misfits. No fit (all NaN):
    fewer than 50 exceedances, no accepted fit, or a failed optimiser.
    """
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    n_exceed = int(min(TAIL_MAX, np.floor(TAIL_FRACTION * null.size)))
    if n_exceed < TAIL_MIN:
        return _FAILED
    top = -np.sort(-null)[: n_exceed + 1]  # [n_exceed + 1] largest first
    while n_exceed >= TAIL_MIN:
        threshold = 0.5 * (top[n_exceed - 1] + top[n_exceed])
        excess = top[:n_exceed] - threshold  # all > 0 unless tied with the next value
        if np.ptp(excess) > 0:
            fit = _fit(excess)
            if fit is not None and fit[2] >= GOF_LEVEL:
                shape, scale, gof = fit
                return TailFit(np.nan, shape, scale, float(threshold), n_exceed, gof, int(null.size))
        n_exceed -= TAIL_STEP
    return _FAILED


def _fit(excess: np.ndarray) -> tuple[float, float, float] | None:
    """(shape, scale, Cramer-von Mises p) of a GPD with location 0, or None if the fit fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
            if not (np.isfinite(shape) and np.isfinite(scale) and scale > 0):
                return None
            gof = stats.cramervonmises(excess, stats.genpareto(shape, 0.0, scale).cdf).pvalue
    except (ValueError, RuntimeError, FloatingPointError):
        return None
    return float(shape), float(scale), float(gof)
