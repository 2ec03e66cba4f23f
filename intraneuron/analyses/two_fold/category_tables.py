"""The per-category and per-pair tables of the top-down steps (Mann-Whitney with Holm, Cliff's
delta, range/IQR overlaps, rank interleaving): one implementation that the summary (`topdown`) and
its permutation null (`interleaving`) both build on. Labels -1 (uncovered tokens) are dropped."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special, stats

# scipy.stats.mannwhitneyu(method="auto") uses the exact distribution unless both samples are
# larger than this or there are ties; we follow the same rule so p-values match scipy's default.
_EXACT_MWU_MAX_SIZE = 8


def drop_uncovered(acts: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations and labels of the tokens that have a category (label >= 0)."""
    acts = np.asarray(acts, dtype=np.float64)
    labels = np.asarray(labels)
    if acts.shape != labels.shape or acts.ndim != 1:
        raise ValueError(f"acts {acts.shape} and labels {labels.shape} must be equal 1-D shapes")
    covered = labels >= 0
    return acts[covered], labels[covered].astype(np.int64)


def category_stats(acts: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per category (sorted labels): size, mean, median, sd (ddof=1), min, max, q25, q75, iqr."""
    acts, labels = drop_uncovered(acts, labels)
    categories, index = np.unique(labels, return_inverse=True)
    k = categories.size
    # One lexsort puts every category's values in order; quantiles are then K small calls.
    order = np.lexsort((acts, index))
    bounds = np.searchsorted(index[order], np.arange(k + 1))
    groups = [acts[order[bounds[c] : bounds[c + 1]]] for c in range(k)]
    quartiles = np.array([np.quantile(g, [0.25, 0.5, 0.75]) for g in groups]).reshape(k, 3)
    sizes = np.diff(bounds)
    means = np.bincount(index, weights=acts, minlength=k) / np.maximum(sizes, 1)
    squares = np.bincount(index, weights=(acts - means[index]) ** 2, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(squares / (sizes - 1))
    return {
        "category": categories,
        "size": sizes,
        "mean": means,
        "median": quartiles[:, 1],
        "sd": np.where(sizes > 1, sd, np.nan),
        "min": np.array([g[0] for g in groups]).reshape(k),
        "max": np.array([g[-1] for g in groups]).reshape(k),
        "q25": quartiles[:, 0],
        "q75": quartiles[:, 2],
        "iqr": quartiles[:, 2] - quartiles[:, 0],
    }


def category_table(acts: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """`category_stats` as a DataFrame, one row per category."""
    return pd.DataFrame(category_stats(acts, labels))


def holm_adjust(p_values: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count as a test)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    tested = np.flatnonzero(~np.isnan(p_values))
    m = tested.size
    if m == 0:
        return adjusted
    order = tested[np.argsort(p_values[tested], kind="stable")]
    steps = (m - np.arange(m)) * p_values[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def pairwise_mann_whitney(acts: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Two-sided Mann-Whitney U for every category pair (a < b), as scipy's method="auto".

    u is U of a against b: the number of (i in a, j in b) with a_i > a_j, ties counting 1/2.
    U for all pairs comes from one searchsorted per category; the normal approximation (with tie
    and continuity corrections) is vectorised, and the exact pairs go to scipy grouped by sizes.
    """
    acts, labels = drop_uncovered(acts, labels)
    categories = np.unique(labels)
    index = np.searchsorted(categories, labels)  # [n] category position
    k = categories.size
    sizes = np.bincount(index, minlength=k)
    ia, ib = np.triu_indices(k, 1)
    n1, n2 = sizes[ia].astype(np.float64), sizes[ib].astype(np.float64)

    # below[i, c] = #{j in c: x_j < x_i} + 0.5 #{j in c: x_j == x_i}   # [n, k]
    below = np.empty((acts.size, k))
    for c in range(k):
        sorted_c = np.sort(acts[index == c])
        left = np.searchsorted(sorted_c, acts, side="left")
        right = np.searchsorted(sorted_c, acts, side="right")
        below[:, c] = 0.5 * (left + right)
    u_matrix = np.zeros((k, k))  # [k, k]: U of row category against column category
    np.add.at(u_matrix, index, below)
    u1 = u_matrix[ia, ib]

    # Tie groups of each pooled pair a+b: counts per distinct value and category.
    _, value_index = np.unique(acts, return_inverse=True)
    counts = np.zeros((value_index.max(initial=-1) + 1, k))  # [n_values, k]
    np.add.at(counts, (value_index, index), 1.0)
    pooled = counts[:, ia] + counts[:, ib]  # [n_values, n_pairs]
    tie_term = np.sum(pooled**3 - pooled, axis=0)
    has_ties = (pooled > 1).any(axis=0)

    total = n1 + n2
    u_max = np.maximum(u1, n1 * n2 - u1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(n1 * n2 / 12 * ((total + 1) - tie_term / (total * (total - 1))))
        z = (u_max - n1 * n2 / 2 - 0.5) / sd
    p = np.clip(2 * special.ndtr(-z), 0.0, 1.0)

    exact = ~((n1 > _EXACT_MWU_MAX_SIZE) & (n2 > _EXACT_MWU_MAX_SIZE)) & ~has_ties
    if exact.any():
        p[exact] = _exact_mwu_p(acts, index, ia[exact], ib[exact], sizes)
    return {"cat_a": categories[ia], "cat_b": categories[ib], "ia": ia, "ib": ib,
            "n_a": sizes[ia], "n_b": sizes[ib], "u": u1, "p": p}


def _exact_mwu_p(
    acts: np.ndarray, index: np.ndarray, ia: np.ndarray, ib: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Exact two-sided p for small tie-free pairs; one scipy call per (n_a, n_b) shape."""
    members = [np.sort(acts[index == c]) for c in range(sizes.size)]
    p = np.empty(ia.size)
    shapes = np.stack([sizes[ia], sizes[ib]], axis=1)
    for shape in np.unique(shapes, axis=0):
        rows = np.flatnonzero((shapes == shape).all(axis=1))
        xa = np.stack([members[a] for a in ia[rows]])  # [m, n_a]
        xb = np.stack([members[b] for b in ib[rows]])  # [m, n_b]
        p[rows] = stats.mannwhitneyu(xa, xb, axis=1, method="exact").pvalue
    return p


def range_overlap(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """O_ab = max(0, min(hi) - max(lo)) / (max(hi) - min(lo)); 1 when both are the same point."""
    lo_a, hi_a, lo_b, hi_b = map(np.asarray, (lo_a, hi_a, lo_b, hi_b))
    shared = np.maximum(0.0, np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b))
    span = np.maximum(hi_a, hi_b) - np.minimum(lo_a, lo_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(span > 0, shared / np.where(span > 0, span, 1.0), 1.0)


def pairwise_table(acts: np.ndarray, labels: np.ndarray, alpha: float = 0.05) -> pd.DataFrame:
    """One row per category pair: MWU u and p, Holm-adjusted p, significance at alpha, Cliff's
    delta (a vs b, > 0 when a is higher), |delta|, pair mean activation, range and IQR overlaps,
    and rank interleaving I = 1 - AUC of the higher-mean category against the lower one."""
    return pd.DataFrame(_pair_columns(category_stats(acts, labels), acts, labels, alpha))


def _pair_columns(
    cats: dict[str, np.ndarray], acts: np.ndarray, labels: np.ndarray, alpha: float
) -> dict[str, np.ndarray]:
    mwu = pairwise_mann_whitney(acts, labels)
    ia, ib = mwu.pop("ia"), mwu.pop("ib")
    auc_a = mwu["u"] / (mwu["n_a"] * mwu["n_b"])  # P(a > b) + P(tie) / 2
    mean_a, mean_b = cats["mean"][ia], cats["mean"][ib]
    p_holm = holm_adjust(mwu["p"])
    delta = 2 * auc_a - 1
    return {
        **mwu,
        "mean_a": mean_a,
        "mean_b": mean_b,
        "pair_mean": (mean_a + mean_b) / 2,
        "p_holm": p_holm,
        "significant": p_holm < alpha,
        "cliffs_delta": delta,
        "abs_delta": np.abs(delta),
        "range_overlap": range_overlap(cats["min"][ia], cats["max"][ia], cats["min"][ib], cats["max"][ib]),
        "iqr_overlap": range_overlap(cats["q25"][ia], cats["q75"][ia], cats["q25"][ib], cats["q75"][ib]),
        "interleaving": 1 - np.where(_at_least(mean_a, mean_b), auc_a, 1 - auc_a),
    }


def _at_least(mean_a: np.ndarray, mean_b: np.ndarray) -> np.ndarray:
    """mean_a >= mean_b, with equal means (up to rounding) counting as >=: which category is the
    higher one must not depend on the order the means were summed in."""
    return mean_a >= mean_b - 1e-12 * np.maximum(1.0, np.maximum(np.abs(mean_a), np.abs(mean_b)))
