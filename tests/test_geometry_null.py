"""The geometry null (`two_fold.geometry_null`, `stats.empirical`): each neuron's geometry statistics
against the layer's pseudo-neurons, by the empirical p with a generalized-Pareto tail, matched in
selectivity, withheld below a minimum null size, and checked on itself leave-one-out.

Tolerances. A pseudo-neuron tested leave-one-out against the other R - 1 = 2,047 has a p uniform on
{1/R, ..., 1} when the draws are exchangeable, so the share with p < .05 is about Binomial(R, .05)
/ R: we accept 0.05 +- 3 SE = 0.05 +- 0.0144 (SE = sqrt(.05 * .95 / 2048)). BH at .05 over R such
p discovers nothing on most draws (the rate under the global null is the level, 5%, for "any
discovery"); we accept at most 1% of the pseudo-neurons, the issue's target. Seeds are fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from intraneuron.analyses.two_fold.aggregate import NULL_COMPARED, aggregate_layer
from intraneuron.analyses.two_fold.geometry_null import (
    GEOMETRY_COLUMNS,
    geometry_excess,
    geometry_metrics,
)
from intraneuron.analyses.two_fold.neuron import ROW_KEYS
from intraneuron.analyses.two_fold.reasons import layer_reasons, neuron_reason

ALPHA = 0.05
R, N = 2048, 1536  # pseudo-neurons (the default) and neurons (a SmolLM2 layer)
LOO_TOLERANCE = 3 * math.sqrt(0.05 * 0.95 / R)


def _nulls(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """One null family per geometry statistic, none of them normal: skewed (lognormal and
    chi-square, skew about 3), zero-inflated (25% exact zeros), bounded with an atom at the bound,
    bounded with a long left tail."""
    zero_inflated = np.where(rng.random(n) < 0.25, 0.0, rng.lognormal(-2.0, 1.0, n))
    return {
        "z_top": rng.lognormal(0.0, 0.8, n),  # skew about 3
        "h_top_minus_rest": rng.chisquare(1, n),  # skew about 2.8
        "trend_rho": np.clip(rng.normal(0.2, 0.4, n), -1.0, 1.0),  # atoms at -1 and 1
        "epsilon2": rng.beta(0.6, 8.0, n),  # bounded, skew about 2.3
        "ari": zero_inflated,  # 25% zeros, like ARI of neurons whose categories miss the segments
        "mantel_rho": np.minimum(rng.beta(0.5, 3.0, n) * 1.2, 1.0),  # atom at its upper bound 1
        "silhouette": 1.0 - rng.lognormal(-2.0, 0.7, n),  # bounded above, long left tail
        "successive_z": rng.standard_t(3, n),  # heavy tails on both sides
    }


def _rows(rng: np.random.Generator, n: int, selectivity: np.ndarray | None = None, **values) -> pd.DataFrame:
    """Analysed rows with categories: every ROW_KEYS column, the geometry statistics from `_nulls`
    unless given, selectivity ~ 1 + Exp(1) (what passes a floor of 1 SD) unless given."""
    rows = pd.DataFrame({key: rng.random(n) for key in ROW_KEYS})
    rows["skipped"], rows["topdown_skipped"], rows["p_top_method"] = "", "", "permutation"
    rows["n_categories"] = 3.0
    for c, v in {**_nulls(rng, n), **values}.items():
        rows[c] = v
    rows["selectivity"] = 1.0 + rng.exponential(1.0, n) if selectivity is None else selectivity
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_neurons_left_out_one_at_a_time_are_significant_at_the_nominal_rate(seed):
    rng = np.random.default_rng(seed)
    pseudo, real = _rows(rng, R), _rows(rng, N)  # neurons from the null too: nothing to find
    assert stats.skew(pseudo["z_top"]) > 2 and (pseudo["ari"] == 0).mean() == pytest.approx(0.25, abs=0.03)
    metrics = geometry_metrics(real, pseudo, ALPHA)
    for c in GEOMETRY_COLUMNS:
        assert metrics[f"geometry/{c}_n_null"] == R, c
        assert metrics[f"geometry/{c}_pseudo_sig_frac_bh"] <= 0.01, c
        assert abs(metrics[f"geometry/{c}_pseudo_frac_p05"] - 0.05) <= LOO_TOLERANCE, c
        # neurons drawn from the null fare the same against all of it (a normal fit did not: 1-3%)
        assert metrics[f"geometry/{c}_sig_frac_bh"] <= 0.01, c


def test_a_value_on_an_atom_of_the_null_gets_the_atom_s_mass_not_a_tail_p():
    rng = np.random.default_rng(3)
    null = rng.beta(2.0, 8.0, R)
    null[:8] = 1.0  # 8 of 2,048 draws at the upper bound: fewer than the 10 that end the tail fit
    null[8:600] = 0.0  # and an atom at zero
    pseudo = _rows(rng, R, mantel_rho=null)
    real = _rows(rng, 3, mantel_rho=np.array([1.0, 0.0, 0.999]))
    p = geometry_excess(real, pseudo, match=0)["mantel_rho_p_geometry"].to_numpy()  # against all draws
    assert p[0] == (1 + 8) / (1 + R)  # the atom's mass, ties counted, no tail fit
    assert p[1] == (1 + R) / (1 + R)  # every draw is >= 0
    assert p[2] >= 8 / (1 + R)  # just below the bound, in a gap of the null: the 8 at the bound reach it
    loo = geometry_metrics(real, pseudo, ALPHA, match=0)
    assert loo["geometry/mantel_rho_pseudo_sig_frac_bh"] == 0.0  # the 8 at the bound: p = 8 / 2048 each


def test_neurons_truly_above_the_null_are_found_with_90_percent_power():
    """300 of 1,536 neurons planted beyond the 99th percentile of a right-skewed and of a
    left-skewed bounded null (where a normal fit's SD, inflated by the long left tail, hides them)."""
    rng = np.random.default_rng(4)
    pseudo = _rows(rng, R)
    real = _rows(rng, N)
    planted = np.arange(N) < 300
    real.loc[planted, "z_top"] = rng.lognormal(np.log(12.0), 0.3, 300)  # null: 99th percentile 6.4
    top = np.quantile(pseudo["silhouette"], 0.99)
    real.loc[planted, "silhouette"] = top + (1.0 - top) * rng.uniform(0.2, 1.0, 300)
    judged = geometry_excess(real, pseudo)
    for c in ("z_top", "silhouette"):
        rejected = stats.false_discovery_control(judged[f"{c}_p_geometry"].to_numpy(), method="bh") < ALPHA
        assert rejected[planted].mean() >= 0.9, c
        assert rejected[~planted].sum() <= 0.1 * rejected.sum(), c  # BH at .05: FDR <= .05 * 0.8 expected
        assert judged.loc[planted, f"{c}_excess"].min() > 0, c


def _selectivity_world(seed: int, shift: float = 0.0):
    """Pseudo-neurons mostly near the selectivity floor, neurons more selective; the statistic
    rises with selectivity (z_top = 2 sqrt(s) + skewed noise) on both sides, plus `shift` for the
    first 300 neurons."""
    rng = np.random.default_rng(seed)
    s_pseudo, s_real = 1 + 4 * rng.beta(1, 4, R), 1 + 4 * rng.beta(4, 2, N)
    pseudo = _rows(rng, R, s_pseudo, z_top=2 * np.sqrt(s_pseudo) + rng.gamma(2, 0.1, R))
    real = _rows(rng, N, s_real, z_top=2 * np.sqrt(s_real) + rng.gamma(2, 0.1, N) + shift * (np.arange(N) < 300))
    return real, pseudo


@pytest.mark.parametrize("seed", [5, 6])
def test_selective_neurons_are_not_above_geometry_against_pseudo_neurons_of_their_selectivity(seed):
    real, pseudo = _selectivity_world(seed)
    assert real["selectivity"].median() > np.quantile(pseudo["selectivity"], 0.9)
    unmatched = geometry_metrics(real, pseudo, ALPHA, match=0)
    assert unmatched["geometry/z_top_sig_frac_bh"] > 0.5  # selectivity alone looks like an effect
    judged = geometry_excess(real, pseudo)  # default: the 512 nearest in selectivity
    matched = geometry_metrics(judged, pseudo, ALPHA, judged=True)
    assert matched["geometry/z_top_sig_frac_bh"] <= 0.01
    assert (judged["z_top_p_geometry"] < 0.05).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / N)
    assert abs(matched["geometry/z_top_pseudo_frac_p05"] - 0.05) <= LOO_TOLERANCE
    # a real effect on top of selectivity is still found
    real, pseudo = _selectivity_world(seed, shift=1.0)
    p = geometry_excess(real, pseudo, ("z_top",))["z_top_p_geometry"].to_numpy()
    rejected = stats.false_discovery_control(p, method="bh") < ALPHA
    assert rejected[:300].mean() >= 0.9 and rejected[300:].sum() <= 0.1 * rejected.sum()


def test_a_null_below_the_minimum_withholds_the_p_and_the_layer_says_why():
    rng = np.random.default_rng(7)
    pseudo, real = _rows(rng, 300), _rows(rng, 100)
    pseudo.loc[:99, "skipped"] = "selectivity 0.50 SD < core_tokens.min_selectivity=1"
    pseudo.loc[100:249, "topdown_skipped"] = "no categorical structure: K = 1 by the gap statistic"
    pseudo.loc[100:249, ["epsilon2", "silhouette"]] = np.nan
    pseudo.loc[100:249, "ari"] = 0.0  # imputed for K = 1: not part of ARI's null
    judged = geometry_excess(real, pseudo)
    assert judged["z_top_p_geometry"].notna().all() and (judged["z_top_n_null"] == 200).all()
    for c in ("epsilon2", "ari", "silhouette"):  # 50 pseudo-neurons with categories
        assert judged[f"{c}_p_geometry"].isna().all() and judged[f"{c}_excess"].isna().all(), c
        assert (judged[f"{c}_n_null"] == 50).all(), c
        assert neuron_reason(judged.iloc[0].to_dict(), f"{c}_p_geometry").startswith("insufficient null: 50 "), c
    metrics = aggregate_layer(judged, ALPHA, pseudo)
    reasons = layer_reasons(judged, pseudo, metrics)
    assert np.isfinite(metrics["geometry/z_top_sig_frac_bh"]) and "geometry/z_top_sig_frac_bh" not in reasons
    for c in ("epsilon2", "ari", "silhouette"):
        for key in (f"geometry/{c}_sig_frac_bh", f"geometry/{c}_pseudo_sig_frac_bh", f"geometry/{c}_excess_median"):
            assert math.isnan(metrics[key]), key
            assert reasons[key] == (
                f"insufficient null: 50 of 300 pseudo-neurons give {c} (with categories) (< "
                "analysis.min_pseudo_neurons=200); not analysed: too little selectivity "
                "(core_tokens.min_selectivity) for 100 of 300 pseudo-neurons"
            ), key
    # 200 analysed pseudo-neurons: the headline summaries have their pseudo value; 199 do not
    assert all(np.isfinite(metrics[f"{key}_pseudo"]) for key in NULL_COMPARED)
    pseudo.loc[100, "skipped"] = "3 core tokens (< core_tokens.min_core_tokens=10)"
    metrics = aggregate_layer(real, ALPHA, pseudo)
    reasons = layer_reasons(real, pseudo, metrics)
    for key in NULL_COMPARED:
        assert math.isnan(metrics[f"{key}_pseudo"]) and math.isnan(metrics[f"{key}_excess"])
        assert reasons[f"{key}_pseudo"].startswith("insufficient null: 199 of 300 pseudo-neurons analysed")


def test_headline_summaries_stand_beside_the_pseudo_neurons_value_and_ari_counts_k_of_2_or_more():
    rng = np.random.default_rng(8)
    real, pseudo = _rows(rng, 400), _rows(rng, 400)
    k1 = np.arange(400) < 100  # a quarter of the neurons without categories: ARI 0 imputed
    real.loc[k1, "topdown_skipped"], real.loc[k1, "n_categories"], real.loc[k1, "ari"] = "K = 1", 1.0, 0.0
    real.loc[~k1, "ari"] = rng.uniform(0.2, 0.6, 300)
    metrics = aggregate_layer(real, ALPHA, pseudo)
    alone = aggregate_layer(pseudo, ALPHA)
    assert metrics["homomorphism/ari/median"] == pytest.approx(np.median(real.loc[~k1, "ari"]))
    assert metrics["neurons/topdown_skipped_frac"] == 0.25
    for key in NULL_COMPARED:
        assert metrics[f"{key}_pseudo"] == alone[key], key
        assert metrics[f"{key}_excess"] == pytest.approx(metrics[key] - alone[key]), key
    assert metrics["neurons/topdown_skipped_frac_excess"] == 0.25
    for c in GEOMETRY_COLUMNS:
        assert metrics[f"geometry/{c}_sig_frac_bh_excess"] == pytest.approx(
            metrics[f"geometry/{c}_sig_frac_bh"] - metrics[f"geometry/{c}_pseudo_sig_frac_bh"]
        )


# A tiny random model on 8k tokens with 32 pseudo-neurons per layer: far fewer than the 200 the
# geometry null needs, through the real job (extraction, both populations analysed, tracked).
SMALL_NULL_JOB = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=0", "core_tokens.n=30",
                  "core_tokens.min_count=2", "neurons=range", "neurons.stop=16", "extraction.pseudo_neurons=32",
                  "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", "extraction.progress=false",
                  "report=none"]  # fmt: skip


def test_a_run_whose_null_is_too_small_reports_nan_geometry_p_with_the_reason(run_job):
    from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis
    from intraneuron.reports import artifacts

    summary, client = run_job(*SMALL_NULL_JOB)
    run = client.get_run(summary.run_id)
    neurons = artifacts.load_table(client, summary.run_id, 0, "neurons")
    pseudo = artifacts.load_table(client, summary.run_id, 0, "pseudo_neurons")
    metrics = artifacts.load_summary(client, summary.run_id, 0)
    analysed = neurons[neurons["skipped"] == ""]
    assert len(pseudo) == 32 and len(analysed) > 0
    assert math.isnan(summary.layers[0]["top_segment_above_geometry_frac"])
    reason = summary.reasons[0]["top_segment_above_geometry_frac"]
    assert reason.startswith("insufficient null: ") and "of 32 pseudo-neurons give z_top" in reason
    assert "analysis.min_pseudo_neurons=200" in reason
    assert run.data.tags["reason.L0/top_segment_above_geometry_frac"] == reason
    for c in GEOMETRY_COLUMNS:
        assert neurons[f"{c}_p_geometry"].isna().all(), c
        assert (neurons[f"{c}_n_null"] < 200).all(), c
        assert math.isnan(metrics[f"geometry/{c}_sig_frac_bh"]) and math.isnan(metrics[f"geometry/{c}_pseudo_frac_p05"])
    assert metrics["geometry/n_pseudo"] == (pseudo["skipped"] == "").sum()
    analysis = TwoFoldAnalysis()
    row = analysed.iloc[0].to_dict()
    assert analysis.missing_reason(row, "z_top_p_geometry").startswith("insufficient null: ")


def test_without_selectivity_every_pseudo_neuron_is_the_null():
    """core_tokens.min_selectivity 0 computes no selectivity: no matching, all draws compared."""
    rng = np.random.default_rng(9)
    pseudo, real = _rows(rng, 1000), _rows(rng, 50)
    pseudo["selectivity"], real["selectivity"] = np.nan, np.nan
    judged = geometry_excess(real, pseudo, ("z_top",))
    assert (judged["z_top_n_null"] == 1000).all()
    null = np.sort(pseudo["z_top"].to_numpy())
    at_or_above = 1000 - np.searchsorted(null, real["z_top"].to_numpy(), side="left")
    inside = at_or_above >= 10  # the empirical p; beyond, the tail fit
    assert judged.loc[inside, "z_top_p_geometry"].to_numpy() == pytest.approx((1 + at_or_above[inside]) / 1001)
