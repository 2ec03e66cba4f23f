"""Which clusterer, and how it is configured: the `clustering` config group (`ClusteringConfig`,
conf/clustering/*.yaml) and the factories `k -> estimator` built from a Hydra `_target_`, checked
when the config is validated rather than at the first neuron. Also the cosine spectral clusterer
that scikit-learn lacks."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import SpectralClustering

from intraneuron.errors import ConfigError

ClustererFactory = Callable[[int], Any]

# Names under which scikit-learn estimators take their number of clusters.
_K_PARAMS = ("n_clusters", "n_components")
CATEGORY_SOURCES = ("clusterer", "wordnet")
K_CHOICES = ("gap", "silhouette")
# How the gap statistic draws its reference datasets (`gap.gap_statistic`).
REFERENCES = ("sd_box", "range_box", "gaussian")


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


def validate_k_choice(
    n_categories: int | None,
    k_range: tuple[int, int],
    k_choice: str = "gap",
    n_references: int = 10,
    reference: str = "sd_box",
) -> None:
    """Raise ConfigError for a fixed K below 2, a K range that is not 2 <= low <= high, an unknown
    k_choice, a number of gap reference datasets below 1 or an unknown reference."""
    if n_categories is not None and (
        not isinstance(n_categories, int | np.integer) or n_categories < 2
    ):
        raise ConfigError("clustering.n_categories", n_categories, "None or an integer >= 2")
    low, high = k_range
    if not (isinstance(low, int | np.integer) and isinstance(high, int | np.integer)) or not (
        2 <= low <= high
    ):
        raise ConfigError("clustering.k_range", tuple(k_range), "(low, high) with 2 <= low <= high")
    if k_choice not in K_CHOICES:
        raise ConfigError("clustering.k_choice", k_choice, K_CHOICES)
    if (
        isinstance(n_references, bool)
        or not isinstance(n_references, int | np.integer)
        or n_references < 1
    ):
        raise ConfigError("clustering.n_references", n_references, "an integer >= 1")
    if reference not in REFERENCES:
        raise ConfigError("clustering.reference", reference, REFERENCES)


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


@dataclass
class ClusteringConfig:
    """The `clustering` config group (conf/clustering/*.yaml): where a neuron's categories come from."""

    categories: str = "clusterer"  # clusterer: cluster the vectors | wordnet: lexical supersenses
    estimator: Any = None  # clusterer: a `_target_` config of any class with fit_predict
    normalize: bool = True  # L2-normalise the vectors before clustering
    n_categories: int | None = None  # None: K chosen by `k_choice` over k_range
    k_range: list[int] = field(default_factory=lambda: [2, 8])
    k_choice: str = "gap"  # gap: gap statistic over K in 1 + k_range (K = 1 possible) | silhouette
    n_references: int = 10  # gap statistic: reference datasets per neuron
    reference: str = "sd_box"  # gap statistic: how the reference datasets are drawn (REFERENCES)
    stop_words: bool = True  # wordnet: function words and single characters get no supersense

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
        validate_k_choice(
            self.n_categories, tuple(self.k_range), self.k_choice, self.n_references, self.reference
        )
        if not isinstance(self.stop_words, bool):
            raise ConfigError("clustering.stop_words", self.stop_words, "true or false")
        if self.categories == "clusterer":
            self.factory()  # resolves the class and binds its arguments
        elif self.estimator is not None:  # it would be ignored, `_target_` and all
            raise ConfigError(
                "clustering.estimator", self.estimator, f"null when clustering.categories={self.categories!r}"
            )

    def label(self) -> str:
        """A few words for figure titles: "ward, K by gap", "KMeans, K = 3", "WordNet supersenses"."""
        if self.categories == "wordnet":
            return "WordNet supersenses"
        estimator = dict(self.estimator or {})
        name = estimator.get("linkage") or str(estimator.get("_target_", "?")).rsplit(".", 1)[-1]
        k = f"K = {self.n_categories}" if self.n_categories is not None else f"K by {self.k_choice}"
        return f"{name}, {k}"

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
        """ids -> WordNet supersense labels (-1 = not in WordNet, or a function word when
        `stop_words`), or None to cluster the vectors."""
        if self.categories != "wordnet":
            return None
        from intraneuron.categories.wordnet import label_tokens

        labels, _, _ = label_tokens(token_texts, stop_words=self.stop_words)  # [vocab]

        def label(ids: np.ndarray) -> np.ndarray:
            return labels[ids]

        return label
