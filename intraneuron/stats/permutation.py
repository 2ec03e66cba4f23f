"""Shared machinery for permutation nulls: seeded permutation batches and null summaries.

Every test in this package shuffles the activations of one neuron's core tokens. Drawing the
permutations in batches with `Generator.permuted` consumes the random stream exactly like successive
`Generator.permutation(n)` calls, so the slow loop references in the tests reproduce the same draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

SeedLike = int | Sequence[int] | np.random.SeedSequence | np.random.Generator | None
Alternative = Literal["greater", "less", "two-sided"]

# Permutations that rebuild the observed grouping give the observed statistic up to rounding:
# such ties must count as "at least as extreme", whatever the summation order.
TIE_TOLERANCE = 1e-10

# Batches keep the gathered [batch, n_pairs] blocks small enough to stay in cache; measured on
# 2 cores, 32 permutations per batch gathers about twice as fast as 128 or more.
DEFAULT_BATCH = 32


def make_rng(seed: SeedLike) -> np.random.Generator:
    """`np.random.default_rng(seed)`; a Generator passes through unchanged (streams continue)."""
    return np.random.default_rng(seed)


def side_stream(rng: np.random.Generator, key: int) -> np.random.Generator:
    """An independent child stream of rng's seed, named by key, that leaves rng untouched.

    Unlike `rng.spawn`, the parent's spawn counter does not move, so the streams other code spawns
    later stay the same whether this one is drawn or not. Keys count down from 2**32 - 1, far from
    spawn's 0, 1, 2... A generator without a seed sequence gives a child seeded from its stream.
    """
    seq = rng.bit_generator.seed_seq
    if not isinstance(seq, np.random.SeedSequence):
        return np.random.default_rng(rng.integers(2**63))
    child = np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, key), pool_size=seq.pool_size)
    return np.random.Generator(type(rng.bit_generator)(child))


def permutation_batches(
    rng: np.random.Generator, n_items: int, n_permutations: int, batch_size: int = DEFAULT_BATCH
) -> Iterator[np.ndarray]:
    """Yield [batch, n_items] int arrays; row p is the p-th permutation of the stream."""
    base = np.arange(n_items)
    for start in range(0, n_permutations, batch_size):
        rows = min(batch_size, n_permutations - start)
        yield rng.permuted(np.broadcast_to(base, (rows, n_items)), axis=1)


def inverse_permutations(perms: np.ndarray) -> np.ndarray:
    """Row-wise inverse: inv[p, perms[p, i]] = i.  # [batch, n_items]"""
    inv = np.empty_like(perms)
    np.put_along_axis(inv, perms, np.broadcast_to(np.arange(perms.shape[1]), perms.shape), axis=1)
    return inv


class PairGather:
    """Gathers M[idx[p, rows[t]], idx[p, cols[t]]] for batches of index rows idx [batch, n].

    The index and value buffers are allocated once and reused, so a neuron's thousand
    permutations cost gathers only. The returned [batch, T] array is overwritten by the next call.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n_items: int, batch_size: int):
        self.rows = np.asarray(rows, dtype=np.intp)
        self.cols = np.asarray(cols, dtype=np.intp)
        self.n_items = n_items
        self._flat = np.empty((batch_size, self.rows.size), dtype=np.intp)
        self._values = np.empty((batch_size, self.rows.size))

    def __call__(self, matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
        b = idx.shape[0]
        flat, values = self._flat[:b], self._values[:b]
        np.take(idx * self.n_items, self.rows, axis=1, out=flat)
        flat += np.take(idx, self.cols, axis=1)
        np.take(matrix.reshape(-1), flat, out=values)
        return values


@dataclass(frozen=True)
class NullSummary:
    """Observed statistic(s) against a permutation null (arrays share the statistic's shape)."""

    observed: np.ndarray
    null_mean: np.ndarray
    null_sd: np.ndarray
    z: np.ndarray
    p: np.ndarray
    n_permutations: int


def count_as_extreme(null: np.ndarray, observed: np.ndarray, alternative: Alternative) -> np.ndarray:
    """Number of null draws at least as extreme as `observed` (ties count). null: [P, ...]."""
    tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(observed))
    if alternative == "greater":
        hits = null >= observed - tol
    elif alternative == "less":
        hits = null <= observed + tol
    elif alternative == "two-sided":
        hits = np.abs(null) >= np.abs(observed) - tol
    else:
        raise ValueError(f"alternative={alternative!r}: expected 'greater', 'less' or 'two-sided'")
    return hits.sum(axis=0)


def summarise_null(
    observed: np.ndarray | float, null: np.ndarray, alternative: Alternative = "greater"
) -> NullSummary:
    """z = (observed - mean_null) / sd_null (ddof=1) and p = (1 + #extreme) / (1 + P).

    NaN statistics (e.g. a one-token segment) give NaN z and p.
    """
    observed = np.asarray(observed, dtype=float)
    null = np.asarray(null, dtype=float)  # [P, ...]
    n_perm = null.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = null.mean(axis=0)
        sd = null.std(axis=0, ddof=1) if n_perm > 1 else np.full_like(mean, np.nan)
        z = (observed - mean) / sd
        # A constant null (sd 0) gives an infinite or undefined z: report NaN instead of inf.
        z = np.where(np.isfinite(z), z, np.nan)
        p = (1.0 + count_as_extreme(null, observed, alternative)) / (1.0 + n_perm)
    p = np.where(np.isnan(observed), np.nan, p)
    return NullSummary(observed, mean, sd, z, p, n_perm)
