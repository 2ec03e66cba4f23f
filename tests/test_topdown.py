"""Top-down statistics (steps 4-6) against scipy and brute-force loops."""

import itertools

import numpy as np
import pytest
from scipy import stats

from intraneuron.analyses.two_fold.topdown import (
    category_stats,
    holm_adjust,
    level_relation,
    omnibus_tests,
    pairwise_mann_whitney,
    pairwise_table,
    range_overlap,
    top_down,
)
from intraneuron.errors import ConfigError


def _neuron(sizes=(30, 12, 25, 9), shift=0.4, seed=0, uncovered=7, decimals=None):
    """acts [n] and labels [n] with categories 0..K-1 of the given sizes, shuffled; `uncovered`
    extra tokens labelled -1 get extreme activations so that keeping them would show."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    acts = rng.normal(size=labels.size) + shift * labels
    if decimals is not None:
        acts = np.round(acts, decimals)  # ties
    labels = np.concatenate([labels, np.full(uncovered, -1)])
    acts = np.concatenate([acts, np.full(uncovered, 100.0)])
    order = rng.permutation(labels.size)
    return acts[order], labels[order]


def _groups(acts, labels):
    """{category: its activations}, uncovered tokens left out."""
    return {c: acts[labels == c] for c in sorted(set(labels.tolist()) - {-1})}


def _holm_reference(p):
    """Holm step-down, written out: sort, multiply by m - rank, running max, cap at 1."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    tested = [i for i in range(p.size) if not np.isnan(p[i])]
    tested.sort(key=lambda i: p[i])
    m = len(tested)
    running = 0.0
    for rank, i in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _cliffs_delta_reference(a, b):
    return sum(np.sign(x - y) for x in a for y in b) / (a.size * b.size)


def _interleaving_reference(a, b):
    """Fraction of cross pairs ordered against the category means (ties count 1/2)."""
    high, low = (a, b) if a.mean() >= b.mean() else (b, a)
    against = sum(1.0 if x < y else 0.5 if x == y else 0.0 for x in high for y in low)
    return against / (a.size * b.size)


def _overlap_reference(lo_a, hi_a, lo_b, hi_b):
    shared = max(0.0, min(hi_a, hi_b) - max(lo_a, lo_b))
    span = max(hi_a, hi_b) - min(lo_a, lo_b)
    return shared / span if span > 0 else 1.0


def test_category_stats_match_numpy_per_category_and_drop_uncovered():
    acts, labels = _neuron()
    table = category_stats(acts, labels)
    groups = _groups(acts, labels)
    np.testing.assert_array_equal(table["category"], list(groups))
    for row, values in enumerate(groups.values()):
        q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
        assert table["size"][row] == values.size
        assert table["mean"][row] == pytest.approx(values.mean())
        assert table["sd"][row] == pytest.approx(values.std(ddof=1))
        assert table["median"][row] == pytest.approx(median)
        assert (table["min"][row], table["max"][row]) == (values.min(), values.max())
        assert (table["q25"][row], table["q75"][row]) == pytest.approx((q25, q75))
        assert table["iqr"][row] == pytest.approx(q75 - q25)


def test_single_token_category_has_nan_sd():
    table = category_stats(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0, 0, 0, 1]))
    assert np.isnan(table["sd"][1])
    assert table["sd"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties (Kruskal tie correction)
def test_omnibus_tests_match_scipy_and_hand_computed_effect_sizes(decimals):
    acts, labels = _neuron(decimals=decimals)
    groups = list(_groups(acts, labels).values())
    result = omnibus_tests(acts, labels)

    h, p_h = stats.kruskal(*groups)
    f, p_f = stats.f_oneway(*groups)
    assert (result["kruskal_h"], result["kruskal_p"]) == pytest.approx((h, p_h), rel=1e-10)
    assert (result["anova_f"], result["anova_p"]) == pytest.approx((f, p_f), rel=1e-10)

    n, k = sum(g.size for g in groups), len(groups)
    assert result["epsilon2"] == pytest.approx((h - k + 1) / (n - k))
    pooled = np.concatenate(groups)
    ss_between = sum(g.size * (g.mean() - pooled.mean()) ** 2 for g in groups)
    ss_total = sum((x - pooled.mean()) ** 2 for x in pooled)
    assert result["eta2"] == pytest.approx(ss_between / ss_total)


def test_omnibus_tests_are_nan_with_one_category():
    result = omnibus_tests(np.arange(5.0), np.array([0, 0, 0, 0, -1]))
    assert all(np.isnan(v) for v in result.values())


@pytest.mark.parametrize(
    ("sizes", "decimals"),
    [
        ((30, 12, 25, 9), None),  # both > 8: normal approximation
        ((5, 7, 3, 8), None),  # small, no ties: exact distribution
        ((6, 20, 4, 15), None),  # mixed: exact for pairs with a small side
        ((6, 20, 4, 15), 0),  # small with ties: normal approximation with tie correction
        ((30, 12, 25, 9), 1),  # large with ties
    ],
)
def test_pairwise_mann_whitney_matches_scipy_default(sizes, decimals):
    acts, labels = _neuron(sizes=sizes, decimals=decimals, seed=3)
    groups = _groups(acts, labels)
    result = pairwise_mann_whitney(acts, labels)
    pairs = list(itertools.combinations(groups, 2))  # a < b, as in the result
    assert list(zip(result["cat_a"], result["cat_b"], strict=True)) == pairs
    for row, (a, b) in enumerate(pairs):
        reference = stats.mannwhitneyu(groups[a], groups[b])  # default: method="auto", two-sided
        assert result["u"][row] == pytest.approx(reference.statistic)
        assert result["p"][row] == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-15)
        assert (result["n_a"][row], result["n_b"][row]) == (groups[a].size, groups[b].size)


def test_holm_matches_a_step_down_loop_and_keeps_nan_out_of_the_count():
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.1, size=12) ** 2
    p[[2, 7]] = np.nan
    p[4] = p[9]  # a tie
    np.testing.assert_allclose(holm_adjust(p), _holm_reference(p), equal_nan=True)
    assert np.isnan(holm_adjust(p)[[2, 7]]).all()
    assert np.isnan(holm_adjust(np.array([np.nan]))).all()


def test_pair_table_matches_brute_force_effect_sizes_overlaps_and_interleaving():
    acts, labels = _neuron(sizes=(14, 10, 12, 6), decimals=1, shift=0.8, seed=2)
    groups = _groups(acts, labels)
    table = pairwise_table(acts, labels)
    p_holm = _holm_reference(table["p"].to_numpy())
    for row, (a, b) in enumerate(itertools.combinations(groups, 2)):
        ga, gb = groups[a], groups[b]
        assert table["cliffs_delta"][row] == pytest.approx(_cliffs_delta_reference(ga, gb))
        assert table["interleaving"][row] == pytest.approx(_interleaving_reference(ga, gb))
        assert table["range_overlap"][row] == pytest.approx(
            _overlap_reference(ga.min(), ga.max(), gb.min(), gb.max())
        )
        qa, qb = np.quantile(ga, [0.25, 0.75]), np.quantile(gb, [0.25, 0.75])
        assert table["iqr_overlap"][row] == pytest.approx(_overlap_reference(*qa, *qb))
        assert table["pair_mean"][row] == pytest.approx((ga.mean() + gb.mean()) / 2)
        assert table["p_holm"][row] == pytest.approx(p_holm[row])
        assert table["significant"][row] == (p_holm[row] < 0.05)


def test_range_overlap_of_disjoint_nested_and_point_ranges():
    # [lo_a, hi_a] vs [lo_b, hi_b]: disjoint, touching, nested, identical points, partial
    lo_a, hi_a = np.array([0.0, 0.0, 0.0, 2.0, 0.0]), np.array([1.0, 1.0, 4.0, 2.0, 2.0])
    lo_b, hi_b = np.array([2.0, 1.0, 1.0, 2.0, 1.0]), np.array([3.0, 2.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(range_overlap(lo_a, hi_a, lo_b, hi_b), [0.0, 0.0, 0.25, 1.0, 1 / 3])


def test_top_down_summary_is_the_mean_over_pairs_and_ignores_uncovered_tokens():
    acts, labels = _neuron(shift=1.0, seed=4)
    result = top_down(acts, labels)
    covered = labels >= 0
    clean = top_down(acts[covered], labels[covered])  # the -1 tokens have activation 100
    assert result.summary == pytest.approx(clean.summary, nan_ok=True)
    pairs = result.pairs
    assert result.summary["n_categories"] == 4 and result.summary["n_pairs"] == 6
    assert result.summary["diff_rate"] == pytest.approx(pairs["significant"].mean())
    assert result.summary["interleaving_mean"] == pytest.approx(pairs["interleaving"].mean())
    assert result.summary["overlap_frac_positive"] == pytest.approx(
        (pairs["range_overlap"] > 0).mean()
    )
    assert result.categories["max"].max() < 100.0


def test_level_relation_is_spearman_of_pair_mean_against_abs_delta():
    pairs = {"pair_mean": np.array([0.1, 0.5, 0.9, 1.3, 2.0, 2.2]),
             "abs_delta": np.array([0.9, 0.7, 0.8, 0.3, 0.2, 0.25])}  # fmt: skip
    result = level_relation(pairs)
    rho, p = stats.spearmanr(pairs["pair_mean"], pairs["abs_delta"])
    assert (result["level_rho"], result["level_p"]) == pytest.approx((rho, p))
    assert result["level_rho"] < 0  # lower-mean pairs differ more here
    assert result["low_mean_delta_gap"] == pytest.approx(0.8 - 0.25)


def test_bad_alpha_raises_config_error():
    acts, labels = _neuron()
    with pytest.raises(ConfigError, match="analysis.alpha"):
        top_down(acts, labels, alpha=1.0)


def test_pairs_with_identical_activations_get_p_one_like_scipy():
    acts, labels = np.ones(20), np.repeat([0, 1], 10)
    assert (
        pairwise_mann_whitney(acts, labels)["p"][0]
        == stats.mannwhitneyu(acts[:10], acts[10:]).pvalue
        == 1.0
    )
    assert np.isnan(omnibus_tests(acts, labels)["kruskal_h"])  # scipy raises: all values equal
