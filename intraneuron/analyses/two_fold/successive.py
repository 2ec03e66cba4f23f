"""The successive-token test of the sibling paper: are tokens adjacent in activation order more
(or less: its "categorical discontinuity") alike than under shuffled activations?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intraneuron.analyses.two_fold.homogeneity import validate_null
from intraneuron.analyses.two_fold.segmentation import activation_order
from intraneuron.stats.permutation import (
    DEFAULT_BATCH,
    SeedLike,
    inverse_permutations,
    make_rng,
    permutation_batches,
    summarise_null,
)


@dataclass(frozen=True)
class SuccessiveTest:
    """Mean cosine of tokens adjacent in activation order against shuffled orders."""

    observed: float
    null_mean: float
    null_sd: float
    z: float
    p_greater: float
    p_less: float


def successive_similarity(
    C: np.ndarray, acts: np.ndarray, n_permutations: int = 1000, seed: SeedLike = 0,
    batch_size: int = DEFAULT_BATCH,
) -> SuccessiveTest:
    """Mean cos(x_(r), x_(r+1)) over neighbours in activation order, against shuffled activations
    (whose expectation is H_all). p_greater: neighbours more similar than chance; p_less: the
    sibling paper's "categorical discontinuity"."""
    validate_null("pairwise", n_permutations)
    rng = make_rng(seed)
    order = activation_order(acts)
    observed = _adjacent_mean(C, order[None, :])[0]
    null = np.empty(n_permutations)
    done = 0
    for perms in permutation_batches(rng, order.size, n_permutations, batch_size):
        # Shuffled activations rank token inv[order[r]] r-th: acts[perm][inv[k]] == acts[k].
        ranked = inverse_permutations(perms)[:, order]  # [batch, n]
        null[done : done + len(perms)] = _adjacent_mean(C, ranked)
        done += len(perms)
    return _successive_result(observed, null)


def _adjacent_mean(C: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Mean cosine of consecutive tokens of each row of ranked [batch, n] -> [batch]."""
    if ranked.shape[1] < 2:
        return np.full(ranked.shape[0], np.nan)
    return C[ranked[:, :-1], ranked[:, 1:]].mean(axis=1)


def _successive_null_loop(
    C: np.ndarray, acts: np.ndarray, n_permutations: int = 1000, seed: SeedLike = 0
) -> SuccessiveTest:
    """Slow reference for `successive_similarity`: re-sort each shuffled activation vector."""
    rng = make_rng(seed)
    acts = np.asarray(acts, dtype=np.float64)
    order = activation_order(acts)
    observed = float(np.mean([C[order[r], order[r + 1]] for r in range(order.size - 1)]))
    null = []
    for _ in range(n_permutations):
        shuffled_order = activation_order(acts[rng.permutation(acts.size)])
        null.append(np.mean([C[shuffled_order[r], shuffled_order[r + 1]] for r in range(acts.size - 1)]))
    return _successive_result(observed, np.asarray(null))


def _successive_result(observed: float, null: np.ndarray) -> SuccessiveTest:
    greater = summarise_null(observed, null, "greater")
    less = summarise_null(observed, null, "less")
    return SuccessiveTest(
        float(observed),
        float(greater.null_mean),
        float(greater.null_sd),
        float(greater.z),
        float(greater.p),
        float(less.p),
    )
