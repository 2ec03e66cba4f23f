"""Step 10: layer-level summaries of the per-neuron rows, as flat MLflow-ready metrics.

Keys are stable ("<part>/<statistic>[/<summary>]") and present whatever the data; a statistic
with no usable neuron is NaN. BH over neurons, the Wilcoxon test of H_top - H_rest and the sign
test of "H_top above its null median" (paper_methods.md: "z_top > 0") are our proposals
(paper_methods.md 1.4 steps 8 and 10), not the paper's.

Calibration (tests/test_planted.py): top_sig_frac and the sign test hold their level on null
layers. The Wilcoxon test of H_top - H_rest does not: the top segment is smaller than the rest,
and with the "centroid" measure a smaller segment is more homogeneous by construction (100 null
neurons: p ~ 1e-17); with "pairwise" its null is skewed, not symmetric. Read it as descriptive.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

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
    "bottomup/h_all": "h_all",
    "bottomup/h_top_minus_rest": "h_top_minus_rest",
    "bottomup/z_top": "z_top",
    "bottomup/trend_rho": "trend_rho",
    "bottomup/successive_z": "successive_z",
    "homomorphism/ari": "ari",
    "homomorphism/nmi": "nmi",
    "homomorphism/mantel_rho": "mantel_rho",
}
def aggregate_layer(rows: pd.DataFrame, alpha: float = 0.05) -> dict[str, float]:
    """Layer metrics from the per-neuron rows (columns of `neuron.ROW_KEYS`) of one layer."""
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
    metrics["topdown/anova_sig_frac"] = significant_fraction(
        _column(with_topdown, "anova_p"), alpha, bh=False
    )
    level = _finite(_column(with_topdown, "level_rho"))
    # The paper's "differentiation particularly for clusters with lower mean activation".
    metrics["topdown/low_mean_differ_more_frac"] = float(np.mean(level < 0)) if level.size else np.nan

    metrics["bottomup/top_sig_frac"] = significant_fraction(_column(analysed, "p_top"), alpha, bh=False)
    metrics["bottomup/top_sig_frac_bh"] = significant_fraction(_column(analysed, "p_top"), alpha, bh=True)
    metrics.update(_paired_top_rest(analysed))
    metrics.update(_sign_test(_column(analysed, "p_top"), _column(analysed, "z_top")))
    metrics["bottomup/successive_less_sig_frac_bh"] = significant_fraction(
        _column(analysed, "successive_p_less"), alpha, bh=True
    )
    metrics["homomorphism/mantel_sig_frac_bh"] = significant_fraction(
        _column(analysed, "mantel_p"), alpha, bh=True
    )
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
