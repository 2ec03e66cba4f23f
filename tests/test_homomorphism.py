"""Step 9: partition agreement against scikit-learn, the Mantel test against scipy and its loop."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from intraneuron.analyses.two_fold.bottomup import cosine_matrix
from intraneuron.analyses.two_fold.homomorphism import (
    _mantel_null_loop,
    adjusted_rand,
    mantel_activation_cosine,
    partition_agreement,
)
from intraneuron.errors import ConfigError


def _tokens(n=30, d=12, seed=0, decimals=None):
    """acts [n] (rounded: with ties) and the cosine matrix [n, n] of random vectors."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=n)
    if decimals is not None:
        acts = np.round(acts, decimals)
    return acts, cosine_matrix(rng.normal(size=(n, d)) + 0.3)


def test_partition_agreement_is_sklearn_ari_and_ami_over_covered_tokens():
    rng = np.random.default_rng(1)
    categories = rng.integers(-1, 4, size=60)  # about a fifth uncovered
    segments = np.where(rng.random(60) < 0.6, categories.clip(0), rng.integers(0, 5, 60))
    covered = categories >= 0
    ari, ami = partition_agreement(categories, segments)
    assert ari == pytest.approx(adjusted_rand_score(categories[covered], segments[covered]))
    assert adjusted_rand(categories, segments) == pytest.approx(ari)  # the K-curve's fast ARI
    assert ami == pytest.approx(adjusted_mutual_info_score(categories[covered], segments[covered]))
    assert ari != pytest.approx(adjusted_rand_score(categories, segments))  # -1 would change it


def test_partition_agreement_of_identical_partitions_is_one_and_undefined_without_tokens():
    labels = np.repeat(np.arange(4), 5)
    assert partition_agreement(labels, 3 - labels) == (1.0, 1.0)
    assert all(np.isnan(partition_agreement(np.array([-1, -1, 0]), np.array([0, 1, 0]))))
    with pytest.raises(ValueError, match="shapes"):
        partition_agreement(labels, labels[:-1])


@pytest.mark.parametrize("distance", ["rank", "absolute"])
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: tied activation distances
def test_mantel_rho_is_spearman_over_upper_triangle_pairs(decimals, distance):
    acts, C = _tokens(decimals=decimals)
    rows, cols = np.triu_indices(acts.size, 1)
    values = stats.rankdata(acts) if distance == "rank" else acts  # rank: |rank_i - rank_j|
    expected = stats.spearmanr(np.abs(values[rows] - values[cols]), 1 - C[rows, cols]).statistic
    assert mantel_activation_cosine(acts, C, 10, distance=distance).rho == pytest.approx(expected)


@pytest.mark.parametrize("distance", ["rank", "absolute"])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("decimals", [None, 1])
def test_vectorised_mantel_null_equals_the_loop_for_the_same_seed(alternative, decimals, distance):
    acts, C = _tokens(n=25, seed=2, decimals=decimals)
    fast = mantel_activation_cosine(
        acts, C, 120, seed=4, alternative=alternative, batch_size=32, distance=distance
    )
    slow = _mantel_null_loop(acts, C, 120, seed=4, alternative=alternative, distance=distance)
    assert fast.rho == pytest.approx(slow.rho)
    assert fast.p == pytest.approx(slow.p)
    assert fast.null_mean == pytest.approx(slow.null_mean, abs=1e-12)
    assert fast.null_sd == pytest.approx(slow.null_sd, rel=1e-9)
    assert fast.n_permutations == 120


def test_mantel_detects_activation_that_follows_the_vectors():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 8))
    acts = X[:, 0] * 3  # tokens close in activation share their first coordinate
    result = mantel_activation_cosine(acts, cosine_matrix(X), 199, seed=0)
    assert result.rho > 0.1 and result.p < 0.01


def test_mantel_is_undefined_below_three_tokens_and_rejects_zero_permutations():
    acts, C = _tokens(n=2)
    assert np.isnan(mantel_activation_cosine(acts, C, 5).rho)
    with pytest.raises(ConfigError, match="analysis.n_mantel_permutations"):
        mantel_activation_cosine(*_tokens(), n_permutations=0)
    with pytest.raises(ValueError, match="C must be"):
        mantel_activation_cosine(np.arange(4.0), np.eye(3))
    with pytest.raises(ConfigError, match="analysis.mantel_distance.*rank"):
        mantel_activation_cosine(*_tokens(), n_permutations=5, distance="euclidean")


def test_rank_mantel_sees_a_monotone_neuron_that_a_dense_low_mass_hides_from_raw_distances():
    # Tokens along one semantic direction (the angle grows with t); the activation rises with t but
    # stays within a hair of 0 for most tokens (exp(12 t)), as a neuron's dense low-activation mass
    # does: raw |a_i - a_j| ranks most pairs by noise-sized gaps, |rank_i - rank_j| follows t.
    rng = np.random.default_rng(7)
    n = 80
    t = np.sort(rng.random(n))
    X = np.c_[np.cos(1.4 * t), np.sin(1.4 * t), 0.05 * rng.normal(size=(n, 6))]
    acts = np.exp(12 * t) * 1e-4 + 1e-5 * rng.normal(size=n)
    C = cosine_matrix(X)
    rank = mantel_activation_cosine(acts, C, 199, seed=0, distance="rank")
    raw = mantel_activation_cosine(acts, C, 199, seed=0, distance="absolute")
    assert rank.rho > 0.5 and rank.p < 0.01
    assert raw.rho < rank.rho - 0.2
