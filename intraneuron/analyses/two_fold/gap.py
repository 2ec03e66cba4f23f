"""Choosing K: Tibshirani's gap statistic against reference datasets clustered like the data, and
the one-pass cuts of an agglomerative tree at every K that make the whole K-curve (references
included) cost one fit per dataset.

The references are the null "one unimodal cloud": drawn in the principal-component space of the
vectors *before* normalisation, then L2-normalised like them (`clustering.reference`):
- `sd_box` (default): uniform in the box aligned with the principal components, each side +-sqrt(3)
  SD of its component, so the references have the vectors' mean and covariance.
- `range_box`: Tibshirani's second reference, the box spanning each component's range (min..max).
- `gaussian`: a Gaussian with the vectors' mean and covariance.
Why these references, and what they measured against the earlier one: docs/derivations.md
("Choosing K: the gap statistic's references").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist
from sklearn.cluster import AgglomerativeClustering

from intraneuron.analyses.two_fold.clusterers import ClustererFactory, _unit_rows
from intraneuron.stats.permutation import SeedLike, make_rng

# scikit-learn metric names that scipy's pdist knows (under its own name).
_PDIST_METRICS = {"euclidean": "euclidean", "l2": "euclidean", "cosine": "cosine",
                  "l1": "cityblock", "manhattan": "cityblock", "cityblock": "cityblock"}


def gap_statistic(
    X: np.ndarray,
    labels_by_k: dict[int, np.ndarray],
    make_clusterer: ClustererFactory,
    estimator: Any,
    metric: str,
    n_references: int = 10,
    seed: SeedLike = 0,
    normalize: bool = False,
    reference: str = "sd_box",
) -> tuple[dict[int, float], dict[int, float]]:
    """Gap(K) = mean_b log W*_Kb - log W_K and s_K = sd_b(log W*_Kb) sqrt(1 + 1/B), K = 1 and every
    K of labels_by_k (Tibshirani, Walther & Hastie 2001).

    X [n, d]: the vectors before the clusterer's normalisation; normalize: the clusterer sees them
    L2-normalised. W_K is the pooled within-cluster sum of squares of what the clusterer sees (unit
    rows for a cosine metric, where it is proportional to the summed cosine distances). The B
    reference datasets are drawn from X's principal components as `reference` says (module
    docstring), normalised like X, and clustered by the same procedure (one tree each for plain
    agglomerative clusterers).
    """
    rng = make_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    ks = sorted(labels_by_k)
    mean = X.mean(axis=0)
    centred = X - mean  # [n, d]
    # principal components from the [n, n] Gram matrix (n << d): scores = U sqrt(eigenvalues)
    eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
    keep = eigenvalues > max(eigenvalues[-1], 0.0) * 1e-10
    if not keep.any():
        keep[-1] = True
    scale = np.sqrt(np.clip(eigenvalues[keep], 0.0, None))
    scores = eigenvectors[:, keep] * scale  # [n, r]
    vt = (eigenvectors[:, keep].T @ centred) / np.where(scale > 0, scale, 1.0)[:, None]  # [r, d]
    # Norms, inner products and Euclidean distances are unchanged by a rotation, so mean + z vt is
    # represented in the orthonormal basis (vt, the part of the mean outside their span): r + 1
    # coordinates. Other metrics (cityblock) are not rotation-invariant and get the d coordinates.
    mean_in_span = vt @ mean  # [r]
    mean_outside = float(np.sqrt(max(mean @ mean - mean_in_span @ mean_in_span, 0.0)))
    sd = scores.std(axis=0)  # [r]
    low, high = scores.min(axis=0), scores.max(axis=0)
    spec = _tree_spec(estimator)

    def draw() -> np.ndarray:
        """One reference dataset as the clusterer sees it, up to a rotation: [n, r + 1] or [n, d]."""
        if reference == "gaussian":
            z = rng.standard_normal(scores.shape) * sd  # [n, r]
        elif reference == "range_box":
            z = rng.uniform(low, high, size=scores.shape)
        else:  # sd_box: a uniform of variance sd^2 spans +-sqrt(3) sd
            z = rng.uniform(-1.0, 1.0, size=scores.shape) * (np.sqrt(3.0) * sd)
        if metric in ("euclidean", "cosine"):
            raw = np.c_[z + mean_in_span, np.full(n, mean_outside)]
        else:
            raw = mean + z @ vt
        return _unit_rows(raw) if normalize else raw

    view = _unit_rows(X) if normalize else X
    geometry = _unit_rows(view) if metric == "cosine" else view
    log_w = _log_within_by_k(geometry, [np.zeros(n, dtype=np.intp), *(labels_by_k[k] for k in ks)])
    ref_log_w = np.empty((n_references, 1 + len(ks)))  # [B, 1 + len(ks)]
    for b in range(n_references):
        ref = draw()
        ref_geometry = _unit_rows(ref) if metric == "cosine" else ref
        if spec is not None:
            tree = hierarchy.ward(ref) if spec[0] == "ward" else hierarchy.linkage(
                pdist(ref, spec[1]), spec[0])  # fmt: skip
            cuts = _cut_by_merge_order(tree, ks)
        else:
            cuts = {k: np.asarray(make_clusterer(k).fit_predict(ref)) for k in ks}
        ref_log_w[b] = _log_within_by_k(
            ref_geometry, [np.zeros(n, dtype=np.intp), *(cuts[k] for k in ks)]
        )
    all_ks = [1, *ks]
    expected = ref_log_w.mean(axis=0)
    spread = ref_log_w.std(axis=0) * np.sqrt(1.0 + 1.0 / n_references)
    gap = {k: float(expected[i] - log_w[i]) for i, k in enumerate(all_ks)}
    gap_sd = {k: float(spread[i]) for i, k in enumerate(all_ks)}
    return gap, gap_sd


def _log_within_by_k(X: np.ndarray, labellings: list[np.ndarray]) -> np.ndarray:
    """log pooled within-cluster sum of squares of X [n, d] under each labelling (labels >= 0,
    -1 tokens left out): sum |x|^2 - sum_c |sum_c x|^2 / n_c, every labelling in one product."""
    blocks, sizes, owners, norms = [], [], [], []
    squares = np.einsum("ij,ij->i", X, X)  # [n]
    for j, labels in enumerate(labellings):
        labels = np.asarray(labels)
        keep = labels >= 0
        _, index = np.unique(labels[keep], return_inverse=True)
        onehot = np.zeros((labels.size, int(index.max(initial=-1)) + 1))
        onehot[np.flatnonzero(keep), index] = 1.0
        blocks.append(onehot)
        sizes.append(onehot.sum(axis=0))
        owners.append(np.full(onehot.shape[1], j))
        norms.append(squares[keep].sum())
    onehot = np.concatenate(blocks, axis=1)  # [n, total clusters]
    sums = onehot.T @ X  # [total clusters, d]
    between = np.einsum("ij,ij->i", sums, sums) / np.concatenate(sizes)
    within = np.asarray(norms) - np.bincount(
        np.concatenate(owners), weights=between, minlength=len(labellings)
    )
    return np.log(np.maximum(within, 1e-300))


def choose_gap_k(gap: dict[int, float], gap_sd: dict[int, float]) -> int:
    """The smallest K with Gap(K) >= Gap(K') - s_K' (K' the next K considered); the largest K
    when no K qualifies."""
    ks = sorted(gap)
    for k, following in zip(ks, ks[1:], strict=False):
        if gap[k] >= gap[following] - gap_sd[following]:
            return k
    return ks[-1]


def _tree_cuts(estimator: Any, data: np.ndarray, ks: list[int]) -> dict[int, np.ndarray] | None:
    """Labels for every K from one scipy tree, for a plain AgglomerativeClustering; else None.

    scikit-learn builds the same tree with scipy (`hierarchy.ward` / `linkage`) and cuts it by
    merge order, as `_cut_by_merge_order` does (for all K from one pass).
    """
    spec = _tree_spec(estimator)
    if spec is None:
        return None
    linkage, metric = spec
    if linkage == "ward":
        tree = hierarchy.ward(data)
    else:
        tree = hierarchy.linkage(pdist(data, metric), linkage)
    return _cut_by_merge_order(tree, ks)


def _cut_by_merge_order(tree: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """Labels 0..K-1 of the K clusters left after the first n - K merges, for every K in ks.

    Node n + i is made by merge i, so a leaf's cluster after n - K merges is its highest ancestor
    with id < 2n - K: climb once for the largest K, then each smaller K adds one merge.
    """
    n = tree.shape[0] + 1
    children = tree[:, :2].astype(np.intp)  # [n - 1, 2]
    parent = np.full(2 * n - 1, 2 * n - 1, dtype=np.intp)  # the root's parent: past every limit
    parent[children[:, 0]] = np.arange(n, 2 * n - 1)
    parent[children[:, 1]] = np.arange(n, 2 * n - 1)
    k_max = max(ks)
    limit = 2 * n - k_max
    rep = np.arange(n)
    while True:
        up = parent[rep]
        move = up < limit
        if not move.any():
            break
        rep = np.where(move, up, rep)
    cuts = {}
    for k in range(k_max, min(ks) - 1, -1):
        if k < k_max:  # merge n - k - 1 joins two current clusters into node 2n - k - 1
            a, b = children[n - k - 1]
            rep = np.where((rep == a) | (rep == b), 2 * n - k - 1, rep)
        if k in ks:
            cuts[k] = np.unique(rep, return_inverse=True)[1]
    return cuts


def _tree_spec(estimator: Any) -> tuple[str, str] | None:
    """(linkage, pdist metric) of a plain AgglomerativeClustering scipy can build; else None."""
    if not isinstance(estimator, AgglomerativeClustering):
        return None
    params = estimator.get_params()
    metric = params.get("metric", "euclidean")
    if (
        params.get("connectivity") is not None
        or params.get("distance_threshold") is not None
        or params["linkage"] not in ("ward", "average", "complete", "single")
        or not isinstance(metric, str)
        or metric not in _PDIST_METRICS
        or (params["linkage"] == "ward" and _PDIST_METRICS[metric] != "euclidean")
    ):
        return None
    return params["linkage"], _PDIST_METRICS[metric]
