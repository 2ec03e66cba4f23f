"""Step 9: how far the categorical and the activation segmentations agree.

ARI and AMI (both chance-adjusted: 0 for independent partitions) between category labels and
segment labels, and a Mantel-style test of activation proximity against categorical proximity:
Spearman over token pairs between an activation distance and the cosine distance 1 - cos(x_i, x_j).
The activation distance is |rank_i - rank_j| by default ("rank"): on raw |a_i - a_j| ("absolute")
the dense mass of low activations, all within a hair of each other, outweighs the few high ones.
Both are our proposals, not the paper's (paper_methods.md 1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from intraneuron.errors import ConfigError
from intraneuron.stats.permutation import (
    DEFAULT_BATCH,
    Alternative,
    PairGather,
    SeedLike,
    make_rng,
    permutation_batches,
    summarise_null,
)

MANTEL_DISTANCES = ("rank", "absolute")


def partition_agreement(categories: np.ndarray, segments: np.ndarray) -> tuple[float, float]:
    """(ARI, AMI) between category and segment labels over tokens with a category (label >= 0)."""
    categories, segments = np.asarray(categories), np.asarray(segments)
    if categories.shape != segments.shape:
        raise ValueError(f"label shapes differ: {categories.shape} vs {segments.shape}")
    covered = categories >= 0
    if covered.sum() < 2:
        return np.nan, np.nan
    ari = adjusted_rand_score(categories[covered], segments[covered])
    ami = adjusted_mutual_info_score(categories[covered], segments[covered])
    return float(ari), float(ami)


def adjusted_rand(categories: np.ndarray, segments: np.ndarray) -> float:
    """sklearn's adjusted_rand_score over tokens with a category (label >= 0), from one bincount
    contingency table (the K-curve computes it for every K)."""
    categories, segments = np.asarray(categories), np.asarray(segments)
    covered = categories >= 0
    if covered.sum() < 2:
        return np.nan
    _, a = np.unique(categories[covered], return_inverse=True)
    _, b = np.unique(segments[covered], return_inverse=True)
    n, n_b = a.size, int(b.max()) + 1
    table = np.bincount(a * n_b + b).astype(np.float64)

    def pairs(counts: np.ndarray) -> float:
        return float(np.sum(counts * (counts - 1)) / 2)

    index = pairs(table)
    rows, cols = pairs(np.bincount(a).astype(np.float64)), pairs(np.bincount(b).astype(np.float64))
    expected = rows * cols / (n * (n - 1) / 2)
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons): sklearn's 1
        return 1.0
    return float((index - expected) / (maximum - expected))


@dataclass(frozen=True)
class MantelResult:
    """Spearman rho between activation distance and cosine distance, with its permutation null."""

    rho: float
    p: float
    null_mean: float
    null_sd: float
    n_permutations: int


def mantel_activation_cosine(
    acts: np.ndarray,
    C: np.ndarray,
    n_permutations: int = 999,
    seed: SeedLike = 0,
    alternative: Alternative = "greater",
    batch_size: int = DEFAULT_BATCH,
    distance: str = "rank",
) -> MantelResult:
    """Mantel test over token pairs i < j: Spearman(d_ij, 1 - C_ij), d_ij = |r_i - r_j| with r the
    activations' ranks (distance "rank") or |a_i - a_j| ("absolute"); the null shuffles
    the activations. "greater" (default) tests that tokens close in activation are close in
    meaning. Shuffling moves the ranks of the activation distances with the tokens, so each
    permutation costs one gather of the centred rank matrix and a dot product."""
    if not isinstance(n_permutations, int | np.integer) or n_permutations < 1:
        raise ConfigError("analysis.n_mantel_permutations", n_permutations, "an integer >= 1")
    acts = _mantel_values(acts, distance)
    n = acts.size
    if C.shape != (n, n):
        raise ValueError(f"C must be [{n}, {n}], got {C.shape}")
    rows, cols = np.triu_indices(n, 1)
    act_ranks = _centred_ranks(np.abs(acts[rows] - acts[cols]))  # [T]
    cos_ranks = _centred_ranks(1.0 - C[rows, cols])  # [T]
    scale = np.sqrt(np.sum(act_ranks**2) * np.sum(cos_ranks**2))
    if n < 3 or scale == 0:
        return MantelResult(np.nan, np.nan, np.nan, np.nan, n_permutations)
    observed = float(act_ranks @ cos_ranks / scale)

    rank_matrix = np.zeros((n, n))  # symmetric [n, n] of centred activation-distance ranks
    rank_matrix[rows, cols] = act_ranks
    rank_matrix[cols, rows] = act_ranks
    gather = PairGather(rows, cols, n, batch_size)
    rng = make_rng(seed)
    null = np.empty(n_permutations)
    done = 0
    for perms in permutation_batches(rng, n, n_permutations, batch_size):
        # Token i takes activation acts[perm[i]]: the pair (i, j) gets rank_matrix[perm[i], perm[j]].
        null[done : done + len(perms)] = gather(rank_matrix, perms) @ cos_ranks / scale
        done += len(perms)
    test = summarise_null(observed, null, alternative)
    return MantelResult(observed, float(test.p), float(test.null_mean), float(test.null_sd), n_permutations)


def _mantel_null_loop(
    acts: np.ndarray,
    C: np.ndarray,
    n_permutations: int = 999,
    seed: SeedLike = 0,
    alternative: Alternative = "greater",
    distance: str = "rank",
) -> MantelResult:
    """Slow reference for `mantel_activation_cosine`: scipy's spearmanr on each shuffle."""
    acts = np.asarray(acts, dtype=np.float64)
    if distance == "rank":
        acts = stats.rankdata(acts)
    rows, cols = np.triu_indices(acts.size, 1)
    cos_dist = 1.0 - C[rows, cols]
    observed = stats.spearmanr(np.abs(acts[rows] - acts[cols]), cos_dist).statistic
    rng = make_rng(seed)
    null = []
    for _ in range(n_permutations):
        shuffled = acts[rng.permutation(acts.size)]
        null.append(stats.spearmanr(np.abs(shuffled[rows] - shuffled[cols]), cos_dist).statistic)
    test = summarise_null(observed, np.asarray(null), alternative)
    return MantelResult(float(observed), float(test.p), float(test.null_mean), float(test.null_sd), n_permutations)


def validate_mantel_distance(distance: str) -> None:
    if distance not in MANTEL_DISTANCES:
        raise ConfigError("analysis.mantel_distance", distance, MANTEL_DISTANCES)


def _mantel_values(acts: np.ndarray, distance: str) -> np.ndarray:
    """What |x_i - x_j| is taken of: the activations' ranks (ties averaged) or the activations."""
    validate_mantel_distance(distance)
    acts = np.asarray(acts, dtype=np.float64)
    return stats.rankdata(acts) if distance == "rank" else acts


def _centred_ranks(values: np.ndarray) -> np.ndarray:
    ranks = stats.rankdata(values)
    return ranks - ranks.mean()
