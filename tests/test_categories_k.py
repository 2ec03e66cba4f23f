"""Choosing K: the gap statistic (K = 1 possible), one tree per dataset, the K-curve table.

Planted rates (measured when written): isotropic noise, 100 tokens in d = 576, Ward preset: K = 1
in 50 of 50 draws; average_cosine preset: 50 of 50. Three well-separated categories: K = 3.
"""

import numpy as np
import pytest
from scipy.cluster import hierarchy
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

from intraneuron.analyses.two_fold.clustering import (
    NO_STRUCTURE,
    ClusteringConfig,
    _cut_by_merge_order,
    _log_within_by_k,
    choose_gap_k,
    fit_categories,
    preset_factory,
    silhouette_precomputed,
)
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron
from intraneuron.errors import ConfigError
from intraneuron.paths import CONF_DIR


def planted_neuron(seed=0, n_per=30, d=64, separation=1.0):
    """3 embedding-space categories of n_per tokens; activation ordered by category (0 lowest)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per)
    centres = rng.normal(size=(3, d)) * separation
    X = centres[truth] + rng.normal(scale=0.4, size=(truth.size, d))
    acts = truth * 2.0 + rng.normal(scale=0.3, size=truth.size)
    return acts, X, truth


def test_gap_picks_the_planted_k_and_the_k_curve_peaks_there():
    acts, X, truth = planted_neuron()
    neuron = TwoFoldNeuron(n_segments=3, n_permutations=99, n_mantel_permutations=0)
    result = neuron.analyse(acts, X, seed=1)
    row, curve = result.row, result.k_curve
    assert row["n_categories"] == 3 and row["topdown_skipped"] == ""
    assert adjusted_rand_score(truth, result.token_labels) == 1.0
    assert list(curve.columns) == [
        "k",
        "gap",
        "gap_sd",
        "silhouette",
        "epsilon2",
        "kruskal_p",
        "ari",
        "chosen",
    ]
    assert curve["k"].tolist() == list(range(1, 9))
    assert curve.loc[curve["chosen"], "k"].tolist() == [3]
    # epsilon2 jumps to its plateau at K = 3; splitting a category at random neither raises nor
    # lowers it in expectation (it is chance-corrected), so beyond K = 3 it stays flat
    eps = dict(zip(curve["k"], curve["epsilon2"], strict=True))
    assert eps[3] > eps[2] + 0.5 and all(abs(eps[k] - eps[3]) < 0.02 for k in range(4, 9))
    assert eps[3] >= np.nanmax(list(eps.values())) - 0.01
    assert curve.loc[curve["ari"].idxmax(), "k"] == 3
    assert curve.loc[curve["k"] == 3, "ari"].item() == 1.0  # 3 equal-count segments = 3 categories
    assert curve.loc[curve["k"] == 1, ["silhouette", "epsilon2", "ari"]].isna().all(axis=None)
    # the rule: Gap(3) >= Gap(4) - s_4, and not so for K = 1, 2
    gap = dict(zip(curve["k"], curve["gap"], strict=True))
    s = dict(zip(curve["k"], curve["gap_sd"], strict=True))
    assert gap[3] >= gap[4] - s[4] and gap[1] < gap[2] - s[2] and gap[2] < gap[3] - s[3]
    assert row["silhouette"] == pytest.approx(curve.loc[curve["k"] == 3, "silhouette"].item())


@pytest.mark.parametrize("preset", ["ward", "average_cosine"])
def test_isotropic_noise_gives_k_equal_one_in_at_least_90_percent_of_draws(preset):
    factory, normalize = preset_factory(preset)
    rng = np.random.default_rng(123)
    ks = [fit_categories(rng.normal(size=(100, 576)), factory, normalize=normalize, seed=draw).k
          for draw in range(50)]  # fmt: skip
    rate = np.mean(np.asarray(ks) == 1)
    assert rate >= 0.9, f"K=1 in {rate:.0%} of 50 noise draws: {np.bincount(ks)}"


def test_k_equal_one_skips_the_top_down_analysis_and_keeps_the_bottom_up():
    rng = np.random.default_rng(5)
    acts, X = rng.normal(size=60), rng.normal(size=(60, 96))
    result = TwoFoldNeuron(n_permutations=49, n_mantel_permutations=9).analyse(acts, X, seed=0)
    row = result.row
    assert row["topdown_skipped"] == NO_STRUCTURE == "K=1: no categorical structure (gap statistic)"
    assert row["n_categories"] == 1 and row["skipped"] == ""
    assert np.isnan(row["epsilon2"]) and np.isnan(row["interleaving_z"])
    assert row["ari"] == 0.0 and row["ami"] == 0.0  # one category agrees with no segmentation: chance
    assert np.isfinite(row["h_all"]) and np.isfinite(row["mantel_rho"])
    assert (result.token_labels == 0).all()
    assert result.k_curve.loc[result.k_curve["chosen"], "k"].tolist() == [1]
    assert result.k_curve["epsilon2"].notna().sum() == 7  # K = 2..8 are still fitted and tested


def test_fixed_k_and_silhouette_choice_still_work():
    acts, X, _ = planted_neuron(seed=2)
    fixed = TwoFoldNeuron(n_categories=5, n_permutations=19, n_mantel_permutations=0).analyse(
        acts, X
    )
    assert fixed.row["n_categories"] == 5 and fixed.k_curve.empty
    old = TwoFoldNeuron(k_choice="silhouette", n_permutations=19, n_mantel_permutations=0).analyse(
        acts, X
    )
    assert old.row["n_categories"] == 3
    assert old.k_curve["k"].tolist() == list(range(2, 9)) and "gap" not in old.k_curve
    fit = fit_categories(X, preset_factory("ward")[0], n_categories=4)
    assert fit.k == 4 and fit.labels_by_k == {} and fit.gap_by_k == {}


def test_the_gap_reads_the_references_from_the_seed():
    _, X, _ = planted_neuron(seed=3)
    factory, normalize = preset_factory("ward")
    a, b = (fit_categories(X, factory, normalize=normalize, seed=9) for _ in range(2))
    c = fit_categories(X, factory, normalize=normalize, seed=10, n_references=20)
    assert a.gap_by_k == b.gap_by_k and a.gap_by_k != c.gap_by_k
    assert sorted(a.gap_by_k) == sorted(a.gap_sd_by_k) == list(range(1, 9))
    assert sorted(a.labels_by_k) == list(range(2, 9))


def test_within_cluster_sums_and_the_tree_cut_match_direct_computations():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 7))
    labellings = [rng.integers(0, k, 40) for k in (1, 2, 5)] + [
        np.r_[-1, -1, rng.integers(0, 3, 38)]
    ]
    expected = []
    for labels in labellings:
        keep = labels >= 0
        expected.append(np.log(sum(np.sum((X[keep][labels[keep] == c] - X[keep][labels[keep] == c].mean(0)) ** 2)
                                   for c in np.unique(labels[keep]))))  # fmt: skip
    np.testing.assert_allclose(_log_within_by_k(X, labellings), expected)
    tree = hierarchy.ward(X)
    for k, labels in _cut_by_merge_order(tree, list(range(2, 9))).items():
        assert adjusted_rand_score(hierarchy.cut_tree(tree, n_clusters=[k])[:, 0], labels) == 1.0


def test_choose_gap_k_is_tibshiranis_rule():
    gap = {1: 0.1, 2: 0.5, 3: 0.52, 4: 0.9}
    sd = {1: 0.01, 2: 0.05, 3: 0.05, 4: 0.05}
    assert choose_gap_k(gap, sd) == 2  # 0.5 >= 0.52 - 0.05
    assert choose_gap_k({1: 0.5, 2: 0.2}, {1: 0.1, 2: 0.1}) == 1
    assert choose_gap_k({1: 0.1, 2: 0.3, 3: 0.6}, {1: 0.0, 2: 0.0, 3: 0.0}) == 3  # none qualifies


@pytest.mark.parametrize("seed", range(4))
def test_the_fast_silhouette_is_sklearns(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, 5))
    labels = rng.integers(0, 2 + seed, 30)
    labels[0] = labels.max() + 1  # a singleton scores 0
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    assert silhouette_precomputed(D, labels) == pytest.approx(
        silhouette_score(D, labels, metric="precomputed")
    )


def test_cosine_linkage_reports_the_cosine_silhouette():
    _, X, _ = planted_neuron(seed=6)
    factory, normalize = preset_factory("average_cosine")
    fit = fit_categories(X, factory, normalize=normalize)
    assert fit.k == 3
    assert fit.silhouette == pytest.approx(silhouette_score(X, fit.labels, metric="cosine"))


def test_k_choice_settings_are_validated_with_their_keys():
    with pytest.raises(ConfigError, match="clustering.k_choice.*gap"):
        TwoFoldNeuron(k_choice="elbow")
    with pytest.raises(ConfigError, match="clustering.n_references"):
        TwoFoldNeuron(n_references=0)
    with pytest.raises(ConfigError, match="analysis.mantel_distance"):
        TwoFoldNeuron(mantel_distance="euclidean")
    config = ClusteringConfig.from_option("ward")
    assert (config.k_choice, config.n_references) == ("gap", 10)
    config.k_choice = "silhouettes"
    with pytest.raises(ConfigError, match="clustering.k_choice"):
        config.validate()
    for path in (CONF_DIR / "clustering").glob("*.yaml"):
        ClusteringConfig.from_option(path.stem).validate()


def test_the_kmeans_preset_chooses_k_by_the_gap_statistic():
    """clustering=kmeans keeps the default K rule: the planted K, and K = 1 on noise."""
    clustering = ClusteringConfig.from_option("kmeans")
    assert clustering.k_choice == "gap"
    neuron = TwoFoldNeuron(
        make_clusterer=clustering.factory(), normalize=clustering.normalize,
        k_range=tuple(clustering.k_range), k_choice=clustering.k_choice,
        n_references=clustering.n_references, n_segments=3, n_permutations=99, n_mantel_permutations=0,
    )  # fmt: skip
    acts, X, truth = planted_neuron(n_per=15)
    # one thread per fit, as in the layer's joblib workers: on a few dozen tokens OpenMP's threads
    # cost k-means more than they save (5x on 2 busy cores)
    with threadpool_limits(limits=1):
        result = neuron.analyse(acts, X, seed=1)
        rng = np.random.default_rng(5)
        noise = neuron.analyse(rng.normal(size=45), rng.normal(size=(45, 64)), seed=0)
    assert result.row["n_categories"] == 3 and result.row["topdown_skipped"] == ""
    assert adjusted_rand_score(truth, result.token_labels) == 1.0
    assert result.k_curve["k"].tolist() == list(range(1, 9)) and result.k_curve["gap"].notna().all()
    assert result.k_curve.loc[result.k_curve["chosen"], "k"].tolist() == [3]
    assert noise.row["topdown_skipped"] == NO_STRUCTURE and noise.row["n_categories"] == 1
