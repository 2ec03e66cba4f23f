"""Categorical clusters: K by gap statistic or silhouette, presets from `_target_` configs, skips.
(K = 1 and the K-curve's planted rates: tests/test_categories_k.py.)"""

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from sklearn.metrics import adjusted_rand_score, silhouette_score

from intraneuron.analyses.two_fold.clustering import (
    ClusteringConfig,
    CosineSpectralClustering,
    categories_from_labels,
    clusterer_factory,
    fit_categories,
    preset_factory,
)
from intraneuron.errors import ConfigError
from intraneuron.paths import CONF_DIR


def planted(n_per=20, n_clusters=4, d=64, spread=0.35, seed=0):
    """Unit vectors around orthogonal centres: [n, d] and the true labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:n_clusters] * 3.0
    truth = np.repeat(np.arange(n_clusters), n_per)
    X = centres[truth] + rng.normal(scale=spread * 3.0 / np.sqrt(d) * 4, size=(truth.size, d))
    return X, truth


@pytest.mark.parametrize("k_choice", ["gap", "silhouette"])
def test_ward_default_finds_the_planted_k_and_reports_the_silhouette_in_its_own_distance(k_choice):
    # Ward runs on unit vectors: its silhouette is Euclidean there, sqrt(2 - 2 cos) (it used to be
    # 1 - cos, a different distance from the one the tree was built on)
    X, truth = planted()
    factory, normalize = preset_factory("ward")
    fit = fit_categories(X, factory, k_range=(2, 8), normalize=normalize, k_choice=k_choice)
    assert fit.skipped is None
    assert fit.k == 4
    assert adjusted_rand_score(truth, fit.labels) == 1.0
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert fit.silhouette == pytest.approx(silhouette_score(unit, fit.labels, metric="euclidean"))


def test_chosen_k_maximises_the_silhouette_over_the_range():
    X, _ = planted(n_clusters=3, spread=1.2, seed=3)
    factory, _ = preset_factory("ward")
    fit = fit_categories(X, factory, k_range=(2, 6), k_choice="silhouette")
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    scores = {
        k: silhouette_score(
            unit,
            AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(unit),
            metric="euclidean",
        )
        for k in range(2, 7)
    }
    assert fit.k == max(scores, key=scores.get)
    assert fit.silhouette == pytest.approx(max(scores.values()))


@pytest.mark.parametrize(
    ("linkage", "metric", "normalize"),
    [("ward", "euclidean", True), ("average", "cosine", False), ("complete", "cosine", False),
     ("single", "l1", False)],
)  # fmt: skip
def test_one_tree_cut_at_each_k_equals_refitting_sklearn(linkage, metric, normalize):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 16))
    data = X / np.linalg.norm(X, axis=1, keepdims=True) if normalize else X
    factory = clusterer_factory(AgglomerativeClustering, linkage=linkage, metric=metric)
    for k in range(2, 9):
        fast = fit_categories(X, factory, n_categories=k, normalize=normalize)
        # n_categories=k also goes through fit_predict; compare the tree cut of the range path.
        reference = AgglomerativeClustering(n_clusters=k, linkage=linkage, metric=metric).fit_predict(data)
        assert adjusted_rand_score(reference, fast.labels) == 1.0
        ranged = fit_categories(
            X, factory, k_range=(k, k), normalize=normalize, k_choice="silhouette"
        )
        assert adjusted_rand_score(reference, ranged.labels) == 1.0
        curve = fit_categories(
            X, factory, k_range=(2, 8), normalize=normalize
        )  # the gap's one tree
        assert adjusted_rand_score(reference, curve.labels_by_k[k]) == 1.0


CLUSTERERS = sorted(p.stem for p in (CONF_DIR / "clustering").glob("*.yaml") if p.stem != "wordnet")


@pytest.mark.parametrize("name", CLUSTERERS)
def test_every_clusterer_option_is_built_from_its_target_config_and_separates_planted_clusters(name):
    X, truth = planted(n_per=25)
    factory, normalize = preset_factory(name)
    fit = fit_categories(X, factory, n_categories=None if name == "hdbscan" else 4, normalize=normalize)
    assert fit.skipped is None
    covered = fit.labels >= 0
    assert covered.mean() > 0.8
    assert adjusted_rand_score(truth[covered], fit.labels[covered]) > 0.95


def test_a_clusterer_that_sets_its_own_k_is_fitted_once():
    X, _ = planted(n_per=25)
    calls = []
    base, _ = preset_factory("hdbscan")

    def counting(k):
        calls.append(k)
        return base(k)

    fit = fit_categories(X, counting, k_range=(2, 8))
    assert len(calls) == 1
    assert fit.k == 4


def test_fewer_than_two_categories_is_a_skip_not_a_crash():
    class OneCluster:
        def __init__(self, n_clusters):
            self.n_clusters = n_clusters

        def get_params(self):
            return {"n_clusters": self.n_clusters}

        def fit_predict(self, X):
            return np.zeros(len(X), dtype=int)

    X, _ = planted()
    fit = fit_categories(X, OneCluster)
    assert fit.skipped is not None and fit.k == 1
    assert categories_from_labels(np.full(10, -1)).skipped is not None
    assert fit_categories(X[:2], OneCluster).skipped is not None


def test_precomputed_labels_keep_uncovered_tokens_out_of_the_silhouette():
    X, truth = planted()
    labels = truth.copy()
    labels[::7] = -1
    fit = categories_from_labels(labels, X)
    covered = labels >= 0
    assert fit.k == 4 and fit.skipped is None
    np.testing.assert_array_equal(fit.labels, labels)
    assert fit.silhouette == pytest.approx(
        silhouette_score(X[covered], labels[covered], metric="cosine")
    )


def test_cosine_spectral_works_where_sklearn_cosine_affinity_fails():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 8))  # many negative cosines
    with pytest.raises(ValueError):
        SpectralClustering(3, affinity="cosine", random_state=0).fit_predict(X)
    labels = CosineSpectralClustering(n_clusters=3, random_state=0).fit_predict(X)
    assert np.unique(labels).size == 3


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_categories": 1}, "clustering.n_categories"),
        ({"k_range": (1, 4)}, "clustering.k_range"),
        ({"k_range": (5, 3)}, "clustering.k_range"),
        ({"k_choice": "elbow"}, "clustering.k_choice"),
        ({"n_references": 0}, "clustering.n_references"),
        ({"n_references": 2.5}, "clustering.n_references"),
    ],
)
def test_bad_k_settings_raise_config_error(kwargs, key):
    factory, _ = preset_factory("ward")
    with pytest.raises(ConfigError, match=key):
        fit_categories(np.eye(5), factory, **kwargs)


@pytest.mark.parametrize(
    ("estimator", "key"),
    [
        ({"_target_": "sklearn.cluster.NoSuchClusterer"}, "clustering.estimator._target_"),
        ({"_target_": "numpy.ndarray"}, "clustering.estimator._target_"),
        ({"_target_": "builtins.open"}, "clustering.estimator._target_"),
        ({"_target_": "sklearn.cluster.KMeans", "n_clusters": 3}, "clustering.estimator.n_clusters"),
        ({"_target_": "sklearn.cluster.KMeans", "bogus_kw": 3}, "clustering.estimator.bogus_kw"),
        ({"_target_": "sklearn.cluster.AgglomerativeClustering", "linkage": "bogus"},
         "clustering.estimator.linkage"),
        ({"_target_": "sklearn.cluster.AgglomerativeClustering",
          "memory": {"_target_": "builtins.open", "file": "/etc/hostname"}},
         "clustering.estimator.memory._target_"),
    ],
)
def test_bad_estimators_raise_config_error_naming_the_key(estimator, key):
    with pytest.raises(ConfigError) as caught:
        ClusteringConfig(estimator=estimator).validate()
    assert caught.value.key == key


def test_an_unknown_clusterer_option_lists_the_options():
    with pytest.raises(ConfigError, match="ward"):
        preset_factory("birch")


def test_the_k_curve_holds_every_fitted_k_and_its_best_is_the_chosen_fit():
    X, truth = planted()
    factory, normalize = preset_factory("ward")
    fit = fit_categories(X, factory, k_range=(2, 8), normalize=normalize, k_choice="silhouette")
    assert sorted(fit.silhouette_by_k) == sorted(fit.labels_by_k) == list(range(2, 9))
    assert fit.gap_by_k == {}
    best = max(fit.silhouette_by_k, key=fit.silhouette_by_k.get)
    assert (best, fit.silhouette_by_k[best]) == (fit.k, fit.silhouette) == (4, fit.silhouette)
    assert fit_categories(X, factory, n_categories=3, normalize=normalize).silhouette_by_k == {}
