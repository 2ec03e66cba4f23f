"""Step 8 (bottom-up): categorical homogeneity of each activation segment against a permutation
null (`homogeneity`), its trend over segments, the successive-token discontinuity of the sibling
paper (`successive`), and the top segment's sequential p.

The top segment's p is sequential (Besag & Clifford 1991, in stages): with p >= 1/(P + 1) and a
layer of 1,536 neurons, BH at 0.05 rejects nothing unless about 31 neurons sit at the floor of
P = 1000, so a neuron whose top segment has fewer than 10 null draws at or above it gets ten times
more permutations of the top segment alone, up to max_permutations, then a generalized Pareto
tail fit (`intraneuron.stats.tail`). The other segments keep the first-stage null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from intraneuron.analyses.two_fold.homogeneity import (
    MEASURES,
    _homogeneity_draws,
    _homogeneity_null_loop,
    cosine_matrix,
    homogeneity_null,
    mean_pairwise_cosine,
    segment_homogeneity,
    validate_null,
)
from intraneuron.analyses.two_fold.successive import (
    SuccessiveTest,
    _successive_null_loop,
    successive_similarity,
)
from intraneuron.errors import ConfigError
from intraneuron.stats.permutation import (
    DEFAULT_BATCH,
    NullSummary,
    SeedLike,
    count_as_extreme,
    make_rng,
    side_stream,
    summarise_null,
)
from intraneuron.stats.tail import gpd_tail_p

# Public names, with those that live in `homogeneity` and `successive` (and their slow references).
__all__ = [
    "MEASURES", "MIN_EXCEEDANCES", "STAGE_GROWTH", "TOP_METHODS", "TOP_STREAM_KEY", "BottomUpResult",
    "SuccessiveTest", "TopTest", "_homogeneity_null_loop", "_successive_null_loop", "bottom_up",
    "cosine_matrix", "homogeneity_null", "homogeneity_test", "homogeneity_trend",
    "mean_pairwise_cosine", "segment_homogeneity", "successive_similarity",
    "validate_max_permutations", "validate_null",
]  # fmt: skip

MIN_EXCEEDANCES = 10  # null draws at or above H_top that end the sequential stages
STAGE_GROWTH = 10  # each stage multiplies the permutations of the top segment by this
TOP_METHODS = ("permutation", "gpd")
TOP_STREAM_KEY = 2**32 - 1  # side stream of the neuron's seed for the further stages


def validate_max_permutations(n_permutations: int, max_permutations: int) -> None:
    """Raise ConfigError unless max_permutations is an integer >= n_permutations."""
    if (
        not isinstance(max_permutations, int | np.integer)
        or isinstance(max_permutations, bool)
        or max_permutations < n_permutations
    ):
        raise ConfigError(
            "analysis.max_permutations", max_permutations,
            f"an integer >= analysis.n_permutations ({n_permutations})",
        )  # fmt: skip


@dataclass(frozen=True)
class TopTest:
    """The top segment's p after the sequential stages: n_permutations drawn in all, exceedances
    among them (null >= observed), method "permutation" ((1 + b) / (1 + P)) or "gpd" (tail fit)."""

    p: float
    n_permutations: int
    method: str
    exceedances: int


def homogeneity_test(
    C: np.ndarray,
    labels: np.ndarray,
    n_segments: int,
    measure: str = "pairwise",
    n_permutations: int = 1000,
    max_permutations: int | None = None,
    seed: SeedLike = 0,
    batch_size: int = DEFAULT_BATCH,
) -> tuple[NullSummary, TopTest]:
    """`homogeneity_null` (same draws for the same seed) plus the top segment's sequential p.

    The further stages draw from a side stream of the seed (`side_stream`), so the caller's stream,
    its spawned children and every statistic drawn from them are the same whether they run or not.
    max_permutations None: n_permutations (no further stage).
    """
    validate_null(measure, n_permutations)
    max_permutations = n_permutations if max_permutations is None else max_permutations
    validate_max_permutations(n_permutations, max_permutations)
    rng = make_rng(seed)
    later = side_stream(rng, TOP_STREAM_KEY)
    labels = np.asarray(labels, dtype=np.int64)
    observed, null = _homogeneity_draws(C, labels, n_segments, measure, n_permutations, rng, batch_size)
    top = _sequential_top(C, labels, measure, observed[0], null[:, 0], max_permutations, later, batch_size)
    return summarise_null(observed, null, "greater"), top


def _sequential_top(
    C: np.ndarray, labels: np.ndarray, measure: str, observed: float, first: np.ndarray,
    max_permutations: int, rng: np.random.Generator, batch_size: int,
) -> TopTest:
    """Stages of STAGE_GROWTH times more permutations of the top segment (first: its first-stage
    null [P]) until MIN_EXCEEDANCES or max_permutations, then a GPD tail if still short."""  # fmt: skip
    total = first.size
    if not np.isfinite(observed):
        return TopTest(np.nan, total, "permutation", 0)
    exceed = int(count_as_extreme(first, observed, "greater"))
    nulls = [first]
    in_top = int(np.sum(labels == 0))
    while exceed < MIN_EXCEEDANCES and total < max_permutations:
        more = min(total * STAGE_GROWTH, max_permutations) - total
        stage = _top_null(C, in_top, measure, more, rng, batch_size)  # [more]
        exceed += int(count_as_extreme(stage, observed, "greater"))
        nulls.append(stage)
        total += more
    if exceed < MIN_EXCEEDANCES:
        fit = gpd_tail_p(np.concatenate(nulls), observed)
        if fit.ok:
            # The observed top set is one of comb(n, n_top) equally likely ones: no p is smaller.
            n_sets = math.comb(labels.size, in_top)
            floor = 1.0 / n_sets if n_sets < 1e300 else 0.0
            return TopTest(max(fit.p, floor), total, "gpd", exceed)
    return TopTest((1.0 + exceed) / (1.0 + total), total, "permutation", exceed)


def _top_null(
    C: np.ndarray, in_top: int, measure: str, count: int, rng: np.random.Generator, batch_size: int
) -> np.ndarray:
    """H_top [count] of the top segment of `count` shuffles of the activations.

    The top segment of a shuffle is a uniform random set of in_top tokens, drawn here by a partial
    Fisher-Yates shuffle of its first in_top (or, when the top is the larger segment, of the rest's
    n - in_top) positions; the larger side's pair sum follows from the total, as in
    `homogeneity._SegmentPairs`.
    """
    n = C.shape[0]
    small = min(in_top, n - in_top) or in_top  # the side that is drawn and gathered
    rows_i, cols_i = np.triu_indices(small, 1)
    diagonal = np.diagonal(C)  # [n] 1, or 0 for a zero vector
    off_diagonal_rows = C.sum(axis=1) - diagonal  # [n]
    batch = int(np.clip(2**18 // max(rows_i.size, 1), batch_size, 4096))  # [batch, pairs] ~2 MB
    out = np.empty(count)
    for start in range(0, count, batch):
        rows = min(batch, count - start)
        idx = np.tile(np.arange(n), (rows, 1))  # [rows, n]
        at = np.arange(rows)
        for j in range(small):
            k = rng.integers(j, n, size=rows)
            idx[at, j], idx[at, k] = idx[at, k], idx[at, j]
        chosen = idx[:, :small]  # [rows, small] a uniform random set of that size
        flat = np.take(chosen, rows_i, axis=1) * n + np.take(chosen, cols_i, axis=1)  # [rows, pairs]
        pair_sum = np.take(C.reshape(-1), flat).sum(axis=1)  # [rows] over pairs i < j
        trace = diagonal[chosen].sum(axis=1)
        if small != in_top:  # drew the rest: the top is its complement
            pair_sum = off_diagonal_rows.sum() / 2 - off_diagonal_rows[chosen].sum(axis=1) + pair_sum
            trace = diagonal.sum() - trace
        if measure == "pairwise":
            out[start : start + rows] = 2 * pair_sum / (in_top * (in_top - 1))
        else:
            out[start : start + rows] = np.sqrt(np.maximum(2 * pair_sum + trace, 0.0)) / in_top
    return out


def homogeneity_trend(h: np.ndarray) -> tuple[float, float]:
    """Spearman between segment activation level (S-1-s) and H_s over segments with a value:
    > 0 when higher-activation segments are more homogeneous. NaN with fewer than 3 segments."""
    h = np.asarray(h, dtype=np.float64)
    level = -np.arange(h.size, dtype=np.float64)
    ok = ~np.isnan(h)
    if ok.sum() < 3 or np.ptp(h[ok]) == 0:
        return np.nan, np.nan
    rho, p = stats.spearmanr(level[ok], h[ok])
    return float(rho), float(p)


@dataclass(frozen=True)
class BottomUpResult:
    """segments: one row per segment; summary: flat per-neuron scalars."""

    segments: pd.DataFrame
    summary: dict[str, float | str]


def bottom_up(
    acts: np.ndarray,
    C: np.ndarray,
    labels: np.ndarray,
    n_segments: int,
    measure: str = "pairwise",
    n_permutations: int = 1000,
    seed: SeedLike = 0,
    max_permutations: int | None = None,
) -> BottomUpResult:
    """Step 8 for one neuron: segment table (activation range, H, null, z, p; first-stage null)
    and the summary H_all (the measure over all core tokens), H_top, H_rest (tokens outside
    segment 0), z_top, the sequential p_top (`homogeneity_test`), trend and successive test."""
    validate_null(measure, n_permutations)
    rng = make_rng(seed)
    acts = np.asarray(acts, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    test, top = homogeneity_test(C, labels, n_segments, measure, n_permutations, max_permutations, rng)
    successive = successive_similarity(C, acts, n_permutations, rng)

    sizes = np.bincount(labels, minlength=n_segments)
    sums = np.bincount(labels, weights=acts, minlength=n_segments)
    with np.errstate(invalid="ignore", divide="ignore"):
        act_mean = sums / sizes
    act_min = np.full(n_segments, np.nan)
    act_max = np.full(n_segments, np.nan)
    np.fmin.at(act_min, labels, acts)
    np.fmax.at(act_max, labels, acts)
    segments = pd.DataFrame(
        {
            "segment": np.arange(n_segments),
            "size": sizes,
            "act_min": act_min,
            "act_max": act_max,
            "act_mean": act_mean,
            "homogeneity": test.observed,
            "null_mean": test.null_mean,
            "null_sd": test.null_sd,
            "z": test.z,
            "p": test.p,
        }
    )
    h_rest = segment_homogeneity(C, (labels != 0).astype(np.int64), 2, measure)[1]
    trend_rho, trend_p = homogeneity_trend(test.observed)
    summary = {
        "n_segments_used": float((sizes > 0).sum()),
        "n_top": float(sizes[0]),
        "h_all": float(segment_homogeneity(C, np.zeros(acts.size, dtype=np.int64), 1, measure)[0]),
        "h_top": float(test.observed[0]),
        "h_rest": float(h_rest),
        "h_top_minus_rest": float(test.observed[0] - h_rest),
        "z_top": float(test.z[0]),
        "p_top": float(top.p),
        "p_top_permutations": float(top.n_permutations),
        "p_top_method": top.method,
        "trend_rho": trend_rho,
        "trend_p": trend_p,
        "successive_cos": successive.observed,
        "successive_null_mean": successive.null_mean,
        "successive_z": successive.z,
        "successive_p_greater": successive.p_greater,
        "successive_p_less": successive.p_less,
    }
    return BottomUpResult(segments, summary)
