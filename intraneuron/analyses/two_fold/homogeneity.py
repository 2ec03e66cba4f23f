"""Segment homogeneity and its permutation null, batched: the statistic that the bottom-up step
(`bottomup`), its sequential top-segment stages and the successive-token test all share.

Homogeneity of a segment is a quadratic form of the cosine matrix C over the segment's tokens:
Q_s = sum_{i,j in s} C_ij. Mean pairwise cosine = (Q_s - trace_s) / (n_s (n_s - 1)); mean cosine
to the centroid of the unit vectors = sqrt(Q_s) / n_s. The null shuffles the activations, i.e.
the assignment of tokens to segments with sizes kept; all permutations of a batch are evaluated
at once by gathering C over the within-segment token pairs.
"""

from __future__ import annotations

import numpy as np

from intraneuron.errors import ConfigError
from intraneuron.stats.permutation import (
    DEFAULT_BATCH,
    NullSummary,
    PairGather,
    SeedLike,
    inverse_permutations,
    make_rng,
    permutation_batches,
    summarise_null,
)

MEASURES = ("pairwise", "centroid")


def validate_null(measure: str, n_permutations: int) -> None:
    """Raise ConfigError for an unknown homogeneity measure or too few permutations."""
    if measure not in MEASURES:
        raise ConfigError("analysis.homogeneity", measure, MEASURES)
    if not isinstance(n_permutations, int | np.integer) or n_permutations < 1:
        raise ConfigError("analysis.n_permutations", n_permutations, "an integer >= 1")


def cosine_matrix(X: np.ndarray) -> np.ndarray:
    """Cosine similarities [n, n] of the rows of X [n, d], in float64 (zero rows: cosine 0)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n_tokens, d], got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    unit = X / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def mean_pairwise_cosine(C: np.ndarray) -> float:
    """H_all: mean cosine over all distinct token pairs (the expected value of a random pair)."""
    n = C.shape[0]
    if n < 2:
        return np.nan
    return float((C.sum() - np.trace(C)) / (n * (n - 1)))


class _SegmentPairs:
    """Within-segment token pairs of a fixed segmentation, laid out for batched gathers.

    With exactly two non-empty segments (the "top_fraction" scheme) only the smaller one's pairs are
    gathered: the larger one's pair sum follows from the total over all pairs, which no
    permutation changes, minus the row sums of the smaller segment's tokens.
    """

    def __init__(self, labels: np.ndarray, n_segments: int, batch_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= n_segments:
            raise ValueError(f"segment labels must lie in [0, {n_segments})")
        self.n = labels.size
        self.order = np.argsort(labels, kind="stable")  # tokens grouped by segment
        self.sizes = np.bincount(labels, minlength=n_segments)  # [S]
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.has_tokens = self.sizes > 0
        self.token_starts = starts[self.has_tokens]
        used = np.flatnonzero(self.has_tokens)
        self.derived: int | None = None  # segment whose pair sum comes from the complement
        if used.size == 2:
            self.derived = int(used[np.argmax(self.sizes[used])])
            small = int(used[used != self.derived][0])
            self.small_positions = np.arange(starts[small], starts[small] + self.sizes[small])
        rows, cols, pair_counts = [], [], []
        for s, (start, size) in enumerate(zip(starts, self.sizes, strict=True)):
            r, c = np.triu_indices(0 if s == self.derived else size, 1)
            rows.append(r + start)
            cols.append(c + start)
            pair_counts.append(r.size)
        # [T] within-segment pairs as positions in `order`
        self.gather = PairGather(np.concatenate(rows), np.concatenate(cols), self.n, batch_size)
        pair_counts = np.asarray(pair_counts)
        self.has_pairs = pair_counts > 0  # [S]
        self.pair_starts = np.concatenate([[0], np.cumsum(pair_counts)[:-1]])[self.has_pairs]

    def homogeneity(self, C: np.ndarray, tokens: np.ndarray, measure: str) -> np.ndarray:
        """H [batch, S] for token layouts tokens [batch, n] (row p: token at each position)."""
        batch = tokens.shape[0]
        n_seg = self.sizes.size
        pair_sums = np.zeros((batch, n_seg))  # sums over pairs i < j within each segment
        if self.gather.rows.size:
            values = self.gather(C, tokens)  # [batch, T]
            pair_sums[:, self.has_pairs] = np.add.reduceat(values, self.pair_starts, axis=1)
        if self.derived is not None:
            off_diagonal_rows = C.sum(axis=1) - np.diagonal(C)  # [n]
            small_rows = off_diagonal_rows[tokens[:, self.small_positions]].sum(axis=1)
            small_pairs = pair_sums.sum(axis=1)  # only the smaller segment was gathered
            pair_sums[:, self.derived] = off_diagonal_rows.sum() / 2 - small_rows + small_pairs
        h = np.full((batch, n_seg), np.nan)
        multi = self.sizes >= 2
        sizes = self.sizes[multi].astype(np.float64)
        if measure == "pairwise":
            h[:, multi] = 2 * pair_sums[:, multi] / (sizes * (sizes - 1))
        else:
            traces = np.zeros((batch, n_seg))
            diagonal = np.diagonal(C)[tokens]  # [batch, n]
            traces[:, self.has_tokens] = np.add.reduceat(diagonal, self.token_starts, axis=1)
            quadratic = 2 * pair_sums[:, multi] + traces[:, multi]
            h[:, multi] = np.sqrt(np.maximum(quadratic, 0.0)) / sizes
        return h


def segment_homogeneity(
    C: np.ndarray, labels: np.ndarray, n_segments: int, measure: str = "pairwise"
) -> np.ndarray:
    """H_s [n_segments] of each segment (NaN for segments with fewer than 2 tokens)."""
    validate_null(measure, 1)
    layout = _SegmentPairs(labels, n_segments)
    return layout.homogeneity(C, layout.order[None, :], measure)[0]


def homogeneity_null(
    C: np.ndarray,
    labels: np.ndarray,
    n_segments: int,
    measure: str = "pairwise",
    n_permutations: int = 1000,
    seed: SeedLike = 0,
    batch_size: int = DEFAULT_BATCH,
) -> NullSummary:
    """Per segment: observed H_s, permutation mean/sd, z and p = (1 + #{null >= H}) / (1 + P).

    Permutation p shuffles the activations (token i takes the activation of token perm[i]), so
    segment s holds the tokens i with labels[perm[i]] == s.
    """
    validate_null(measure, n_permutations)
    observed, null = _homogeneity_draws(C, labels, n_segments, measure, n_permutations, make_rng(seed), batch_size)
    return summarise_null(observed, null, "greater")


def _homogeneity_draws(
    C: np.ndarray, labels: np.ndarray, n_segments: int, measure: str, n_permutations: int,
    rng: np.random.Generator, batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Observed H [S] and its permutation null [P, S]."""  # fmt: skip
    layout = _SegmentPairs(labels, n_segments, batch_size)
    observed = layout.homogeneity(C, layout.order[None, :], measure)[0]
    null = np.empty((n_permutations, n_segments))  # [P, S]
    done = 0
    for perms in permutation_batches(rng, layout.n, n_permutations, batch_size):
        tokens = inverse_permutations(perms)[:, layout.order]  # [batch, n]
        null[done : done + len(perms)] = layout.homogeneity(C, tokens, measure)
        done += len(perms)
    return observed, null


def _homogeneity_null_loop(
    C: np.ndarray,
    labels: np.ndarray,
    n_segments: int,
    measure: str = "pairwise",
    n_permutations: int = 1000,
    seed: SeedLike = 0,
) -> NullSummary:
    """Slow reference for `homogeneity_null`: one permutation and one segment at a time."""
    rng = make_rng(seed)
    labels = np.asarray(labels)

    def homogeneity(assignment: np.ndarray) -> np.ndarray:
        h = np.full(n_segments, np.nan)
        for s in range(n_segments):
            members = np.flatnonzero(assignment == s)
            m = members.size
            if m < 2:
                continue
            block = C[np.ix_(members, members)]
            if measure == "pairwise":
                h[s] = (block.sum() - np.trace(block)) / (m * (m - 1))
            else:
                h[s] = np.sqrt(max(block.sum(), 0.0)) / m
        return h

    observed = homogeneity(labels)
    null = np.stack([homogeneity(labels[rng.permutation(labels.size)]) for _ in range(n_permutations)])
    return summarise_null(observed, null, "greater")
