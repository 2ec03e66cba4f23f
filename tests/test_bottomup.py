"""Segment homogeneity (step 8): measures against loops, vectorised nulls against their loop
references (same seed, same numbers), trend against scipy, and the bottom_up wiring."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from intraneuron.analyses.two_fold.bottomup import (
    _homogeneity_null_loop,
    _successive_null_loop,
    bottom_up,
    cosine_matrix,
    homogeneity_null,
    homogeneity_trend,
    mean_pairwise_cosine,
    segment_homogeneity,
    successive_similarity,
)
from intraneuron.analyses.two_fold.segmentation import equal_count_segments, top_segments
from intraneuron.errors import ConfigError


def _tokens(n=40, d=16, seed=0):
    """acts [n] (distinct values) and vectors X [n, d] with a shared direction (positive cosines)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + 0.5
    return rng.normal(size=n), X


def _cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _homogeneity_reference(X, labels, n_segments, measure):
    """Per segment: mean cosine over pairs i < j, or mean cosine to the centroid of unit vectors."""
    h = np.full(n_segments, np.nan)
    for s in range(n_segments):
        members = np.flatnonzero(labels == s)
        if members.size < 2:
            continue
        if measure == "pairwise":
            h[s] = np.mean([_cos(X[i], X[j]) for i in members for j in members if i < j])
        else:
            unit = X[members] / np.linalg.norm(X[members], axis=1, keepdims=True)
            centroid = unit.mean(axis=0)
            h[s] = np.mean([_cos(u, centroid) for u in unit])
    return h


# Segmentations: 10 equal-count segments; the two-segment "top" split (its larger segment takes
# the complement path); 4 segments with an empty one and a singleton.
_LABELS = {
    "equal_count": lambda acts: (equal_count_segments(acts, 10), 10),
    "top_fraction": lambda acts: (top_segments(acts, 0.5), 2),
    "gaps": lambda acts: (np.where(np.arange(acts.size) == 0, 3, np.arange(acts.size) % 2), 4),
}


def test_cosine_matrix_matches_a_loop_and_gives_zero_for_zero_vectors():
    _, X = _tokens(n=6, d=5)
    X[2] = 0.0
    C = cosine_matrix(X)  # [6, 6]
    for i in range(6):
        for j in range(6):
            expected = 0.0 if 2 in (i, j) else _cos(X[i], X[j])
            assert C[i, j] == pytest.approx(expected)


@pytest.mark.parametrize("measure", ["pairwise", "centroid"])
@pytest.mark.parametrize("layout", sorted(_LABELS))
def test_segment_homogeneity_matches_a_loop(measure, layout):
    acts, X = _tokens()
    labels, n_segments = _LABELS[layout](acts)
    h = segment_homogeneity(cosine_matrix(X), labels, n_segments, measure)
    np.testing.assert_allclose(
        h, _homogeneity_reference(X, labels, n_segments, measure), equal_nan=True
    )


def test_mean_pairwise_cosine_is_h_all():
    _, X = _tokens(n=12)
    expected = np.mean([_cos(X[i], X[j]) for i in range(12) for j in range(i + 1, 12)])
    assert mean_pairwise_cosine(cosine_matrix(X)) == pytest.approx(expected)
    assert np.isnan(mean_pairwise_cosine(np.ones((1, 1))))


@pytest.mark.parametrize("measure", ["pairwise", "centroid"])
@pytest.mark.parametrize("layout", sorted(_LABELS))
def test_vectorised_homogeneity_null_equals_the_loop_for_the_same_seed(measure, layout):
    acts, X = _tokens(seed=1)
    labels, n_segments = _LABELS[layout](acts)
    C = cosine_matrix(X)
    # batch_size 7 does not divide 150: the last batch is short
    fast = homogeneity_null(C, labels, n_segments, measure, 150, seed=3, batch_size=7)
    slow = _homogeneity_null_loop(C, labels, n_segments, measure, 150, seed=3)
    for field in ("observed", "null_mean", "null_sd", "z", "p"):
        np.testing.assert_allclose(
            getattr(fast, field), getattr(slow, field), rtol=1e-9, equal_nan=True
        )


def test_homogeneity_null_p_counts_the_observed_value_and_draws_at_least_as_high():
    acts, X = _tokens(seed=2)
    labels = equal_count_segments(acts, 4)
    test = homogeneity_null(cosine_matrix(X), labels, 4, n_permutations=99, seed=0)
    assert ((test.p >= 0.01) & (test.p <= 1.0)).all()
    assert np.allclose(test.p * 100, np.round(test.p * 100))  # (1 + #) / (1 + 99)


def test_successive_similarity_equals_the_loop_for_the_same_seed():
    acts, X = _tokens(seed=4)
    C = cosine_matrix(X)
    fast = successive_similarity(C, acts, 120, seed=9, batch_size=32)
    slow = _successive_null_loop(C, acts, 120, seed=9)
    assert fast.observed == pytest.approx(slow.observed)
    for field in ("null_mean", "null_sd", "z", "p_greater", "p_less"):
        assert getattr(fast, field) == pytest.approx(getattr(slow, field), rel=1e-9)


def test_successive_observed_is_the_mean_cosine_of_rank_neighbours():
    acts, X = _tokens(n=8, seed=5)
    ranked = np.argsort(-acts)
    expected = np.mean([_cos(X[ranked[r]], X[ranked[r + 1]]) for r in range(7)])
    assert successive_similarity(cosine_matrix(X), acts, 5).observed == pytest.approx(expected)


def test_homogeneity_trend_is_spearman_of_segment_level_over_defined_segments():
    h = np.array([0.5, 0.42, np.nan, 0.3, 0.35, 0.1])  # segment 0 = highest activation
    rho, p = homogeneity_trend(h)
    ok = ~np.isnan(h)
    expected = stats.spearmanr(-np.arange(6)[ok], h[ok])
    assert (rho, p) == pytest.approx((expected.statistic, expected.pvalue))
    assert rho > 0  # higher-activation segments are more homogeneous here
    assert np.isnan(homogeneity_trend(np.array([0.3, np.nan, 0.2]))[0])
    assert np.isnan(homogeneity_trend(np.full(5, 0.2))[0])


@pytest.mark.parametrize("measure", ["pairwise", "centroid"])
def test_bottom_up_reports_the_null_and_successive_tests_of_one_seeded_stream(measure):
    acts, X = _tokens(seed=6)
    C = cosine_matrix(X)
    labels = equal_count_segments(acts, 5)
    result = bottom_up(acts, C, labels, 5, measure, n_permutations=60, seed=11)

    rng = np.random.default_rng(11)  # bottom_up draws the homogeneity null, then the successive one
    null = homogeneity_null(C, labels, 5, measure, 60, rng)
    successive = successive_similarity(C, acts, 60, rng)
    table = result.segments
    np.testing.assert_allclose(table["homogeneity"], null.observed)
    np.testing.assert_allclose(table["z"], null.z)
    np.testing.assert_allclose(table["p"], null.p)
    summary = result.summary
    assert (summary["z_top"], summary["p_top"]) == (null.z[0], null.p[0])
    assert summary["successive_z"] == pytest.approx(successive.z)
    assert summary["successive_p_less"] == pytest.approx(successive.p_less)

    rest = _homogeneity_reference(X, (labels != 0).astype(int), 2, measure)[1]
    everything = _homogeneity_reference(X, np.zeros(acts.size, dtype=int), 1, measure)[0]
    assert summary["h_rest"] == pytest.approx(rest)
    assert summary["h_all"] == pytest.approx(everything)
    assert summary["h_top_minus_rest"] == pytest.approx(null.observed[0] - rest)
    assert (summary["trend_rho"], summary["trend_p"]) == pytest.approx(
        homogeneity_trend(null.observed)
    )


def test_bottom_up_segment_table_has_each_segments_activation_range():
    acts, X = _tokens(seed=7)
    labels = equal_count_segments(acts, 4)
    table = bottom_up(acts, cosine_matrix(X), labels, 4, n_permutations=5).segments
    grouped = pd.Series(acts).groupby(labels).agg(["size", "min", "max", "mean"])
    np.testing.assert_array_equal(table["size"], grouped["size"])
    np.testing.assert_allclose(
        table[["act_min", "act_max", "act_mean"]], grouped[["min", "max", "mean"]]
    )
    assert (table["act_min"].to_numpy()[:-1] > table["act_max"].to_numpy()[1:]).all()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"measure": "silhouette"}, "analysis.homogeneity"),
     ({"n_permutations": 0}, "analysis.n_permutations")],
)  # fmt: skip
def test_bad_null_settings_raise_config_error(kwargs, key):
    acts, X = _tokens()
    with pytest.raises(ConfigError, match=key):
        homogeneity_null(cosine_matrix(X), equal_count_segments(acts, 4), 4, **kwargs)
