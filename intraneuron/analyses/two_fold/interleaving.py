"""The permutation null of overlap and interleaving (step 6): activations independent of the
categories already give overlaps near 1 and interleaving near 0.45, so the observed means are read
against it rather than against 0."""

from __future__ import annotations

import numpy as np

from intraneuron.analyses.two_fold.category_tables import (
    _at_least,
    _pair_columns,
    category_stats,
    drop_uncovered,
    pairwise_table,
    range_overlap,
)
from intraneuron.errors import ConfigError
from intraneuron.stats.permutation import SeedLike, make_rng, permutation_batches, summarise_null

NULL_KEYS = ("interleaving_null_mean", "interleaving_z", "interleaving_p_less",
             "overlap_null_mean", "overlap_z", "overlap_p_less")  # fmt: skip


def interleaving_overlap_null(
    acts: np.ndarray,
    labels: np.ndarray,
    n_permutations: int = 1000,
    seed: SeedLike = 0,
    batch_size: int = 128,
    observed: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Permutation null of interleaving_mean and overlap_mean (the means over category pairs).

    The category labels stay fixed and the activations are shuffled (token i takes
    acts[perm[i]], the permutations of `permutation_batches`), so the null is "activation
    independent of category" at these category sizes: with independent activations the range
    overlap is near 1 and the rank interleaving near 0.45, not 0. p_less = P(null <= observed):
    small when the categories are less interleaved (less overlapping) than chance, i.e. separated.
    Returns the keys of NULL_KEYS (NaN with < 2 categories). observed: (interleaving_mean,
    overlap_mean) when the caller has them (`top_down`'s summary); else computed here.

    Shuffling activations over fixed labels is shuffling labels over the sorted activations, so
    each batch is one [P, n] label array: per-category cumulative counts give every pair's
    Mann-Whitney U (ties count 1/2), first/last positions give ranges, sums give means.
    """
    if not isinstance(n_permutations, int | np.integer) or n_permutations < 1:
        raise ConfigError("analysis.n_permutations", n_permutations, "an integer >= 1")
    acts, labels = drop_uncovered(acts, labels)
    categories, index = np.unique(labels, return_inverse=True)
    k, n = categories.size, acts.size
    result = dict.fromkeys(NULL_KEYS, np.nan)
    if k < 2:
        return result
    if observed is None:
        pairs = _pair_columns(category_stats(acts, labels), acts, labels, 0.05)
        observed = (pairs["interleaving"].mean(), pairs["range_overlap"].mean())
    observed = np.asarray(observed, dtype=np.float64)
    members = [np.flatnonzero(index == c) for c in range(k)]

    order = np.argsort(acts, kind="stable")
    values = acts[order]  # [n] sorted activations
    position = np.empty(n, dtype=np.intp)
    position[order] = np.arange(n)
    # tie groups of the sorted values: [start, end) of each position's group
    new_group = np.r_[True, values[1:] != values[:-1]]
    starts = np.flatnonzero(new_group)
    group = np.cumsum(new_group) - 1
    tie_start = starts[group]
    tie_end = np.r_[starts[1:], n][group]
    ties = starts.size < n
    ia, ib = np.triu_indices(k, 1)
    sizes = np.bincount(index, minlength=k).astype(np.float64)

    rng = make_rng(seed)
    null = np.empty((n_permutations, 2))
    done = 0
    for perms in permutation_batches(rng, n, n_permutations, batch_size):
        p = perms.shape[0]
        # label of each sorted position: token i's value acts[perm[i]] sits at position[perm[i]]
        sorted_labels = np.empty((p, n), dtype=np.intp)
        np.put_along_axis(sorted_labels, position[perms], np.broadcast_to(index, (p, n)), axis=1)
        onehot = np.zeros((p, n, k), dtype=np.float32)  # [P, n, k]; counts < 2**24 are exact
        np.put_along_axis(onehot, sorted_labels[..., None], 1.0, axis=2)
        below = np.zeros((p, n + 1, k), dtype=np.float32)  # [P, n + 1, k]: counts before a position
        np.cumsum(onehot, axis=1, out=below[:, 1:])
        if ties:  # count of category b below position t, ties half: (C[start] + C[end]) / 2
            counted = 0.5 * (below[:, tie_start] + below[:, tie_end])  # [P, n, k]
        else:  # off the diagonal, a token's own category does not count: C[t] is enough
            counted = below[:, :-1]
        u = np.matmul(onehot.transpose(0, 2, 1), counted).astype(
            np.float64
        )  # [P, k, k]: U row vs column
        means = np.matmul(values, onehot.astype(np.float64)) / sizes  # [P, k]
        auc_a = u[:, ia, ib] / (sizes[ia] * sizes[ib])  # [P, pairs]
        higher_a = _at_least(means[:, ia], means[:, ib])
        interleaving = 1 - np.where(higher_a, auc_a, 1 - auc_a)
        spots = [position[perms[:, m]] for m in members]  # sorted positions of each category
        low = values[np.stack([s.min(axis=1) for s in spots], axis=1)]  # [P, k]
        high = values[np.stack([s.max(axis=1) for s in spots], axis=1)]
        overlap = range_overlap(low[:, ia], high[:, ia], low[:, ib], high[:, ib])
        null[done : done + p, 0] = interleaving.mean(axis=1)
        null[done : done + p, 1] = overlap.mean(axis=1)
        done += p
    return _null_keys(observed, null)


def _null_keys(observed: np.ndarray, null: np.ndarray) -> dict[str, float]:
    test = summarise_null(observed, null, "less")
    return {
        "interleaving_null_mean": float(test.null_mean[0]),
        "interleaving_z": float(test.z[0]),
        "interleaving_p_less": float(test.p[0]),
        "overlap_null_mean": float(test.null_mean[1]),
        "overlap_z": float(test.z[1]),
        "overlap_p_less": float(test.p[1]),
    }


def _interleaving_overlap_null_loop(
    acts: np.ndarray, labels: np.ndarray, n_permutations: int = 1000, seed: SeedLike = 0
) -> dict[str, float]:
    """Slow reference for `interleaving_overlap_null`: the pair table of every shuffle."""
    acts, labels = drop_uncovered(acts, labels)
    if np.unique(labels).size < 2:
        return dict.fromkeys(NULL_KEYS, np.nan)
    table = pairwise_table(acts, labels)
    observed = np.array([table["interleaving"].mean(), table["range_overlap"].mean()])
    rng = make_rng(seed)
    null = []
    for _ in range(n_permutations):
        shuffled = pairwise_table(acts[rng.permutation(acts.size)], labels)
        null.append([shuffled["interleaving"].mean(), shuffled["range_overlap"].mean()])
    return _null_keys(observed, np.asarray(null))
