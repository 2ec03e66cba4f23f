"""Step 9: partition agreement against scikit-learn, the Mantel test against scipy and its loop."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from intraneuron.analyses.two_fold.bottomup import cosine_matrix
from intraneuron.analyses.two_fold.homomorphism import (
    _mantel_null_loop,
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


def test_partition_agreement_is_sklearn_ari_and_nmi_over_covered_tokens():
    rng = np.random.default_rng(1)
    categories = rng.integers(-1, 4, size=60)  # about a fifth uncovered
    segments = np.where(rng.random(60) < 0.6, categories.clip(0), rng.integers(0, 5, 60))
    covered = categories >= 0
    ari, nmi = partition_agreement(categories, segments)
    assert ari == pytest.approx(adjusted_rand_score(categories[covered], segments[covered]))
    assert nmi == pytest.approx(
        normalized_mutual_info_score(categories[covered], segments[covered])
    )
    assert ari != pytest.approx(adjusted_rand_score(categories, segments))  # -1 would change it


def test_partition_agreement_of_identical_partitions_is_one_and_undefined_without_tokens():
    labels = np.repeat(np.arange(4), 5)
    assert partition_agreement(labels, 3 - labels) == (1.0, 1.0)
    assert all(np.isnan(partition_agreement(np.array([-1, -1, 0]), np.array([0, 1, 0]))))
    with pytest.raises(ValueError, match="shapes"):
        partition_agreement(labels, labels[:-1])


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: tied activation distances
def test_mantel_rho_is_spearman_over_upper_triangle_pairs(decimals):
    acts, C = _tokens(decimals=decimals)
    rows, cols = np.triu_indices(acts.size, 1)
    expected = stats.spearmanr(np.abs(acts[rows] - acts[cols]), 1 - C[rows, cols]).statistic
    assert mantel_activation_cosine(acts, C, 10).rho == pytest.approx(expected)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("decimals", [None, 1])
def test_vectorised_mantel_null_equals_the_loop_for_the_same_seed(alternative, decimals):
    acts, C = _tokens(n=25, seed=2, decimals=decimals)
    fast = mantel_activation_cosine(acts, C, 120, seed=4, alternative=alternative, batch_size=32)
    slow = _mantel_null_loop(acts, C, 120, seed=4, alternative=alternative)
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
