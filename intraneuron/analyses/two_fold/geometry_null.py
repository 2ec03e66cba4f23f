"""The layer's geometry null: each neuron's geometry statistics against the layer's pseudo-neurons
(random read-in directions analysed by the same pipeline), and the null's own calibration.

p_geometry is one-sided (above the null), from `stats.empirical.upper_p`: the empirical p with
ties counted (a value on the null's atom, e.g. ARI 0, gets about the atom's mass) and the
generalized-Pareto tail beyond the last draws. There is no normal fit: the pseudo-neurons'
epsilon^2 is skewed (skew 2.7 at SmolLM2 layer 0), ARI zero-inflated, both bounded, and a normal
fitted to them made 1.6-3% of pseudo-neurons "above geometry" after BH.

Comparable null. core_tokens.min_selectivity skips pseudo-neurons by the same rule as neurons, so
the analysed null is a selected subset, and selectivity (how far the core tokens sit above the
neuron's corpus mean, in SDs) can move a statistic by itself. Each neuron is therefore compared
with the `selectivity_match` (default 512) analysed pseudo-neurons nearest to it in selectivity
(all of them when fewer), their values moved along the least-squares line of the statistic on
selectivity among them to the neuron's own selectivity (`stats.empirical.upper_p`): the window
makes the null local, the line takes out the trend left within it, which matters for the most
selective neurons, at the edge of their window or beyond the pseudo-neurons (where the line
extrapolates). selectivity_match 0 compares with every pseudo-neuron, unmatched. The statistics
that need categories (epsilon2, silhouette, ari) are compared among neurons with K >= 2 on both
sides: ARI = 0 imputed for K = 1 would zero-inflate the null, and the K = 1 share is a headline of
its own.

A null smaller than `min_null` (default 200) pseudo-neurons with a value withholds the p: the
neurons' p and excess are NaN and so are the layer's geometry metrics (`reasons.py` says
"insufficient null"). Self-calibration: every run tests each pseudo-neuron leave-one-out against
the others by the same procedure (`geometry/<c>_pseudo_sig_frac_bh`, `_pseudo_frac_p05`), so
the null's own false-positive rate stands beside each `geometry/<c>_sig_frac_bh`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from intraneuron.analyses.two_fold.rows import blank, column, finite
from intraneuron.stats.empirical import leave_one_out_p, upper_p
from intraneuron.stats.multiple import storey_pi0
from intraneuron.stats.summary import significant_fraction

# Statistics a neuron's read-in geometry alone can raise, judged against the pseudo-neurons.
GEOMETRY_COLUMNS: tuple[str, ...] = (
    "z_top", "h_top_minus_rest", "trend_rho", "epsilon2", "ari", "mantel_rho", "silhouette", "successive_z",
)  # fmt: skip
WITH_CATEGORIES = ("epsilon2", "silhouette", "ari")  # compared among neurons with K >= 2 only
MIN_NULL = 200  # analysis.min_pseudo_neurons
SELECTIVITY_MATCH = 512  # analysis.selectivity_match
P_LEVEL = 0.05  # the nominal level of the self-calibration's `_pseudo_frac_p05`
ADDED = ("_excess", "_p_geometry", "_n_null")  # what `geometry_excess` adds per statistic


def comparable(rows: pd.DataFrame, name: str) -> pd.Series:
    """The rows whose `name` enters the comparison: analysed (not skipped), with categories for a
    statistic of WITH_CATEGORIES, and a finite value."""
    keep = blank(rows, "skipped") & np.isfinite(column(rows, name))
    return keep & blank(rows, "topdown_skipped") if name in WITH_CATEGORIES else keep


def null_size(pseudo_rows: pd.DataFrame, name: str) -> int:
    """How many pseudo-neurons give statistic `name` a value: the size of its null."""
    return int(comparable(pseudo_rows, name).sum())


def geometry_excess(
    rows: pd.DataFrame, pseudo_rows: pd.DataFrame, columns: tuple[str, ...] = GEOMETRY_COLUMNS, *,
    min_null: int = MIN_NULL, match: int = SELECTIVITY_MATCH,
) -> pd.DataFrame:  # fmt: skip
    """rows with, per column c present in both tables, c_excess (value - median of the
    pseudo-neurons it is compared with), c_p_geometry (one-sided, above them) and c_n_null (how many
    pseudo-neurons that is; when fewer than min_null, the null's size and c_excess, c_p_geometry NaN).
    match: compare with the `match` pseudo-neurons nearest in selectivity (0: all of them).
    Idempotent: columns it added before (rows read back from a run, e.g. to merge the shards of a
    layer) are dropped first and recomputed, so they come out the same and in the same order.
    """
    rows = rows.drop(columns=geometry_columns_added(columns), errors="ignore")
    out = rows.copy()
    for c in columns:
        if c not in rows or c not in pseudo_rows:
            continue
        null = pseudo_rows[comparable(pseudo_rows, c)]
        value = column(rows, c).where(comparable(rows, c)).to_numpy(dtype=np.float64)  # [n]
        excess, p = np.full(value.shape, np.nan), np.full(value.shape, np.nan)
        n_null = len(null)
        if n_null >= min_null:
            keys = (_selectivity(null), _selectivity(rows)) if match else (None, None)
            result = upper_p(column(null, c).to_numpy(), value, null_key=keys[0], key=keys[1], k=match or None)
            excess, p, n_null = value - result.median, result.p, result.n_null
        out[f"{c}_excess"] = excess
        out[f"{c}_p_geometry"] = p
        out[f"{c}_n_null"] = float(n_null)
    return out


def geometry_columns_added(columns: tuple[str, ...] = GEOMETRY_COLUMNS) -> list[str]:
    """The columns `geometry_excess` adds to the rows, in the order it adds them."""
    return [f"{c}{suffix}" for c in columns for suffix in ADDED]


def self_calibration(pseudo_rows: pd.DataFrame, name: str, *, match: int = SELECTIVITY_MATCH) -> np.ndarray:
    """p [m] of each of the m comparable pseudo-neurons against the others (leave-one-out), by the
    procedure `geometry_excess` applies to neurons."""
    null = pseudo_rows[comparable(pseudo_rows, name)]
    keys = _selectivity(null) if match else None
    return leave_one_out_p(column(null, name).to_numpy(), null_key=keys, k=match or None)


def geometry_metrics(
    analysed: pd.DataFrame, pseudo_rows: pd.DataFrame | None, alpha: float, *,
    min_null: int = MIN_NULL, match: int = SELECTIVITY_MATCH, judged: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Per GEOMETRY_COLUMNS c: geometry/<c>_n_null, _excess_median, _sig_frac_bh, _pi0 of the
    analysed neurons against the pseudo-neurons, the null's self-calibration _pseudo_sig_frac_bh,
    _pseudo_frac_p05, and _sig_frac_bh_excess (neurons' share - pseudo-neurons' share); all but
    _n_null NaN without pseudo-neurons or with fewer than min_null comparable ones. Then the top
    segment's layer test calibrated by the pseudo-neurons: neurons with p_top < alpha against
    pseudo-neurons with p_top < alpha (one-sided Fisher exact test: more among the neurons).
    judged: `analysed` already has the columns of `geometry_excess` with these settings."""
    pseudo = pseudo_rows[blank(pseudo_rows, "skipped")] if pseudo_rows is not None else None
    if pseudo is not None and not judged:
        analysed = geometry_excess(analysed, pseudo, min_null=min_null, match=match)
    metrics = {"geometry/n_pseudo": float(len(pseudo)) if pseudo is not None else 0.0}
    for c in GEOMETRY_COLUMNS:
        n_null = null_size(pseudo, c) if pseudo is not None and c in pseudo else 0
        p = column(analysed, f"{c}_p_geometry")
        loo = self_calibration(pseudo, c, match=match) if n_null >= min_null else np.empty(0)
        diff = finite(column(analysed, f"{c}_excess"))
        found, null_found = significant_fraction(p, alpha, bh=True), significant_fraction(loo, alpha, bh=True)
        metrics.update({
            f"geometry/{c}_n_null": float(n_null),
            f"geometry/{c}_excess_median": float(np.median(diff)) if diff.size else np.nan,
            f"geometry/{c}_sig_frac_bh": found,
            f"geometry/{c}_pi0": storey_pi0(p),
            f"geometry/{c}_pseudo_sig_frac_bh": null_found,
            f"geometry/{c}_pseudo_frac_p05": float(np.mean(loo < P_LEVEL)) if loo.size else np.nan,
            f"geometry/{c}_sig_frac_bh_excess": found - null_found,
        })  # fmt: skip
    metrics["bottomup/top_pi0_geometry"] = storey_pi0(column(analysed, "z_top_p_geometry"))

    real = finite(column(analysed, "p_top"))
    fake = finite(column(pseudo, "p_top")) if pseudo is not None else np.empty(0)
    metrics["bottomup/top_sig_frac_pseudo"] = float(np.mean(fake < alpha)) if fake.size else np.nan
    metrics["bottomup/top_sig_vs_pseudo_p"] = np.nan
    if real.size and fake.size:
        hits_real, hits_fake = int(np.sum(real < alpha)), int(np.sum(fake < alpha))
        table = [[hits_real, real.size - hits_real], [hits_fake, fake.size - hits_fake]]
        metrics["bottomup/top_sig_vs_pseudo_p"] = float(stats.fisher_exact(table, alternative="greater").pvalue)
    return metrics


def _selectivity(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' selectivity [n] (core tokens over the corpus mean, in SDs; NaN where
    core_tokens.min_selectivity 0 did not compute it: `upper_p` then matches nothing)."""
    return column(rows, "selectivity").to_numpy(dtype=np.float64)
