"""Step 4 (top-down): categorical clusters of a neuron's core-token embeddings.

Any estimator with `fit_predict` plugs in through a factory `k -> estimator`, so a Hydra
`_target_` config of a scikit-learn clusterer works as is (the `clustering` config group,
`ClusteringConfig` in `clusterers`; K by the gap statistic of `gap`).
The paper says "hierarchical classification" without linkage or K: Ward linkage on L2-normalised
vectors with K chosen by Tibshirani's gap statistic over K in 1..8 is our default, not the paper's.
K = 1 ("no categorical structure") is a possible answer of the gap statistic (Tibshirani, Walther &
Hastie 2001): the neuron then has no top-down analysis. `k_choice="silhouette"` keeps the older rule
(best silhouette over k_range, K >= 2). Silhouettes use the distance the clusterer uses: Euclidean
on the vectors it sees (sqrt(2 - 2 cos) for Ward on unit vectors), cosine distance for the
`average_cosine` / `complete_cosine` presets and cosine spectral clustering.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

from intraneuron.analyses.two_fold.clusterers import (
    CATEGORY_SOURCES,
    K_CHOICES,
    REFERENCES,
    ClustererFactory,
    ClusteringConfig,
    CosineSpectralClustering,
    _sets_own_k,
    _unit_rows,
    clusterer_factory,
    preset_factory,
    validate_k_choice,
)
from intraneuron.analyses.two_fold.gap import (
    _PDIST_METRICS,
    _cut_by_merge_order,
    _log_within_by_k,
    _tree_cuts,
    choose_gap_k,
    gap_statistic,
)
from intraneuron.stats.permutation import SeedLike

# Public names, with those that live in `clusterers` and `gap` (and the gap helpers tests check).
__all__ = [
    "CATEGORY_SOURCES", "K_CHOICES", "NO_STRUCTURE", "REFERENCES", "CategoryFit", "ClustererFactory",
    "ClusteringConfig", "CosineSpectralClustering", "_cut_by_merge_order", "_log_within_by_k",
    "categories_from_labels", "choose_gap_k", "clusterer_factory", "fit_categories",
    "gap_statistic", "preset_factory", "silhouette_precomputed", "validate_k_choice",
]  # fmt: skip

NO_STRUCTURE = "K=1: no categorical structure (gap statistic)"


@dataclass(frozen=True)
class CategoryFit:
    """Category labels of one neuron's core tokens.

    labels: [n_tokens] ints; -1 = no category (HDBSCAN noise, token outside a lexical source).
    k: number of distinct categories (1 when the gap statistic finds no categorical structure:
    labels are then all 0); silhouette: silhouette of the labelled tokens in the clusterer's own
    distance (cosine distance for precomputed labels; NaN when undefined); skipped: why the neuron
    has no top-down analysis (None when it has one).
    The K-curve (empty for a fixed K or a clusterer that sets its own K):
    silhouette_by_k: the silhouette of every K >= 2 that was fitted (NaN where it gave < 2
    categories); labels_by_k: the labels of every K >= 2 fitted; gap_by_k / gap_sd_by_k: the gap
    statistic Gap(K) and its s_K = sd_K sqrt(1 + 1/B) for every K considered, K = 1 included
    (k_choice="gap" only).
    """

    labels: np.ndarray
    k: int
    silhouette: float
    skipped: str | None = None
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    labels_by_k: dict[int, np.ndarray] = field(default_factory=dict)
    gap_by_k: dict[int, float] = field(default_factory=dict)
    gap_sd_by_k: dict[int, float] = field(default_factory=dict)


def fit_categories(
    X: np.ndarray,
    make_clusterer: ClustererFactory,
    n_categories: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    normalize: bool = True,
    cosine: np.ndarray | None = None,
    k_choice: str = "gap",
    n_references: int = 10,
    seed: SeedLike = 0,
    reference: str = "sd_box",
) -> CategoryFit:
    """Cluster core-token vectors X [n_tokens, d] into categories.

    n_categories None: fit every K in k_range (capped at n_tokens - 1), then
    - k_choice "gap": Tibshirani's gap statistic over K in {1} + k_range with n_references
      reference datasets drawn from the principal components of X as `reference` says, then
      normalised like X (`gap`; seeded by `seed`); the smallest K with
      Gap(K) >= Gap(K') - s_K' (K' the next K) is chosen. K = 1 gives a skipped fit
      (`NO_STRUCTURE`) with all labels 0: no categorical structure.
    - k_choice "silhouette": the labels with the highest silhouette (ties: smaller K), K >= 2.
    A clusterer that sets its own K is fitted once. n_categories an int: that K, no curve.
    normalize: L2-normalise rows first (Ward on unit vectors is monotone in cosine).
    cosine: the [n, n] cosine matrix of X when the caller has it already.
    Silhouettes use the clusterer's distance (`_clusterer_metric`). Fewer than 2 categories gives a
    skipped fit, not an error. Plain agglomerative clusterers (no connectivity) build one tree per
    dataset with scipy and cut it at every K: the same labels as refitting scikit-learn for each K,
    so the whole K-curve (references included) costs one fit per dataset.
    """
    validate_k_choice(n_categories, k_range, k_choice, n_references, reference)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n_tokens, d], got shape {X.shape}")
    n = X.shape[0]
    if n < 3:
        return CategoryFit(np.full(n, -1), 0, np.nan, f"only {n} core tokens")
    data = _unit_rows(X) if normalize else X

    first_k = n_categories if n_categories is not None else k_range[0]
    estimator = make_clusterer(min(first_k, n - 1))
    metric = _clusterer_metric(estimator)
    distances = _distances(X, data, metric, normalize, cosine)  # [n, n], for silhouettes
    if _sets_own_k(estimator):
        return _finish(np.asarray(estimator.fit_predict(data)), distances)
    if n_categories is not None:
        if n_categories >= n:
            return CategoryFit(np.full(n, -1), 0, np.nan, f"n_categories={n_categories} >= {n} tokens")
        return _finish(np.asarray(estimator.fit_predict(data)), distances)

    ks = list(range(k_range[0], min(k_range[1], n - 1) + 1))
    if not ks:
        return CategoryFit(np.full(n, -1), 0, np.nan, "no K in k_range fits these tokens")
    cuts = _tree_cuts(estimator, data, ks)
    labels_by_k = {k: np.asarray(cuts[k] if cuts is not None else make_clusterer(k).fit_predict(data))
                   for k in ks}  # fmt: skip
    fits = {k: _finish(labels, distances) for k, labels in labels_by_k.items()}
    curve = {k: fit.silhouette for k, fit in fits.items()}
    labels_by_k = {k: fit.labels for k, fit in fits.items()}

    if k_choice == "gap":
        gap, gap_sd = gap_statistic(
            X, labels_by_k, make_clusterer, estimator, metric, n_references, seed, normalize, reference
        )
        chosen = choose_gap_k(gap, gap_sd)
        extra = {
            "silhouette_by_k": curve,
            "labels_by_k": labels_by_k,
            "gap_by_k": gap,
            "gap_sd_by_k": gap_sd,
        }
        if chosen == 1:
            return CategoryFit(np.zeros(n, dtype=np.int64), 1, np.nan, NO_STRUCTURE, **extra)
        fit = fits[chosen]
        if fit.skipped is not None:
            fit = replace(fit, skipped=f"gap chose K={chosen}: {fit.skipped}")
        return replace(fit, **extra)

    best: CategoryFit | None = None
    degenerate: CategoryFit | None = None  # what the clusterer gave when no K reached 2 categories
    for k in ks:
        fit = fits[k]
        if fit.skipped is not None:
            degenerate = degenerate or fit
        elif best is None or fit.silhouette > best.silhouette:
            best = fit
    if best is None:
        return replace(
            degenerate, skipped=f"no K in k_range gave 2 categories: {degenerate.skipped}",
            silhouette_by_k=curve, labels_by_k=labels_by_k,
        )  # fmt: skip
    return replace(best, silhouette_by_k=curve, labels_by_k=labels_by_k)


def categories_from_labels(
    labels: np.ndarray, X: np.ndarray | None = None, cosine: np.ndarray | None = None
) -> CategoryFit:
    """Wrap precomputed labels (e.g. a lexical category source; -1 = uncovered token).
    X (or its cosine matrix) gives the cosine silhouette; without either it is NaN."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [n_tokens], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (-1 = uncovered), got dtype {labels.dtype}")
    distances = None
    if X is not None or cosine is not None:
        distances = _cosine_distances(None if X is None else np.asarray(X, np.float64), cosine)
    return _finish(labels, distances)


def _finish(labels: np.ndarray, distances: np.ndarray | None) -> CategoryFit:
    labels = labels.astype(np.int64)
    covered = labels >= 0
    k = int(np.unique(labels[covered]).size)
    if k < 2:
        return CategoryFit(labels, k, np.nan, f"{k} category among the core tokens (need 2)")
    silhouette = np.nan
    if distances is not None:
        silhouette = silhouette_precomputed(distances[np.ix_(covered, covered)], labels[covered])
    return CategoryFit(labels, k, silhouette)


def silhouette_precomputed(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette from a [n, n] distance matrix, as sklearn's silhouette_score(metric=
    "precomputed") (singletons score 0), in one matrix product; NaN unless 2 <= K <= n - 1."""
    _, index = np.unique(labels, return_inverse=True)
    n, k = index.size, int(index.max(initial=-1)) + 1
    if not 2 <= k <= n - 1:
        return np.nan
    sizes = np.bincount(index, minlength=k).astype(np.float64)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), index] = 1.0
    sums = distances @ onehot  # [n, k]
    own_size = sizes[index]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = sums[np.arange(n), index] / (own_size - 1)
        mean_to = sums / sizes
        mean_to[np.arange(n), index] = np.inf
        b = mean_to.min(axis=1)
        s = (b - a) / np.maximum(a, b)
    s = np.where(own_size > 1, np.nan_to_num(s), 0.0)
    return float(s.mean())


def _clusterer_metric(estimator: Any) -> str:
    """The distance a clusterer works in, as a pdist name: its `metric` (or `affinity`) when a
    known string, "cosine" for cosine spectral clustering, else "euclidean" (Ward, k-means...)."""
    if isinstance(estimator, CosineSpectralClustering):
        return "cosine"
    params = estimator.get_params() if hasattr(estimator, "get_params") else {}
    metric = params.get("metric", params.get("affinity", "euclidean"))
    return _PDIST_METRICS.get(metric, "euclidean") if isinstance(metric, str) else "euclidean"


def _distances(
    X: np.ndarray, data: np.ndarray, metric: str, normalize: bool, cosine: np.ndarray | None
) -> np.ndarray:
    """[n, n] distances of the clusterer's geometry; from the cosine matrix when it determines them."""
    if metric == "cosine":
        return _cosine_distances(X, cosine)
    if metric == "euclidean" and normalize:  # unit vectors: |u - v| = sqrt(2 - 2 cos)
        if cosine is None:
            cosine = data @ data.T
        distances = np.sqrt(np.clip(2.0 - 2.0 * cosine, 0.0, 4.0))
    else:
        distances = squareform(pdist(data, metric))
    np.fill_diagonal(distances, 0.0)
    return distances


def _cosine_distances(X: np.ndarray | None, cosine: np.ndarray | None = None) -> np.ndarray:
    if cosine is None:
        unit = _unit_rows(X)
        cosine = unit @ unit.T
    distances = np.clip(1.0 - cosine, 0.0, 2.0)  # [n, n]
    np.fill_diagonal(distances, 0.0)  # silhouette_score checks the diagonal is exactly 0
    return distances
