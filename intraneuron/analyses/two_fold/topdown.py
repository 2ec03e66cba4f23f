"""Steps 4-6 (top-down): activation by category, differentiation between categories, interleaving.

The paper names the phenomena ("activation differentiation", "activation interleaving") but not the
statistics: Kruskal-Wallis / ANOVA omnibus tests, pairwise Mann-Whitney with Holm correction,
Cliff's delta, the differentiation rate D, range/IQR overlaps and rank interleaving are our
defaults, not the paper's (paper_methods.md 1.4, steps 5-6). Overlap and interleaving are read
against their permutation null (`interleaving_overlap_null`): activations independent of the
categories already give overlaps near 1 and interleaving near 0.45. Labels -1 (uncovered tokens)
are dropped everywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from intraneuron.analyses.two_fold.category_tables import (
    _pair_columns,
    category_stats,
    category_table,
    drop_uncovered,
    holm_adjust,
    pairwise_mann_whitney,
    pairwise_table,
    range_overlap,
)
from intraneuron.analyses.two_fold.interleaving import (
    NULL_KEYS,
    _interleaving_overlap_null_loop,
    interleaving_overlap_null,
)
from intraneuron.errors import ConfigError

# Public names, with those that live in `category_tables` and `interleaving` (and its slow reference).
__all__ = [
    "NULL_KEYS", "TopDownResult", "_interleaving_overlap_null_loop", "category_stats",
    "category_table", "drop_uncovered", "holm_adjust", "interleaving_overlap_null",
    "kruskal_epsilon2", "level_relation", "omnibus_tests", "pairwise_mann_whitney",
    "pairwise_table", "range_overlap", "top_down",
]  # fmt: skip


@dataclass(frozen=True)
class TopDownResult:
    """categories: one row per category; pairs: one row per category pair; summary: flat scalars."""

    categories: pd.DataFrame
    pairs: pd.DataFrame
    summary: dict[str, float] = field(default_factory=dict)


def omnibus_tests(acts: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Kruskal-Wallis H, p and epsilon^2 = (H - K + 1)/(N - K); one-way ANOVA F, p and eta^2."""
    acts, labels = drop_uncovered(acts, labels)
    categories = np.unique(labels)
    n, k = acts.size, categories.size
    result = dict.fromkeys(
        ("kruskal_h", "kruskal_p", "epsilon2", "anova_f", "anova_p", "eta2"), np.nan
    )
    if k < 2 or n <= k:
        return result
    groups = [acts[labels == c] for c in categories]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            h, p_h = stats.kruskal(*groups)
        except ValueError:  # all values identical
            h, p_h = np.nan, np.nan
        f, p_f = stats.f_oneway(*groups)
    grand = acts.mean()
    ss_total = np.sum((acts - grand) ** 2)
    ss_between = sum(g.size * (g.mean() - grand) ** 2 for g in groups)
    result.update(
        kruskal_h=float(h),
        kruskal_p=float(p_h),
        epsilon2=float((h - k + 1) / (n - k)),
        anova_f=float(f),
        anova_p=float(p_f),
        eta2=float(ss_between / ss_total) if ss_total > 0 else np.nan,
    )
    return result


def level_relation(pairs: dict[str, np.ndarray] | pd.DataFrame) -> dict[str, float]:
    """Does differentiation depend on activation level? Spearman(pair mean, |delta|) (< 0: lower-
    mean pairs differ more) and the mean |delta| of the lower-mean half of pairs minus the upper."""
    result = {"level_rho": np.nan, "level_p": np.nan, "low_mean_delta_gap": np.nan}
    level, effect = np.asarray(pairs["pair_mean"]), np.asarray(pairs["abs_delta"])
    if level.size < 2:
        return result
    low = level <= np.median(level)
    if low.any() and (~low).any():
        result["low_mean_delta_gap"] = float(effect[low].mean() - effect[~low].mean())
    if level.size >= 3 and np.ptp(level) > 0 and np.ptp(effect) > 0:
        rho, p = stats.spearmanr(level, effect)
        result.update(level_rho=float(rho), level_p=float(p))
    return result


def top_down(acts: np.ndarray, labels: np.ndarray, alpha: float = 0.05) -> TopDownResult:
    """Category table, pair table and the flat per-neuron summary of steps 4-6."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError("analysis.alpha", alpha, "a level in (0, 1)")
    cats = category_stats(acts, labels)
    pairs = _pair_columns(cats, acts, labels, alpha)
    n_pairs = pairs["p"].size
    summary: dict[str, float] = {"n_categories": float(cats["category"].size)}
    summary.update(omnibus_tests(acts, labels))

    def pair_mean(values: np.ndarray) -> float:
        return float(np.mean(values)) if n_pairs else np.nan

    summary.update(
        n_pairs=float(n_pairs),
        diff_rate=pair_mean(pairs["significant"]),
        overlap_mean=pair_mean(pairs["range_overlap"]),
        overlap_iqr_mean=pair_mean(pairs["iqr_overlap"]),
        overlap_frac_positive=pair_mean(pairs["range_overlap"] > 0),
        interleaving_mean=pair_mean(pairs["interleaving"]),
    )
    summary.update(level_relation(pairs))
    return TopDownResult(pd.DataFrame(cats), pd.DataFrame(pairs), summary)


def kruskal_epsilon2(acts: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(epsilon^2, Kruskal-Wallis p) as `omnibus_tests`, without the ANOVA and scipy's checks: the
    K-curve computes them for every K (same numbers as scipy.stats.kruskal, tie-corrected)."""
    acts, labels = drop_uncovered(acts, labels)
    _, index = np.unique(labels, return_inverse=True)
    n, k = acts.size, int(index.max(initial=-1)) + 1
    if k < 2 or n <= k:
        return np.nan, np.nan
    ranks = stats.rankdata(acts)
    sizes = np.bincount(index, minlength=k)
    rank_sums = np.bincount(index, weights=ranks, minlength=k)
    h = 12.0 / (n * (n + 1)) * np.sum(rank_sums**2 / sizes) - 3.0 * (n + 1)
    _, tie_counts = np.unique(acts, return_counts=True)
    correction = 1.0 - np.sum(tie_counts**3 - tie_counts) / (n**3 - n)
    if correction <= 0:  # all values identical
        return np.nan, np.nan
    h /= correction
    return float((h - k + 1) / (n - k)), float(stats.chi2.sf(h, k - 1))
