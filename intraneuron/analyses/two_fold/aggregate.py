"""Step 10: layer-level summaries of the per-neuron rows, as flat MLflow-ready metrics.

Keys are stable ("<part>/<statistic>[/<summary>]") and present whatever the data; a statistic
with no usable neuron is NaN. BH over neurons, the Wilcoxon test of H_top - H_rest and the sign
test of "H_top above its null median" (paper_methods.md: "z_top > 0") are our proposals
(paper_methods.md 1.4 steps 8 and 10), not the paper's.

Calibration (tests/test_planted.py): top_sig_frac and the sign test hold their level on null
layers. The Wilcoxon test of H_top - H_rest does not: the top segment is smaller than the rest,
and with the "centroid" measure a smaller segment is more homogeneous by construction (100 null
neurons: p ~ 1e-17); with "pairwise" its null is skewed, not symmetric. Read it as descriptive.

Every BH fraction has Storey's pi0 beside it ("<...>_pi0"): BH at a layer's size can reject few
neurons while many p values are small, and pi0 < 1 says so. With pseudo-neurons (random read-in
directions through the same pipeline; `geometry_excess`) the "geometry/..." metrics give each
statistic's excess over what the read-in geometry alone produces; without them they are NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from intraneuron.stats.multiple import storey_pi0
from intraneuron.stats.permutation import TIE_TOLERANCE
from intraneuron.stats.summary import distribution, significant_fraction

# metric name -> row column; each gets mean, median, quantiles and the count of finite values.
DISTRIBUTIONS: dict[str, str] = {
    "topdown/n_categories": "n_categories",
    "topdown/epsilon2": "epsilon2",
    "topdown/diff_rate": "diff_rate",
    "topdown/level_rho": "level_rho",
    "topdown/overlap_mean": "overlap_mean",
    "topdown/overlap_frac_positive": "overlap_frac_positive",
    "topdown/interleaving_mean": "interleaving_mean",
    "topdown/interleaving_z": "interleaving_z",  # against its null: < 0 = less interleaved than chance
    "topdown/overlap_z": "overlap_z",
    "bottomup/h_all": "h_all",
    "bottomup/h_top_minus_rest": "h_top_minus_rest",
    "bottomup/z_top": "z_top",
    "bottomup/trend_rho": "trend_rho",
    "bottomup/successive_z": "successive_z",
    "homomorphism/ari": "ari",
    "homomorphism/ami": "ami",
    "homomorphism/mantel_rho": "mantel_rho",
}

# Statistics a neuron's read-in geometry alone can raise, calibrated against pseudo-neurons.
GEOMETRY_COLUMNS: tuple[str, ...] = (
    "z_top", "h_top_minus_rest", "trend_rho", "epsilon2", "ari", "mantel_rho", "silhouette", "successive_z",
)  # fmt: skip


def geometry_excess(
    rows: pd.DataFrame, pseudo_rows: pd.DataFrame, columns: tuple[str, ...] = GEOMETRY_COLUMNS
) -> pd.DataFrame:
    """rows with, per column c present in both tables, c_excess (value - pseudo median),
    c_z_geometry, c_p_geometry and c_p_geometry_empirical, against the pseudo-neurons' values.

    c_p_geometry is one-sided (value above the pseudo-neurons) from a normal fitted to the pseudo
    values: the empirical (1 + #{pseudo >= value}) / (1 + R), also given, floors at 1/257 with 256
    pseudo-neurons, which BH over a layer of 1,536 neurons cannot reject. The normal is a model:
    trust c_p_geometry where the pseudo values look normal, compare with the empirical p.
    Skipped rows (row["skipped"] != "") get NaN and pseudo rows that were skipped are left out;
    NaN pseudo values are dropped per column.
    Idempotent: columns it added before (rows read back from a run, e.g. to merge the shards of a
    layer) are dropped first and recomputed, so they come out the same and in the same order.
    """
    rows = rows.drop(columns=geometry_columns_added(columns), errors="ignore")
    out = rows.copy()
    analysed = _blank(rows, "skipped")
    pseudo = pseudo_rows[_blank(pseudo_rows, "skipped")]
    for c in columns:
        if c not in rows or c not in pseudo_rows:
            continue
        null = np.sort(_finite(_column(pseudo, c)))  # [R]
        value = _column(rows, c).where(analysed).to_numpy(dtype=np.float64)  # [n]
        n_null = null.size
        median = np.median(null) if n_null else np.nan
        mean = null.mean() if n_null else np.nan
        sd = null.std(ddof=1) if n_null > 1 else np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (value - mean) / sd if sd > 0 else np.full_like(value, np.nan)
        # pseudo values at or above the value, ties counted as in the permutation tests
        tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(np.nan_to_num(value)))
        at_or_above = n_null - np.searchsorted(null, value - tol, side="left")
        empirical = (1.0 + at_or_above) / (1.0 + n_null) if n_null else np.full_like(value, np.nan)
        out[f"{c}_excess"] = value - median
        out[f"{c}_z_geometry"] = z
        # a degenerate null (every pseudo-neuron at one value, e.g. ARI 0 where none has categories)
        # has no normal fit: the empirical p is the answer there
        empirical = np.where(np.isnan(value), np.nan, empirical)
        out[f"{c}_p_geometry"] = np.where(np.isfinite(z), stats.norm.sf(z), empirical)
        out[f"{c}_p_geometry_empirical"] = empirical
    return out


def geometry_columns_added(columns: tuple[str, ...] = GEOMETRY_COLUMNS) -> list[str]:
    """The columns `geometry_excess` adds to the rows, in the order it adds them."""
    suffixes = ("_excess", "_z_geometry", "_p_geometry", "_p_geometry_empirical")
    return [f"{c}{suffix}" for c in columns for suffix in suffixes]


def aggregate_layer(
    rows: pd.DataFrame, alpha: float = 0.05, pseudo_rows: pd.DataFrame | None = None
) -> dict[str, float]:
    """Layer metrics from the per-neuron rows (columns of `neuron.ROW_KEYS`) of one layer;
    pseudo_rows: the same analysis of the layer's pseudo-neurons (None: geometry metrics NaN)."""
    n = len(rows)
    analysed = rows[_blank(rows, "skipped")]
    with_topdown = analysed[_blank(analysed, "topdown_skipped")]
    metrics: dict[str, float] = {
        "neurons/n": float(n),
        "neurons/analysed": float(len(analysed)),
        "neurons/skipped_frac": float((n - len(analysed)) / n) if n else np.nan,
        "neurons/topdown_skipped_frac": (
            float((len(analysed) - len(with_topdown)) / len(analysed)) if len(analysed) else np.nan
        ),
    }
    for name, column in DISTRIBUTIONS.items():
        for stat, value in distribution(_column(analysed, column)).items():
            metrics[f"{name}/{stat}"] = value

    metrics["topdown/kruskal_sig_frac"] = significant_fraction(
        _column(with_topdown, "kruskal_p"), alpha, bh=False
    )
    metrics["topdown/kruskal_sig_frac_bh"] = significant_fraction(
        _column(with_topdown, "kruskal_p"), alpha, bh=True
    )
    metrics["topdown/kruskal_pi0"] = storey_pi0(_column(with_topdown, "kruskal_p"))
    metrics["topdown/anova_sig_frac"] = significant_fraction(
        _column(with_topdown, "anova_p"), alpha, bh=False
    )
    level = _finite(_column(with_topdown, "level_rho"))
    # The paper's "differentiation particularly for clusters with lower mean activation".
    metrics["topdown/low_mean_differ_more_frac"] = float(np.mean(level < 0)) if level.size else np.nan

    metrics["bottomup/top_sig_frac"] = significant_fraction(_column(analysed, "p_top"), alpha, bh=False)
    metrics["bottomup/top_sig_frac_bh"] = significant_fraction(_column(analysed, "p_top"), alpha, bh=True)
    metrics["bottomup/top_pi0"] = storey_pi0(_column(analysed, "p_top"))
    metrics.update(_paired_top_rest(analysed))
    metrics.update(_sign_test(_column(analysed, "p_top"), _column(analysed, "z_top")))
    metrics["bottomup/successive_less_sig_frac_bh"] = significant_fraction(
        _column(analysed, "successive_p_less"), alpha, bh=True
    )
    metrics["bottomup/successive_less_pi0"] = storey_pi0(_column(analysed, "successive_p_less"))
    metrics["homomorphism/mantel_sig_frac_bh"] = significant_fraction(
        _column(analysed, "mantel_p"), alpha, bh=True
    )
    metrics["homomorphism/mantel_pi0"] = storey_pi0(_column(analysed, "mantel_p"))
    metrics.update(_geometry(analysed, pseudo_rows, alpha))
    return metrics


def _geometry(analysed: pd.DataFrame, pseudo_rows: pd.DataFrame | None, alpha: float) -> dict[str, float]:
    """Excess over the pseudo-neurons per GEOMETRY_COLUMNS, and the top segment's layer test
    calibrated by them: real neurons with p_top < alpha against pseudo-neurons with p_top < alpha
    (one-sided Fisher exact test: more among the real ones)."""
    pseudo = pseudo_rows[_blank(pseudo_rows, "skipped")] if pseudo_rows is not None else None
    excess = geometry_excess(analysed, pseudo) if pseudo is not None else analysed
    metrics = {"geometry/n_pseudo": float(len(pseudo)) if pseudo is not None else 0.0}
    for c in GEOMETRY_COLUMNS:
        diff = _finite(_column(excess, f"{c}_excess"))
        p = _column(excess, f"{c}_p_geometry")
        metrics[f"geometry/{c}_excess_median"] = float(np.median(diff)) if diff.size else np.nan
        metrics[f"geometry/{c}_sig_frac_bh"] = significant_fraction(p, alpha, bh=True)
        metrics[f"geometry/{c}_pi0"] = storey_pi0(p)
    metrics["bottomup/top_pi0_geometry"] = storey_pi0(_column(excess, "z_top_p_geometry"))

    real = _finite(_column(analysed, "p_top"))
    fake = _finite(_column(pseudo, "p_top")) if pseudo is not None else np.empty(0)
    metrics["bottomup/top_sig_frac_pseudo"] = float(np.mean(fake < alpha)) if fake.size else np.nan
    metrics["bottomup/top_sig_vs_pseudo_p"] = np.nan
    if real.size and fake.size:
        hits_real, hits_fake = int(np.sum(real < alpha)), int(np.sum(fake < alpha))
        table = [[hits_real, real.size - hits_real], [hits_fake, fake.size - hits_fake]]
        metrics["bottomup/top_sig_vs_pseudo_p"] = float(stats.fisher_exact(table, alternative="greater").pvalue)
    return metrics


def compare_layers(rows_a: pd.DataFrame, rows_b: pd.DataFrame) -> dict[str, float]:
    """Per distribution metric: median(b) - median(a) and a two-sided Mann-Whitney p between the
    neurons of two layers (e.g. layer 0 against layer 1)."""
    result: dict[str, float] = {}
    for name, column in DISTRIBUTIONS.items():
        a = _finite(_column(rows_a[_blank(rows_a, "skipped")], column))
        b = _finite(_column(rows_b[_blank(rows_b, "skipped")], column))
        ok = a.size > 0 and b.size > 0
        result[f"compare/{name}/median_diff"] = float(np.median(b) - np.median(a)) if ok else np.nan
        result[f"compare/{name}/mwu_p"] = (
            float(stats.mannwhitneyu(a, b).pvalue) if ok and np.ptp(np.r_[a, b]) > 0 else np.nan
        )
    return result


def _paired_top_rest(rows: pd.DataFrame) -> dict[str, float]:
    """Wilcoxon signed-rank of H_top - H_rest across neurons (two-sided)."""
    diff = _finite(_column(rows, "h_top") - _column(rows, "h_rest"))
    result = {
        "bottomup/wilcoxon_top_rest_n": float(diff.size),
        "bottomup/wilcoxon_top_rest_stat": np.nan,
        "bottomup/wilcoxon_top_rest_p": np.nan,
    }
    if diff.size and np.any(diff != 0):
        test = stats.wilcoxon(diff)
        result["bottomup/wilcoxon_top_rest_stat"] = float(test.statistic)
        result["bottomup/wilcoxon_top_rest_p"] = float(test.pvalue)
    return result


def _sign_test(p_top: pd.Series, z_top: pd.Series) -> dict[str, float]:
    """Two-sided sign test across neurons: is H_top above the median of its own permutation null?

    A neuron counts as positive when p_top <= 1/2, i.e. at most half of the P + 1 values (the
    observed H_top and its P draws) are at or above H_top. Under the null the observed value is
    one more exchangeable draw, so this has probability 1/2 whatever the shape of the null
    (exactly for odd P; 1/2 - 1/(2(P + 1)) for even P).
    Not the sign of z_top, which compares H_top with the null *mean*: the null of a
    small segment's homogeneity is right-skewed when the vectors form clusters, so its median is
    below its mean and most null neurons have z_top < 0 (about 59% in tests/test_planted.py),
    which would make the test significant (p ~ 0.001-0.01 over 200-300 neurons) on layers with no
    effect at all. Neurons with a degenerate (constant) null, z_top NaN, are dropped.
    """
    p = np.asarray(p_top, dtype=np.float64)
    p = p[np.isfinite(p) & np.isfinite(np.asarray(z_top, dtype=np.float64))]
    positive = int(np.sum(p <= 0.5))
    return {
        "bottomup/sign_test_pos_frac": float(positive / p.size) if p.size else np.nan,
        "bottomup/sign_test_p": float(stats.binomtest(positive, p.size).pvalue) if p.size else np.nan,
    }


def _column(rows: pd.DataFrame, column: str) -> pd.Series:
    if column in rows:
        return pd.to_numeric(rows[column], errors="coerce")
    return pd.Series(np.nan, index=rows.index, dtype=np.float64)


def _blank(rows: pd.DataFrame, column: str) -> pd.Series:
    """True where the reason column is empty or missing (the neuron was not skipped)."""
    if column not in rows:
        return pd.Series(True, index=rows.index)
    return rows[column].fillna("").astype(str) == ""


def _finite(values: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]
