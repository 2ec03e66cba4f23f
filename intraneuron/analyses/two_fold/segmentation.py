"""Step 7 (bottom-up): cut a neuron's core tokens into activation segments.

Every scheme returns labels [n_tokens] in the tokens' own order, 0 = the highest-activation
segment. The paper's scheme is unknown: S = 10 equal-count segments is our default, not the
paper's; equal-width bins, Jenks natural breaks, 1-D k-means and the "top_fraction" split
(a >= top_fraction * max against the rest) are the variants of paper_methods.md 1.4 step 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from intraneuron.errors import ConfigError

SCHEMES = ("equal_count", "equal_width", "jenks", "kmeans", "top_fraction")


def validate_segmentation(scheme: str, n_segments: int, top_fraction: float) -> None:
    """Raise ConfigError naming the `segmentation.*` key of the first bad setting."""
    if scheme not in SCHEMES:
        raise ConfigError("segmentation.scheme", scheme, SCHEMES)
    if not isinstance(n_segments, int | np.integer) or n_segments < 2:
        raise ConfigError("segmentation.n_segments", n_segments, "an integer >= 2")
    if not 0.0 < top_fraction < 1.0:
        raise ConfigError("segmentation.top_fraction", top_fraction, "a fraction in (0, 1)")


@dataclass
class SegmentationConfig:
    """The `segmentation` config group (conf/segmentation/*.yaml): how the activation range is cut."""

    scheme: str = "equal_count"
    n_segments: int = 10
    top_fraction: float = 0.9

    def validate(self) -> None:
        validate_segmentation(self.scheme, self.n_segments, self.top_fraction)


def segment(
    acts: np.ndarray,
    scheme: str = "equal_count",
    n_segments: int = 10,
    top_fraction: float = 0.9,
    seed: int = 0,
) -> np.ndarray:
    """Segment labels [n_tokens] (0 = highest) under the named scheme ("top_fraction" has 2 segments)."""
    validate_segmentation(scheme, n_segments, top_fraction)
    acts = _as_activations(acts)
    if scheme == "equal_count":
        return equal_count_segments(acts, n_segments)
    if scheme == "equal_width":
        return equal_width_segments(acts, n_segments)
    if scheme == "jenks":
        return jenks_segments(acts, n_segments)
    if scheme == "kmeans":
        return kmeans_segments(acts, n_segments, seed)
    return top_segments(acts, top_fraction)


def n_segments_of(scheme: str, n_segments: int) -> int:
    """How many segment labels a scheme can produce."""
    return 2 if scheme == "top_fraction" else n_segments


def activation_order(acts: np.ndarray) -> np.ndarray:
    """Token indices by activation, descending; ties keep token order."""
    return np.argsort(-_as_activations(acts), kind="stable")


def equal_count_segments(acts: np.ndarray, n_segments: int = 10) -> np.ndarray:
    """S segments of the activation ranking whose sizes differ by at most one."""
    acts = _as_activations(acts)
    n = acts.size
    labels = np.empty(n, dtype=np.int64)
    labels[activation_order(acts)] = np.arange(n) * n_segments // max(n, 1)
    return labels


def equal_width_segments(acts: np.ndarray, n_segments: int = 10) -> np.ndarray:
    """S bins of equal width over [min, max]; the maximum is in segment 0 (bins may be empty)."""
    acts = _as_activations(acts)
    top, span = acts.max(), np.ptp(acts)
    if span == 0:
        return np.zeros(acts.size, dtype=np.int64)
    bins = np.floor((top - acts) / span * n_segments).astype(np.int64)
    return np.minimum(bins, n_segments - 1)


def jenks_segments(acts: np.ndarray, n_segments: int = 5) -> np.ndarray:
    """Jenks natural breaks: the exact split of the sorted activations into S contiguous,
    non-empty segments with the smallest total within-segment sum of squares (dynamic programme,
    O(n^2 S) in vectorised rows). With fewer tokens than S, every token is its own segment."""
    acts = _as_activations(acts)
    n = acts.size
    order = activation_order(acts)
    n_groups = min(n_segments, n)
    starts = _optimal_breaks(acts[order], n_groups)  # [n_groups] first sorted position of each
    sorted_labels = np.zeros(n, dtype=np.int64)
    sorted_labels[starts[1:]] = 1
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.cumsum(sorted_labels)
    return labels


def _optimal_breaks(values: np.ndarray, n_groups: int) -> np.ndarray:
    """Start positions of the least-squares partition of `values` (any fixed order) into groups."""
    n = values.size
    s1 = np.concatenate([[0.0], np.cumsum(values)])
    s2 = np.concatenate([[0.0], np.cumsum(values**2)])
    i = np.arange(n + 1)[:, None]  # segment [i, j)
    j = np.arange(n + 1)[None, :]
    length = j - i
    with np.errstate(divide="ignore", invalid="ignore"):
        sse = s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / length  # [n+1, n+1]
    sse = np.where(length > 0, np.maximum(sse, 0.0), np.inf)

    # cost[g, j]: best cost of the first j values in g+1 groups; back[g, j]: start of the last group.
    cost = np.full((n_groups, n + 1), np.inf)
    back = np.zeros((n_groups, n + 1), dtype=np.int64)
    cost[0] = sse[0]
    for g in range(1, n_groups):
        candidates = cost[g - 1][:, None] + sse  # [i, j]: last group is [i, j)
        back[g] = np.argmin(candidates, axis=0)
        cost[g] = candidates[back[g], np.arange(n + 1)]
    starts = np.zeros(n_groups, dtype=np.int64)
    end = n
    for g in range(n_groups - 1, 0, -1):
        starts[g] = back[g, end]
        end = starts[g]
    return starts


def kmeans_segments(acts: np.ndarray, n_segments: int = 5, seed: int = 0) -> np.ndarray:
    """1-D k-means (scikit-learn, n_init=10, seeded), segments renumbered by centre descending."""
    acts = _as_activations(acts)
    n_clusters = min(n_segments, np.unique(acts).size)
    if n_clusters < 2:
        return np.zeros(acts.size, dtype=np.int64)
    model = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(acts[:, None])
    rank_of_cluster = np.argsort(np.argsort(-model.cluster_centers_[:, 0]))
    return rank_of_cluster[model.labels_].astype(np.int64)


def top_segments(acts: np.ndarray, top_fraction: float = 0.9) -> np.ndarray:
    """0 for tokens with a >= top_fraction * max (always at least the maximum), 1 for the rest."""
    acts = _as_activations(acts)
    threshold = min(top_fraction * acts.max(), acts.max())
    return np.where(acts >= threshold, 0, 1).astype(np.int64)


def within_segment_sse(acts: np.ndarray, labels: np.ndarray) -> float:
    """Total within-segment sum of squared deviations (what Jenks and k-means minimise)."""
    acts = _as_activations(acts)
    labels = np.asarray(labels)
    sums = np.bincount(labels, weights=acts)
    counts = np.bincount(labels)
    used = counts > 0
    return float(np.sum(acts**2) - np.sum(sums[used] ** 2 / counts[used]))


def _as_activations(acts: np.ndarray) -> np.ndarray:
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 1 or acts.size == 0 or not np.isfinite(acts).all():
        raise ValueError(f"activations must be a non-empty finite 1-D array, got shape {acts.shape}")
    return acts
