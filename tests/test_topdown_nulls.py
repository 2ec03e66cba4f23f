"""The permutation null of interleaving and range overlap (categories fixed, activations shuffled).

Measured when written (200 null neurons, 60 tokens, 4 categories, 199 permutations): mean
interleaving_z about 0, fraction of interleaving_p_less < 0.05 within [0.02, 0.09]; planted
ordered categories: p_less = 1/(P + 1).
"""

import numpy as np
import pytest

from intraneuron.analyses.two_fold.topdown import (
    NULL_KEYS,
    _interleaving_overlap_null_loop,
    interleaving_overlap_null,
    kruskal_epsilon2,
    omnibus_tests,
    top_down,
)
from intraneuron.errors import ConfigError


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: tied activations
@pytest.mark.parametrize("k", [2, 5])
def test_vectorised_null_equals_the_loop_for_the_same_seed(decimals, k):
    rng = np.random.default_rng(k)
    labels = rng.integers(-1, k, 40)  # -1: uncovered tokens stay out
    acts = rng.normal(size=40) + 0.5 * labels
    if decimals is not None:
        acts = np.round(acts, decimals)
    fast = interleaving_overlap_null(acts, labels, 150, seed=3, batch_size=32)
    slow = _interleaving_overlap_null_loop(acts, labels, 150, seed=3)
    assert set(fast) == set(NULL_KEYS)
    for key in NULL_KEYS:
        assert fast[key] == pytest.approx(slow[key], rel=1e-10, abs=1e-12), key
    # the observed values a caller passes in are the top-down summary's
    summary = top_down(acts, labels).summary
    given = interleaving_overlap_null(
        acts, labels, 150, seed=3, observed=(summary["interleaving_mean"], summary["overlap_mean"])
    )
    assert given == pytest.approx(fast)


def test_on_null_neurons_interleaving_sits_at_its_null():
    rng = np.random.default_rng(0)
    z, p, overlap_p, null_mean = [], [], [], []
    for _ in range(200):
        labels = rng.integers(0, 4, 60)
        result = interleaving_overlap_null(rng.normal(size=60), labels, 199, seed=rng)
        z.append(result["interleaving_z"])
        p.append(result["interleaving_p_less"])
        overlap_p.append(result["overlap_p_less"])
        null_mean.append(result["interleaving_null_mean"])
    z, p, overlap_p = map(np.asarray, (z, p, overlap_p))
    assert abs(z.mean()) < 0.2, z.mean()
    assert 0.02 <= np.mean(p < 0.05) <= 0.09, np.mean(p < 0.05)
    assert np.mean(overlap_p < 0.05) <= 0.09
    # chance interleaving is far from 0 (about 0.45 here): raw values must be read against it
    assert 0.4 < np.mean(null_mean) < 0.5


def test_planted_ordered_categories_are_less_interleaved_than_chance():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 15)
    acts = labels * 1.0 + rng.normal(scale=0.4, size=60)  # ordered, still overlapping a little
    result = interleaving_overlap_null(acts, labels, 499, seed=2)
    assert result["interleaving_p_less"] < 0.01 and result["interleaving_z"] < -3
    assert result["overlap_p_less"] < 0.01
    assert result["interleaving_null_mean"] > 0.4 and result["overlap_null_mean"] > 0.8


def test_one_category_gives_nan_and_bad_permutations_raise():
    assert all(
        np.isnan(v) for v in interleaving_overlap_null(np.arange(5.0), np.zeros(5, int), 9).values()
    )
    with pytest.raises(ConfigError, match="analysis.n_permutations"):
        interleaving_overlap_null(np.arange(5.0), np.r_[0, 0, 1, 1, 1], 0)


@pytest.mark.parametrize("decimals", [None, 0])
def test_the_k_curves_kruskal_is_the_omnibus_one(decimals):
    rng = np.random.default_rng(3)
    for k in (2, 3, 6):
        labels = rng.integers(-1, k, 50)
        acts = rng.normal(size=50) + 0.3 * labels
        if decimals is not None:
            acts = np.round(acts, decimals)
        tests = omnibus_tests(acts, labels)
        assert kruskal_epsilon2(acts, labels) == pytest.approx(
            (tests["epsilon2"], tests["kruskal_p"])
        )
