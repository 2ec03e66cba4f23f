"""Step 4 (top-down): categorical clusters of a neuron's core-token embeddings.

Any estimator with `fit_predict` plugs in through a factory `k -> estimator`, so a Hydra
`_target_` config of a scikit-learn clusterer works as is (the `clustering` config group,
`ClusteringConfig` below).
The paper says "hierarchical classification" without linkage or K: Ward linkage on L2-normalised
vectors with K in [2, 8] chosen by the cosine silhouette is our default, not the paper's.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from sklearn.metrics import silhouette_score

from intraneuron.errors import ConfigError

ClustererFactory = Callable[[int], Any]

# Names under which scikit-learn estimators take their number of clusters.
_K_PARAMS = ("n_clusters", "n_components")
CATEGORY_SOURCES = ("clusterer", "wordnet")


class CosineSpectralClustering(ClusterMixin, BaseEstimator):
    """Spectral clustering on the cosine-similarity graph (negative similarities set to 0).

    scikit-learn's `SpectralClustering(affinity="cosine")` fails (NaN Laplacian) as soon as some
    cosines are negative, which random and real embeddings have.
    """

    # checked when the config is validated (`_check_estimator_params`), not at the first neuron
    _parameter_constraints: ClassVar[dict] = {
        name: SpectralClustering._parameter_constraints[name] for name in ("n_clusters", "random_state", "n_init")
    }

    def __init__(self, n_clusters: int = 8, random_state: int | None = 0, n_init: int = 10):
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.n_init = n_init

    def fit(self, X: np.ndarray, y: None = None) -> CosineSpectralClustering:
        unit = _unit_rows(np.asarray(X, dtype=np.float64))
        affinity = np.clip(unit @ unit.T, 0.0, None)  # [n, n]
        self.labels_ = SpectralClustering(
            n_clusters=self.n_clusters,
            affinity="precomputed",
            random_state=self.random_state,
            n_init=self.n_init,
        ).fit_predict(affinity)
        return self


@dataclass(frozen=True)
class CategoryFit:
    """Category labels of one neuron's core tokens.

    labels: [n_tokens] ints; -1 = no category (HDBSCAN noise, token outside a lexical source).
    k: number of distinct categories; silhouette: cosine silhouette of the labelled tokens (NaN
    when undefined); skipped: why the neuron has no top-down analysis (None when it has one);
    silhouette_by_k: the silhouette of every K that was fitted (NaN where it gave < 2 categories),
    the curve the choice of K was read from.
    """

    labels: np.ndarray
    k: int
    silhouette: float
    skipped: str | None = None
    silhouette_by_k: dict[int, float] = field(default_factory=dict)


def clusterer_factory(target: str | type, **kwargs: Any) -> ClustererFactory:
    """Factory `k -> estimator` for a class (or its dotted path) and constructor kwargs.

    The class gets `n_clusters=k` (or `n_components=k`) when its constructor takes one; classes
    that choose their own K (HDBSCAN, DBSCAN) are built from kwargs alone. The kwargs are bound to
    the constructor and, for scikit-learn estimators, checked against its parameter constraints
    here, so a typo fails before any model is loaded rather than at the first neuron.
    """
    cls = _resolve_class(target)
    _refuse_nested_targets(kwargs, "clustering.estimator")
    params = inspect.signature(cls).parameters
    k_param = next((name for name in _K_PARAMS if name in params), None)
    for name in _K_PARAMS:
        if name in kwargs:
            raise ConfigError(f"clustering.estimator.{name}", kwargs[name], "unset: use clustering.n_categories")
    try:
        inspect.signature(cls).bind_partial(**kwargs)
    except TypeError:
        unknown = next(name for name in kwargs if name not in params)
        raise ConfigError(
            f"clustering.estimator.{unknown}", kwargs[unknown], f"a keyword of {cls.__name__}: {', '.join(params)}"
        ) from None

    def make(k: int) -> Any:
        return cls(**kwargs, **({k_param: k} if k_param else {}))

    _check_estimator_params(make(2), kwargs)
    return make


def _refuse_nested_targets(node: Any, key: str) -> None:
    """A `_target_` below the estimator would be instantiated by Hydra: any callable, `builtins.open`
    included, would be reachable from the command line. Only the estimator's own class is allowed."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            if name == "_target_":
                raise ConfigError(f"{key}._target_", value, "no `_target_` inside the estimator's arguments")
            _refuse_nested_targets(value, f"{key}.{name}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _refuse_nested_targets(value, f"{key}.{i}")


def _check_estimator_params(estimator: Any, kwargs: Mapping[str, Any]) -> None:
    """scikit-learn's own parameter constraints (an unknown linkage, a negative n_init), now."""
    from sklearn.utils._param_validation import InvalidParameterError

    validate = getattr(estimator, "_validate_params", None)
    if validate is None or not hasattr(estimator, "_parameter_constraints"):
        return
    try:
        validate()
    except InvalidParameterError as error:
        name = re.search(r"The '(\w+)' parameter", str(error))
        key = name.group(1) if name else "estimator"
        allowed = str(error).split(" must be ", 1)[-1].split(". Got")[0]
        raise ConfigError(f"clustering.estimator.{key}", kwargs.get(key, "(default)"), allowed) from None


def preset_factory(name: str) -> tuple[ClustererFactory, bool]:
    """(factory, normalize) of the clusterer option `conf/clustering/<name>.yaml`."""
    return ClusteringConfig.from_option(name).factory_and_normalize()


def validate_k_choice(n_categories: int | None, k_range: tuple[int, int]) -> None:
    """Raise ConfigError for a fixed K below 2 or a K range that is not 2 <= low <= high."""
    if n_categories is not None and (
        not isinstance(n_categories, int | np.integer) or n_categories < 2
    ):
        raise ConfigError("clustering.n_categories", n_categories, "None or an integer >= 2")
    low, high = k_range
    if not (isinstance(low, int | np.integer) and isinstance(high, int | np.integer)) or not (
        2 <= low <= high
    ):
        raise ConfigError("clustering.k_range", tuple(k_range), "(low, high) with 2 <= low <= high")


def fit_categories(
    X: np.ndarray,
    make_clusterer: ClustererFactory,
    n_categories: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    normalize: bool = True,
    cosine: np.ndarray | None = None,
) -> CategoryFit:
    """Cluster core-token vectors X [n_tokens, d] into categories.

    n_categories None: fit every K in k_range (capped at n_tokens - 1) and keep the labels with the
    highest cosine silhouette (ties: smaller K). A clusterer that sets its own K is fitted once.
    normalize: L2-normalise rows first (Ward on unit vectors is monotone in cosine).
    cosine: the [n, n] cosine matrix of X when the caller has it already.
    Fewer than 2 categories gives a skipped fit, not an error. Plain agglomerative clusterers
    (no connectivity) build their tree once with scipy and cut it at every K: the same labels as
    refitting scikit-learn for each K, several times faster.
    """
    validate_k_choice(n_categories, k_range)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n_tokens, d], got shape {X.shape}")
    n = X.shape[0]
    if n < 3:
        return CategoryFit(np.full(n, -1), 0, np.nan, f"only {n} core tokens")
    data = _unit_rows(X) if normalize else X
    distances = _cosine_distances(X, cosine)  # [n, n], for silhouettes

    first_k = n_categories if n_categories is not None else k_range[0]
    estimator = make_clusterer(min(first_k, n - 1))
    if _sets_own_k(estimator):
        return _finish(np.asarray(estimator.fit_predict(data)), distances)
    if n_categories is not None:
        if n_categories >= n:
            return CategoryFit(np.full(n, -1), 0, np.nan, f"n_categories={n_categories} >= {n} tokens")
        return _finish(np.asarray(estimator.fit_predict(data)), distances)

    ks = list(range(k_range[0], min(k_range[1], n - 1) + 1))
    cuts = _tree_cuts(estimator, data, ks)
    best: CategoryFit | None = None
    degenerate: CategoryFit | None = None  # what the clusterer gave when no K reached 2 categories
    curve: dict[int, float] = {}
    for k in ks:
        labels = cuts[k] if cuts is not None else make_clusterer(k).fit_predict(data)
        fit = _finish(np.asarray(labels), distances)
        curve[k] = fit.silhouette
        if fit.skipped is not None:
            degenerate = degenerate or fit
        elif best is None or fit.silhouette > best.silhouette:
            best = fit
    if best is None:
        if degenerate is None:
            return CategoryFit(np.full(n, -1), 0, np.nan, "no K in k_range fits these tokens")
        return replace(degenerate, skipped=f"no K in k_range gave 2 categories: {degenerate.skipped}")
    return replace(best, silhouette_by_k=curve)


def categories_from_labels(
    labels: np.ndarray, X: np.ndarray | None = None, cosine: np.ndarray | None = None
) -> CategoryFit:
    """Wrap precomputed labels (e.g. a lexical category source; -1 = uncovered token).
    X (or its cosine matrix) gives the silhouette; without either it is NaN."""
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
    n_covered = int(covered.sum())
    if distances is not None and k <= n_covered - 1:
        sub = distances[np.ix_(covered, covered)]
        silhouette = float(silhouette_score(sub, labels[covered], metric="precomputed"))
    return CategoryFit(labels, k, silhouette)


# scikit-learn metric names that scipy's pdist knows (under its own name).
_PDIST_METRICS = {"euclidean": "euclidean", "l2": "euclidean", "cosine": "cosine",
                  "l1": "cityblock", "manhattan": "cityblock", "cityblock": "cityblock"}


def _tree_cuts(estimator: Any, data: np.ndarray, ks: list[int]) -> dict[int, np.ndarray] | None:
    """Labels for every K from one scipy tree, for a plain AgglomerativeClustering; else None.

    scikit-learn builds the same tree with scipy (`hierarchy.ward` / `linkage`) and cuts it by
    merge order; fcluster's "maxclust" cuts by height, which is the same cut for these monotone
    linkages unless merge heights tie, where cut_tree (merge order) decides.
    """
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
    if params["linkage"] == "ward":
        tree = hierarchy.ward(data)
    else:
        tree = hierarchy.linkage(pdist(data, _PDIST_METRICS[metric]), params["linkage"])
    cuts = {}
    for k in ks:
        labels = hierarchy.fcluster(tree, k, criterion="maxclust") - 1
        if labels.max() + 1 != k:
            labels = hierarchy.cut_tree(tree, n_clusters=[k])[:, 0]
        cuts[k] = labels
    return cuts


def _sets_own_k(estimator: Any) -> bool:
    params = estimator.get_params() if hasattr(estimator, "get_params") else {}
    return not any(name in params for name in _K_PARAMS)


def _resolve_class(target: str | type) -> type:
    if isinstance(target, type):
        cls = target
    else:
        module_name, _, attr = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(
                "clustering.estimator._target_", target, "an importable class with fit_predict"
            ) from None
    if not inspect.isclass(cls) or not hasattr(cls, "fit_predict"):
        raise ConfigError("clustering.estimator._target_", target, "a class with fit_predict")
    return cls


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _cosine_distances(X: np.ndarray | None, cosine: np.ndarray | None = None) -> np.ndarray:
    if cosine is None:
        unit = _unit_rows(X)
        cosine = unit @ unit.T
    distances = np.clip(1.0 - cosine, 0.0, 2.0)  # [n, n]
    np.fill_diagonal(distances, 0.0)  # silhouette_score checks the diagonal is exactly 0
    return distances


@dataclass
class ClusteringConfig:
    """The `clustering` config group (conf/clustering/*.yaml): where a neuron's categories come from."""

    categories: str = "clusterer"  # clusterer: cluster the vectors | wordnet: lexical supersenses
    estimator: Any = None  # clusterer: a `_target_` config of any class with fit_predict
    normalize: bool = True  # L2-normalise the vectors before clustering
    n_categories: int | None = None  # None: K chosen by cosine silhouette over k_range
    k_range: list[int] = field(default_factory=lambda: [2, 8])

    @classmethod
    def from_option(cls, name: str) -> ClusteringConfig:
        """The config of the option `conf/clustering/<name>.yaml`."""
        from omegaconf import OmegaConf

        from intraneuron.paths import CONF_DIR

        path = CONF_DIR / "clustering" / f"{name}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError("clustering", name, options)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.load(path)))

    def validate(self) -> None:
        if self.categories not in CATEGORY_SOURCES:
            raise ConfigError("clustering.categories", self.categories, CATEGORY_SOURCES)
        if len(self.k_range) != 2:
            raise ConfigError("clustering.k_range", self.k_range, "[low, high]")
        validate_k_choice(self.n_categories, tuple(self.k_range))
        if self.categories == "clusterer":
            self.factory()  # resolves the class and binds its arguments
        elif self.estimator is not None:  # it would be ignored, `_target_` and all
            raise ConfigError(
                "clustering.estimator", self.estimator, f"null when clustering.categories={self.categories!r}"
            )

    def factory(self) -> ClustererFactory:
        """k -> estimator, from `estimator` (any `_target_` class with fit_predict)."""
        if not isinstance(self.estimator, Mapping) or "_target_" not in self.estimator:
            raise ConfigError(
                "clustering.estimator", self.estimator, "a config with `_target_` (a class with fit_predict)"
            )
        kwargs = dict(self.estimator)
        return clusterer_factory(kwargs.pop("_target_"), **kwargs)

    def factory_and_normalize(self) -> tuple[ClustererFactory, bool]:
        return self.factory(), self.normalize

    def category_names(self) -> list[str] | None:
        """Name of each fixed category label (WordNet's supersenses), or None for clusters."""
        if self.categories != "wordnet":
            return None
        from intraneuron.categories.wordnet import LEXNAMES

        return list(LEXNAMES)

    def labeller(self, token_texts: list[str]) -> Callable[[np.ndarray], np.ndarray] | None:
        """ids -> WordNet supersense labels (-1 = not in WordNet), or None to cluster the vectors."""
        if self.categories != "wordnet":
            return None
        from intraneuron.categories.wordnet import label_tokens

        labels, _, _ = label_tokens(token_texts)  # [vocab]

        def label(ids: np.ndarray) -> np.ndarray:
            return labels[ids]

        return label
