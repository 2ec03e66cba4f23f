"""Planted structure is found and null neurons are not, through `analyse_neuron` and
`aggregate_layer` (the whole steps 4-10 pipeline on synthetic neurons).

Planted neuron: K well-separated clusters of vectors (the categories), and category c gets
activations around c, so activation level and category coincide. Null neuron: the same kind of
vectors, activations drawn independently of them.

Calibration tolerance. Under the null each neuron's test is valid, so the fraction of N
independent null neurons with p < alpha is Binomial(N, r) / N, with r the test's exact size
(permutation p = (1 + #)/(1 + P) with P = 199: P(p < 0.05) = 9/200 = 0.045; Kruskal-Wallis: its
chi-square approximation, close to 0.05 with 25 tokens per category). We accept the observed
fraction within alpha +- 3 standard errors, sqrt(alpha (1 - alpha) / N): a correct test falls
outside with probability about 0.3% (normal approximation), while a test that ignores the null
(rate 0 or >= 0.1 at N = 200) falls outside. The seeds are fixed, so the outcome is deterministic.
"""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from intraneuron.analyses.two_fold.aggregate import aggregate_layer
from intraneuron.analyses.two_fold.neuron import ROW_KEYS, analyse_neuron

ALPHA = 0.05
N_CATEGORIES, PER_CATEGORY, D = 4, 25, 64
# max_permutations = n_permutations: a fixed P, no sequential stages for the top segment
# (those are tested in tests/test_adaptive_permutations.py)
FAST = {"n_permutations": 199, "max_permutations": 199, "n_mantel_permutations": 199}


def _vectors(rng):
    """X [K * per, d]: unit-scale centres (nearly orthogonal in d = 64) plus small noise;
    truth [K * per]: each token's cluster."""
    truth = np.repeat(np.arange(N_CATEGORIES), PER_CATEGORY)
    centres = rng.normal(size=(N_CATEGORIES, D))
    return centres[truth] + rng.normal(scale=0.3, size=(truth.size, D)), truth


def planted_neuron(seed):
    """acts [n] around each token's category index (sd 0.15: no overlap), X [n, d], truth [n]."""
    rng = np.random.default_rng(seed)
    X, truth = _vectors(rng)
    acts = truth + rng.normal(scale=0.15, size=truth.size)
    order = rng.permutation(truth.size)  # token order carries no information
    return acts[order], X[order], truth[order]


def null_neuron(seed):
    """acts [n] independent of the clustered vectors X [n, d]; random categories [n]."""
    rng = np.random.default_rng(seed)
    X, _ = _vectors(rng)
    return rng.normal(size=X.shape[0]), X, rng.integers(0, N_CATEGORIES, size=X.shape[0])


def _rows(results):
    return pd.DataFrame([r.row for r in results], columns=list(ROW_KEYS))


def _within_binomial_tolerance(fraction, n, alpha=ALPHA):
    return abs(fraction - alpha) <= 3 * np.sqrt(alpha * (1 - alpha) / n)


@pytest.fixture(scope="module")
def planted_rows():
    """20 planted neurons with the default analysis (Ward, silhouette K, 10 equal-count segments)."""
    results = [analyse_neuron(*planted_neuron(s)[:2], seed=(1, s), **FAST) for s in range(20)]
    return _rows(results)


@pytest.fixture(scope="module")
def null_rows():
    """200 null neurons with random categories (given as labels), fewer permutations."""
    results = []
    for s in range(200):
        acts, X, labels = null_neuron((2, s))
        results.append(analyse_neuron(acts, X, labels, seed=(3, s), **FAST))
    return _rows(results)


def test_planted_categories_differ_in_activation(planted_rows):
    assert (planted_rows["n_categories"] == N_CATEGORIES).all()  # Ward + silhouette find K
    assert (planted_rows["kruskal_p"] < 1e-10).all()
    assert (planted_rows["diff_rate"] == 1.0).all()  # every pair significant after Holm
    assert (planted_rows["interleaving_mean"] == 0.0).all()  # activations never interleave


def test_planted_top_segment_is_homogeneous(planted_rows):
    assert (planted_rows["z_top"] > 5).all()
    # the observed segment beats all 199 shuffles: the smallest p a permutation test can give
    assert (planted_rows["p_top"] == 1 / 200).all()
    assert (planted_rows["h_top"] > planted_rows["h_rest"] + 0.3).all()


def test_planted_segments_agree_with_the_categories_as_far_as_their_sizes_allow(planted_rows):
    # 10 segments of 10 tokens against 4 categories of 25: perfect separation by activation
    # gives exactly the ARI of the nested layout, not 1.
    truth = np.repeat(np.arange(N_CATEGORIES), PER_CATEGORY)
    ideal = adjusted_rand_score(truth, np.arange(truth.size) * 10 // truth.size)
    np.testing.assert_allclose(planted_rows["ari"], ideal)
    assert (planted_rows["mantel_p"] < ALPHA).all()


def test_planted_with_one_segment_per_category_gives_ari_one():
    acts, X, _ = planted_neuron(0)
    row = analyse_neuron(acts, X, n_segments=N_CATEGORIES, seed=0, **FAST).row
    assert row["ari"] == 1.0 and row["ami"] == 1.0


def test_only_a_homogeneous_top_is_found_when_the_rest_is_unstructured():
    # The paper's "homogeneous only at very high activation": the 10 highest tokens come from one
    # tight cluster, the other 90 are random vectors with random lower activations.
    rng = np.random.default_rng(7)
    X = rng.normal(size=(100, D))
    X[:10] = rng.normal(size=D) + rng.normal(scale=0.3, size=(10, D))
    acts = np.concatenate([5 + rng.random(10), rng.random(90) * 4])
    row = analyse_neuron(acts, X, seed=0, **FAST).row
    assert row["p_top"] < ALPHA and row["z_top"] > 5
    assert row["trend_rho"] > 0


def test_planted_layer_aggregates_report_detection(planted_rows):
    metrics = aggregate_layer(planted_rows, ALPHA)
    assert metrics["topdown/kruskal_sig_frac_bh"] == 1.0
    assert metrics["bottomup/top_sig_frac_bh"] == 1.0
    assert metrics["topdown/diff_rate/median"] == 1.0
    assert metrics["bottomup/sign_test_pos_frac"] == 1.0
    assert metrics["bottomup/wilcoxon_top_rest_p"] < 1e-4  # 20 of 20 positive differences


def test_null_top_segment_false_positive_rate_is_alpha(null_rows):
    metrics = aggregate_layer(null_rows, ALPHA)
    fraction = metrics["bottomup/top_sig_frac"]
    assert fraction == pytest.approx(np.mean(null_rows["p_top"] < ALPHA))
    assert _within_binomial_tolerance(fraction, len(null_rows)), fraction


def test_null_kruskal_false_positive_rate_is_alpha(null_rows):
    fraction = aggregate_layer(null_rows, ALPHA)["topdown/kruskal_sig_frac"]
    assert fraction == pytest.approx(np.mean(null_rows["kruskal_p"] < ALPHA))
    assert _within_binomial_tolerance(fraction, len(null_rows)), fraction


def test_null_mantel_false_positive_rate_is_alpha(null_rows):
    fraction = np.mean(null_rows["mantel_p"] < ALPHA)
    assert _within_binomial_tolerance(fraction, len(null_rows)), fraction


def test_null_neurons_show_no_layer_level_effect(null_rows):
    metrics = aggregate_layer(null_rows, ALPHA)
    assert metrics["bottomup/top_sig_frac_bh"] <= 3 / len(null_rows)  # BH: almost no discoveries
    assert abs(metrics["homomorphism/ari/median"]) < 0.02


def test_null_sign_test_holds_its_level_although_the_null_is_skewed(null_rows):
    # With clustered vectors a 10-token segment's homogeneity null is right-skewed: most null
    # neurons have z_top < 0 (the old "z_top > 0" sign test gave p = 0.009 on these neurons).
    n = len(null_rows)
    assert np.mean(null_rows["z_top"] < 0) > 0.5 + 2 * np.sqrt(0.25 / n)  # the skew is there
    # Counting H_top above its null median instead: Binomial(n, 1/2) / n, within 3 SE of 1/2.
    metrics = aggregate_layer(null_rows, ALPHA)
    assert abs(metrics["bottomup/sign_test_pos_frac"] - 0.5) <= 3 * np.sqrt(0.25 / n)
    assert metrics["bottomup/sign_test_p"] > 0.01


def test_sign_test_counts_neurons_above_their_null_median_not_positive_z():
    # 199 permutations, p_top = (1 + #)/200 with # = 0..199 once each (what a null layer gives
    # on average); a skewed null puts z_top below 0 for 60% of them (z is 0 at p = 0.4).
    p_top = np.arange(1, 201) / 200
    rows = pd.DataFrame({"p_top": p_top, "z_top": 0.4 - p_top, "skipped": ""})
    metrics = aggregate_layer(rows, ALPHA)
    assert metrics["bottomup/sign_test_pos_frac"] == 0.5
    assert metrics["bottomup/sign_test_p"] == 1.0
    rows.loc[:9, "z_top"] = np.nan  # a constant null: no z, the neuron is dropped
    assert aggregate_layer(rows, ALPHA)["bottomup/sign_test_pos_frac"] == 90 / 190


@pytest.mark.slow
def test_null_calibration_with_default_settings_and_clustering():
    """1,000 null neurons, default analysis (Ward categories from X, 1,000 permutations, Mantel
    999): all three rates within alpha +- 3 SE (SE = 0.0069 at N = 1,000)."""
    rows = []
    for s in range(1000):
        acts, X, _ = null_neuron((4, s))
        rows.append(analyse_neuron(acts, X, seed=(5, s)).row)
    rows = pd.DataFrame(rows, columns=list(ROW_KEYS))
    for column in ("p_top", "kruskal_p", "mantel_p"):
        fraction = np.mean(rows[column] < ALPHA)
        assert _within_binomial_tolerance(fraction, len(rows)), (column, fraction)
