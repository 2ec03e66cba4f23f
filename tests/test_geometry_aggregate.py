"""Storey's pi0 beside the BH fractions, and the pseudo-neuron (read-in geometry) calibration of
the layer aggregates: no excess when real and pseudo rows share a distribution, found when real
rows are shifted up, skipped rows ignored, keys stable and NaN-safe without pseudo rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from intraneuron.analyses.two_fold.aggregate import (
    GEOMETRY_COLUMNS,
    NULL_COMPARED,
    aggregate_layer,
    compared_keys,
    geometry_excess,
)
from intraneuron.analyses.two_fold.neuron import ROW_KEYS
from intraneuron.stats.multiple import storey_pi0


def test_storey_pi0_by_hand():
    # 6 finite p values, 2 above 0.5: 2 / (6 * 0.5)
    assert storey_pi0([0.01, 0.02, 0.03, 0.6, 0.8, 0.3, np.nan]) == pytest.approx(2 / 3)
    assert storey_pi0([0.7, 0.9, 0.6, 0.1]) == 1.0  # 3 / 2, capped
    assert storey_pi0([0.1, 0.2, 0.3, 0.4, 0.5, 0.9], lam=0.8) == pytest.approx(1 / (6 * 0.2))
    assert math.isnan(storey_pi0([np.nan])) and math.isnan(storey_pi0([]))
    with pytest.raises(ValueError):
        storey_pi0([0.5], lam=1.0)


def test_storey_pi0_on_uniform_and_half_signal_p_values():
    rng = np.random.default_rng(0)
    uniform = rng.random(20_000)
    assert storey_pi0(uniform) == pytest.approx(1.0, abs=0.03)
    signal = rng.beta(0.1, 20, 20_000)  # nearly all below 0.5
    assert storey_pi0(np.r_[uniform, signal]) == pytest.approx(0.5, abs=0.03)


def _rows(rng, n, shift=0.0, skipped=0):
    """Synthetic per-neuron rows: every ROW_KEYS column, geometry columns ~ N(shift-ish, 1)."""
    rows = pd.DataFrame({key: rng.random(n) for key in ROW_KEYS})
    rows["skipped"], rows["topdown_skipped"], rows["p_top_method"] = "", "", "permutation"
    for c in GEOMETRY_COLUMNS:
        rows[c] = rng.standard_normal(n) + shift
    rows.loc[rows.index[:skipped], "skipped"] = "3 core tokens (< core_tokens.min_core_tokens=10)"
    return rows


def test_real_and_pseudo_rows_from_one_distribution_give_uniform_p_and_no_discoveries():
    rng = np.random.default_rng(1)
    real, pseudo = _rows(rng, 2000), _rows(rng, 2000)
    out = geometry_excess(real, pseudo)
    for c in GEOMETRY_COLUMNS:
        p = out[f"{c}_p_geometry"].to_numpy()
        assert stats.kstest(p, "uniform").pvalue > 0.01, c
        assert (out[f"{c}_n_null"] == 2000).all(), c  # no selectivity column: every pseudo-neuron
    metrics = aggregate_layer(real, 0.05, pseudo)
    assert metrics["geometry/n_pseudo"] == 2000.0
    for c in GEOMETRY_COLUMNS:
        assert metrics[f"geometry/{c}_sig_frac_bh"] <= 0.005, c
        assert metrics[f"geometry/{c}_pi0"] == pytest.approx(1.0, abs=0.1)
        assert abs(metrics[f"geometry/{c}_excess_median"]) < 0.15
    assert metrics["bottomup/top_sig_vs_pseudo_p"] > 0.01  # p_top ~ U(0, 1) on both sides


def test_an_upward_shift_of_the_real_rows_is_found():
    rng = np.random.default_rng(2)
    pseudo = _rows(rng, 256)
    real = _rows(rng, 1000)
    real.loc[:199, list(GEOMETRY_COLUMNS)] += 5.0  # 200 neurons 5 sd above the pseudo-neurons
    real.loc[:199, "p_top"] = 1e-4
    out = geometry_excess(real, pseudo)
    assert out.loc[:199, "z_top_excess"].median() == pytest.approx(5.0, abs=0.3)
    assert out.loc[:199, "z_top_p_geometry"].max() <= 5 / 257  # 256 draws: no tail fit, p >= 1 / 257
    metrics = aggregate_layer(real, 0.05, pseudo)
    for c in GEOMETRY_COLUMNS:
        assert 0.17 <= metrics[f"geometry/{c}_sig_frac_bh"] <= 0.25, c  # 0.2 planted, FDR 5%
        assert metrics[f"geometry/{c}_pi0"] == pytest.approx(0.8, abs=0.1)
    assert metrics["bottomup/top_sig_frac"] > metrics["bottomup/top_sig_frac_pseudo"]
    assert metrics["bottomup/top_sig_vs_pseudo_p"] < 1e-6
    assert metrics["bottomup/top_pi0_geometry"] == pytest.approx(0.8, abs=0.1)


def test_skipped_rows_are_ignored_on_both_sides():
    rng = np.random.default_rng(3)
    real, pseudo = _rows(rng, 300, skipped=20), _rows(rng, 300, skipped=50)
    pseudo.loc[:49, list(GEOMETRY_COLUMNS)] = 1e6  # would dominate mean and sd if counted
    pseudo.loc[:49, "p_top"] = 0.0
    out = geometry_excess(real, pseudo)
    assert out.loc[:19, [f"{c}_{s}" for c in GEOMETRY_COLUMNS for s in ("excess", "p_geometry")]].isna().all().all()
    kept = pseudo.loc[50:, "z_top"]
    assert out.loc[20:, "z_top_excess"].to_numpy() == pytest.approx(
        real.loc[20:, "z_top"].to_numpy() - kept.median()
    )
    value = real.loc[25, "z_top"]
    assert out.loc[25, "z_top_p_geometry"] == (1 + np.sum(kept >= value)) / 251
    assert (out["z_top_n_null"] == 250).all()
    metrics = aggregate_layer(real, 0.05, pseudo)
    assert metrics["geometry/n_pseudo"] == 250.0
    assert metrics["bottomup/top_sig_frac_pseudo"] == np.mean(pseudo.loc[50:, "p_top"] < 0.05)


def test_absent_columns_are_skipped_and_aggregate_keys_are_stable_and_nan_safe():
    rng = np.random.default_rng(4)
    real, pseudo = _rows(rng, 50), _rows(rng, 50).drop(columns=["ari"])
    out = geometry_excess(real, pseudo)
    assert "ari_excess" not in out and "z_top_excess" in out
    with_pseudo = aggregate_layer(real, 0.05, pseudo)
    without = aggregate_layer(real, 0.05)
    empty = aggregate_layer(real.iloc[:0], 0.05, pseudo.iloc[:0])
    assert sorted(with_pseudo) == sorted(without) == sorted(empty)
    geometry = [k for k in without if k.startswith("geometry/") and k != "geometry/n_pseudo"]
    assert len(geometry) == 7 * len(GEOMETRY_COLUMNS)
    against_pseudo = compared_keys()
    assert len(against_pseudo) == 2 * len(NULL_COMPARED) and set(against_pseudo) <= set(without)
    for key in [*geometry, *against_pseudo, "bottomup/top_sig_frac_pseudo", "bottomup/top_sig_vs_pseudo_p",
                "bottomup/top_pi0_geometry"]:  # fmt: skip
        assert math.isnan(without[key]) or key.endswith("_n_null"), key
    assert without["geometry/n_pseudo"] == 0.0 and empty["geometry/n_pseudo"] == 0.0
    assert math.isnan(with_pseudo["geometry/ari_excess_median"])
    for key in ("bottomup/top_pi0", "topdown/kruskal_pi0", "homomorphism/mantel_pi0",
                "bottomup/successive_less_pi0"):  # fmt: skip
        assert 0.0 <= without[key] <= 1.0, key
        assert math.isnan(empty[key]), key
