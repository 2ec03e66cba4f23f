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
directions through the same pipeline; `geometry_null`) the "geometry/..." metrics give each
statistic's excess over what the read-in geometry alone produces, and each metric of
NULL_COMPARED (the headline summaries) has the pseudo-neurons' value of it beside it
("<metric>_pseudo") and the excess ("<metric>_excess" = value - pseudo value); without
pseudo-neurons, or fewer than the minimum analysed, they are NaN. ARI and AMI are summarised
among neurons with categories (K >= 2): K = 1 imputes 0, and the K = 1 share is
neurons/topdown_skipped_frac.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from intraneuron.analyses.two_fold.geometry_null import (
    GEOMETRY_COLUMNS,
    MIN_NULL,
    SELECTIVITY_MATCH,
    geometry_excess,
    geometry_metrics,
)
from intraneuron.analyses.two_fold.rows import blank as _blank
from intraneuron.analyses.two_fold.rows import column as _column
from intraneuron.analyses.two_fold.rows import finite as _finite
from intraneuron.stats.multiple import storey_pi0
from intraneuron.stats.summary import distribution, significant_fraction

__all__ = ["DISTRIBUTIONS", "GEOMETRY_COLUMNS", "NULL_COMPARED", "aggregate_layer", "compare_layers",
           "compared_keys", "geometry_excess"]  # fmt: skip

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

# summarised over the neurons with categories (K >= 2) only
AMONG_CATEGORISED = ("homomorphism/ari", "homomorphism/ami")

# The headline summaries, each reported beside the pseudo-neurons' value of it and the excess.
NULL_COMPARED: tuple[str, ...] = (
    "topdown/kruskal_sig_frac_bh", "topdown/epsilon2/median", "topdown/interleaving_mean/median",
    "bottomup/top_sig_frac_bh", "bottomup/h_top_minus_rest/median", "homomorphism/ari/median",
    "homomorphism/mantel_sig_frac_bh", "neurons/topdown_skipped_frac",
)  # fmt: skip


def compared_keys() -> list[str]:
    """The metrics `aggregate_layer` adds for NULL_COMPARED: "<metric>_pseudo", "<metric>_excess"."""
    return [f"{key}{suffix}" for key in NULL_COMPARED for suffix in ("_pseudo", "_excess")]


def aggregate_layer(
    rows: pd.DataFrame, alpha: float = 0.05, pseudo_rows: pd.DataFrame | None = None, *,
    min_null: int = MIN_NULL, match: int = SELECTIVITY_MATCH, judged: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Layer metrics from the per-neuron rows (columns of `neuron.ROW_KEYS`) of one layer;
    pseudo_rows: the same analysis of the layer's pseudo-neurons (None: geometry metrics NaN);
    min_null, match: the geometry null's minimum size and selectivity matching (`geometry_null`);
    judged: rows already have `geometry_excess`'s columns, computed with these settings."""
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
        population = with_topdown if name in AMONG_CATEGORISED else analysed
        for stat, value in distribution(_column(population, column)).items():
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
    metrics.update(geometry_metrics(analysed, pseudo_rows, alpha, min_null=min_null, match=match, judged=judged))
    metrics.update(_against_pseudo(metrics, pseudo_rows, alpha, min_null))
    return metrics


def _against_pseudo(
    metrics: dict[str, float], pseudo_rows: pd.DataFrame | None, alpha: float, min_null: int
) -> dict[str, float]:
    """"<metric>_pseudo" (the same summary over the analysed pseudo-neurons) and "<metric>_excess"
    for each metric of NULL_COMPARED; NaN without min_null analysed pseudo-neurons."""
    pseudo = pseudo_rows[_blank(pseudo_rows, "skipped")] if pseudo_rows is not None else None
    null = aggregate_layer(pseudo, alpha) if pseudo is not None and len(pseudo) >= min_null else {}
    out = {}
    for key in NULL_COMPARED:
        out[f"{key}_pseudo"] = null.get(key, np.nan)
        out[f"{key}_excess"] = metrics[key] - out[f"{key}_pseudo"]
    return out


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
