"""Per-layer figures of the two-fold analysis, one PNG each, meant to be read side by side across
the runs of a sweep.

Every figure carries the numbers it plots as `fig.intraneuron_data` ({series name: array}), so
that tests and reports check the data rather than the pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# column -> (axis label, reference level, what the reference means)
DISTRIBUTIONS: dict[str, tuple[str, float, str]] = {
    "epsilon2": ("Kruskal-Wallis ε² across categories\n(differentiation effect size)", 0.0, "no effect"),
    "interleaving_mean": ("rank interleaving of category pairs, mean\n(0 = separated, 0.5 = mixed)",
                          0.5, "fully mixed"),
    "h_top_minus_rest": ("homogeneity: top segment − rest", 0.0, "equal"),
    "z_top": ("top-segment homogeneity, z vs\nits permutation null", 0.0, "null mean"),
    "ari": ("ARI between categories\nand activation segments", 0.0, "chance"),
    "mantel_rho": ("Mantel ρ: activation distance\nvs cosine distance", 0.0, "none"),
}  # fmt: skip
# column -> axis label; uniform under the null, so any excess of small p shows as a left peak.
P_VALUES: dict[str, str] = {
    "p_top": "p, top-segment homogeneity\n(permutation test)",
    "kruskal_p": "p, Kruskal-Wallis across categories\n(differentiation)",
}
P_BINS = 20
# column -> axis label: the statistics whose layer null the pseudo-neurons give
GEOMETRY_NULL: dict[str, str] = {
    "z_top": "top-segment homogeneity z",
    "h_top_minus_rest": "homogeneity: top segment − rest",
    "trend_rho": "homogeneity trend over segments (ρ)",
    "epsilon2": "differentiation ε²",
    "ari": "ARI categories vs segments",
    "silhouette": "silhouette of the chosen K",
}


def layer_figures(tables: dict[str, pd.DataFrame], layer: int, alpha: float) -> dict[str, Figure]:
    """Figures of one layer from the tables of `two_fold.layer.analyse_layer`, by name:
    homogeneity_by_segment, neuron_distributions, top_segment_p_values, k_curve, and with
    pseudo-neurons geometry_null. A figure whose data is empty is left out."""
    import matplotlib

    matplotlib.use("Agg")
    empty = pd.DataFrame()
    neurons = tables.get("neurons", empty)
    analysed = neurons[_blank(neurons, "skipped")]
    makers = {
        "homogeneity_by_segment": lambda: homogeneity_by_segment(tables.get("segments", empty), layer, alpha),
        "neuron_distributions": lambda: neuron_distributions(analysed, layer, len(neurons)),
        "top_segment_p_values": lambda: top_segment_p_values(analysed, layer, alpha),
        "k_curve": lambda: k_curve(tables.get("k_curve", empty), analysed, layer),
        "geometry_null": lambda: geometry_null(analysed, tables.get("pseudo_neurons", empty), layer),
    }  # fmt: skip
    figures = {}
    for name, make in makers.items():
        fig = make()
        if fig is not None:
            figures[name] = fig
    return figures


def homogeneity_by_segment(segments: pd.DataFrame, layer: int, alpha: float) -> Figure | None:
    """Observed segment homogeneity averaged over neurons against the permutation null (the mean of
    the null means, band = that ± 1 and 2 mean null SDs, i.e. the spread of a typical neuron's
    null), and the fraction of neurons whose segment has p < alpha."""
    from matplotlib import pyplot as plt

    h = _column(segments, "homogeneity").to_numpy()
    if not np.isfinite(h).any():
        return None
    rank = _column(segments, "segment").to_numpy()
    null_mean = _column(segments, "null_mean").to_numpy()
    null_sd = _column(segments, "null_sd").to_numpy()
    p = _column(segments, "p").to_numpy()
    ranks = np.unique(rank[np.isfinite(rank)]).astype(np.int64)
    # Observed and null are averaged over the same neurons, so their gap is not a selection effect.
    scored = np.isfinite(h) & np.isfinite(null_mean)
    by_rank = [rank == r for r in ranks]
    data = {
        "segment": ranks,
        "n_neurons": np.array([np.sum(scored & at) for at in by_rank], dtype=np.int64),
        "homogeneity": np.array([_mean(h[scored & at]) for at in by_rank]),
        "null_mean": np.array([_mean(null_mean[scored & at]) for at in by_rank]),
        "null_sd": np.array([_mean(null_sd[scored & at]) for at in by_rank]),
        "n_tested": np.array([np.sum(np.isfinite(p) & at) for at in by_rank], dtype=np.int64),
        "significant_fraction": np.array([_mean(p[np.isfinite(p) & at] < alpha) for at in by_rank]),
        "alpha": np.array([alpha]),
    }
    for k in (2, 1):
        data[f"null_minus_{k}sd"] = data["null_mean"] - k * data["null_sd"]
        data[f"null_plus_{k}sd"] = data["null_mean"] + k * data["null_sd"]

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6.5, 6), sharex=True, height_ratios=(2, 1), layout="constrained"
    )
    for k, shade in ((2, 0.15), (1, 0.3)):
        top.fill_between(ranks, data[f"null_minus_{k}sd"], data[f"null_plus_{k}sd"], color="tab:gray",
                         alpha=shade, linewidth=0, label=f"null ± {k} SD (typical neuron)")  # fmt: skip
    top.plot(
        ranks, data["null_mean"], color="tab:gray", linestyle="--", label="permutation null, mean"
    )
    top.plot(
        ranks,
        data["homogeneity"],
        color="tab:blue",
        marker="o",
        label="observed, mean over neurons",
    )
    top.set(ylabel="within-segment homogeneity\n(cosine, mean over neurons)")
    top.legend(fontsize="small")
    bottom.bar(ranks, data["significant_fraction"], color="tab:blue", alpha=0.7)
    bottom.axhline(
        alpha, color="tab:red", linestyle=":", label=f"expected under the null (α = {alpha:g})"
    )
    bottom.set(
        xlabel="activation segment (0 = highest activations)",
        ylabel=f"neurons with\nsegment p < {alpha:g}",
        ylim=(0, max(1.05 * _max(data["significant_fraction"]), 2 * alpha)),
    )
    bottom.set_xticks(ranks)
    bottom.legend(fontsize="small")
    fig.suptitle(
        f"layer {layer}: {_n_neurons(segments)} neurons, segment homogeneity vs permutation null"
    )
    return _finish(fig, data)


def neuron_distributions(analysed: pd.DataFrame, layer: int, n_rows: int) -> Figure | None:
    """Histograms over analysed neurons of the main per-neuron statistics, with their no-effect
    level marked; one panel per entry of DISTRIBUTIONS."""
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    values = {column: _finite(_column(analysed, column)) for column in DISTRIBUTIONS}
    if not any(v.size for v in values.values()):
        return None
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5), layout="constrained")
    data: dict[str, np.ndarray] = {}
    for ax, (column, (label, reference, meaning)) in zip(
        axes.flat, DISTRIBUTIONS.items(), strict=True
    ):
        v = values[column]
        data[column] = v
        data[f"{column}.reference"] = np.array([reference])
        ax.set(xlabel=label, ylabel="neurons")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if not v.size:
            ax.set_title("n = 0", fontsize="medium")
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(v, bins=_n_bins(v.size), color="tab:blue", alpha=0.75)
        ax.axvline(reference, color="tab:red", linestyle=":", label=meaning)
        ax.legend(fontsize="small")
        ax.set_title(f"n = {v.size}, median {np.median(v):.3g}", fontsize="medium")
    skipped = n_rows - len(analysed)
    note = f" ({skipped} skipped)" if skipped else ""
    fig.suptitle(f"layer {layer}: {len(analysed)} analysed neurons{note}, per-neuron statistics")
    return _finish(fig, data)


def top_segment_p_values(analysed: pd.DataFrame, layer: int, alpha: float) -> Figure | None:
    """Histograms of p_top and kruskal_p over neurons, with the count a uniform (null) layer would
    put in each bin."""
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    values = {column: _finite(_column(analysed, column)) for column in P_VALUES}
    if not any(v.size for v in values.values()):
        return None
    edges = np.linspace(0.0, 1.0, P_BINS + 1)
    data: dict[str, np.ndarray] = {"bin_edges": edges, "alpha": np.array([alpha])}
    fig, axes = plt.subplots(1, len(P_VALUES), figsize=(10, 4), layout="constrained")
    for ax, (column, label) in zip(axes, P_VALUES.items(), strict=True):
        v = values[column]
        counts, _ = np.histogram(v, bins=edges)
        uniform = v.size / P_BINS
        data.update(
            {column: v, f"{column}.counts": counts, f"{column}.uniform": np.array([uniform])}
        )
        ax.set(xlabel=label, ylabel="neurons", xlim=(0, 1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if not v.size:
            ax.set_title("n = 0", fontsize="medium")
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.75)
        ax.axhline(uniform, color="tab:gray", linestyle="--", label="uniform (no effect)")
        ax.axvline(alpha, color="tab:red", linestyle=":", label=f"α = {alpha:g}")
        ax.legend(fontsize="small")
        ax.set_title(f"n = {v.size}, p < {alpha:g}: {np.mean(v < alpha):.1%} (null: {alpha:.1%})",
                     fontsize="medium")  # fmt: skip
    fig.suptitle(
        f"layer {layer}: {len(analysed)} analysed neurons, p-values (uniform if no effect)"
    )
    return _finish(fig, data)


def k_curve(curves: pd.DataFrame, analysed: pd.DataFrame, layer: int) -> Figure | None:
    """The gap statistic of each K over the neurons (median and interquartile band; the criterion
    that chose K, K = 1 included) with the silhouette beside it, and how often each K was chosen:
    a flat curve means the categories are weak whatever K, a peak that K is real."""
    from matplotlib import pyplot as plt

    s = _column(curves, "silhouette")
    if not np.isfinite(s.to_numpy()).any():
        return None
    by_k = pd.DataFrame({"k": curves["k"], "silhouette": s}).dropna().groupby("k")["silhouette"]
    ks = by_k.median().index.to_numpy()
    chosen = _finite(_column(analysed, "n_categories"))
    chosen = chosen[chosen >= 1]  # K = 1: no categorical structure
    data = {
        "k": ks,
        "median": by_k.median().to_numpy(),
        "q25": by_k.quantile(0.25).to_numpy(),
        "q75": by_k.quantile(0.75).to_numpy(),
        "n_neurons": by_k.size().to_numpy(),
        "chosen_k": np.array(sorted(set(chosen.astype(int)))),
        "chosen_count": np.array([int(np.sum(chosen == k)) for k in sorted(set(chosen.astype(int)))]),
    }
    gap = _column(curves, "gap")
    fig, (curve_ax, count_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    silhouette_ax = curve_ax
    if np.isfinite(gap.to_numpy()).any():
        by_gap = pd.DataFrame({"k": curves["k"], "gap": gap}).dropna().groupby("k")["gap"]
        data.update(gap_k=by_gap.median().index.to_numpy(), gap_median=by_gap.median().to_numpy(),
                    gap_q25=by_gap.quantile(0.25).to_numpy(), gap_q75=by_gap.quantile(0.75).to_numpy())  # fmt: skip
        curve_ax.fill_between(data["gap_k"], data["gap_q25"], data["gap_q75"], color="tab:green", alpha=0.2)
        curve_ax.plot(data["gap_k"], data["gap_median"], marker="o", color="tab:green", label="gap, median")
        curve_ax.set(xlabel="number of categories K", ylabel="gap statistic (green)", xticks=data["gap_k"])
        silhouette_ax = curve_ax.twinx()
    silhouette_ax.fill_between(ks, data["q25"], data["q75"], color="tab:blue", alpha=0.2)
    silhouette_ax.plot(ks, data["median"], marker="s", color="tab:blue", label="silhouette, median")
    silhouette_ax.set(ylabel="silhouette in the clusterer's distance (blue)")
    curve_ax.set(xlabel="number of categories K")
    if silhouette_ax is curve_ax:
        curve_ax.set(xticks=ks)
    handles = [h for ax in {curve_ax, silhouette_ax} for h in ax.get_legend_handles_labels()[0]]
    curve_ax.legend(handles=handles, loc="lower right", fontsize="small")
    count_ax.bar(data["chosen_k"], data["chosen_count"], color="tab:gray")
    count_ax.set(xlabel="K chosen (1 = no categorical structure)", ylabel="neurons", xticks=data["chosen_k"])
    fig.suptitle(f"layer {layer}: K-curve over {int(data['n_neurons'].max())} neurons (median, interquartile band)")
    return _finish(fig, data)


def geometry_null(analysed: pd.DataFrame, pseudo: pd.DataFrame, layer: int) -> Figure | None:
    """Each statistic over the real neurons against its distribution over the pseudo-neurons (random
    read-in directions through the same pipeline): what geometry alone produces in this layer. A
    real effect is the part of the blue histogram beyond the grey one."""
    from matplotlib import pyplot as plt

    if pseudo.empty:
        return None
    pseudo = pseudo[_blank(pseudo, "skipped")]
    columns = [c for c in GEOMETRY_NULL if _finite(_column(analysed, c)).size and _finite(_column(pseudo, c)).size]
    if not columns:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5), layout="constrained")
    data: dict[str, np.ndarray] = {}
    for ax, column in zip(axes.flat, GEOMETRY_NULL, strict=True):
        ax.set(xlabel=GEOMETRY_NULL[column], ylabel="share of neurons")
        if column not in columns:
            ax.set_axis_off()
            continue
        real, null = _finite(_column(analysed, column)), _finite(_column(pseudo, column))
        data[column], data[f"{column}.pseudo"] = real, null
        edges = np.histogram_bin_edges(np.concatenate([real, null]), bins=_n_bins(real.size))
        ax.hist(null, bins=edges, density=True, color="tab:gray", alpha=0.6, label=f"pseudo-neurons ({null.size})")
        ax.hist(real, bins=edges, density=True, color="tab:blue", alpha=0.6, label=f"neurons ({real.size})")
        ax.axvline(np.median(null), color="black", linestyle=":", linewidth=1)
        ax.set_title(f"median {np.median(real):.3g} vs null {np.median(null):.3g}", fontsize="medium")
        ax.legend(fontsize="small")
    fig.suptitle(f"layer {layer}: neurons against the pseudo-neuron (geometry) null")
    return _finish(fig, data)


def _finish(fig: Figure, data: dict[str, np.ndarray]) -> Figure:
    from matplotlib import pyplot as plt

    fig.intraneuron_data = data
    plt.close(fig)  # the caller saves it; an open pyplot figure per layer would accumulate
    return fig


def _column(rows: pd.DataFrame, column: str) -> pd.Series:
    if column in rows:
        return pd.to_numeric(rows[column], errors="coerce").astype(np.float64)
    return pd.Series(np.nan, index=rows.index, dtype=np.float64)


def _blank(rows: pd.DataFrame, column: str) -> pd.Series:
    """True where the reason column is empty or missing (the neuron was not skipped)."""
    if column not in rows:
        return pd.Series(True, index=rows.index)
    return rows[column].fillna("").astype(str) == ""


def _finite(values: pd.Series) -> np.ndarray:
    values = values.to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else np.nan


def _max(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else 0.0


def _n_bins(n: int) -> int:
    return int(np.clip(2 * np.sqrt(n), 5, 40))


def _n_neurons(rows: pd.DataFrame) -> int:
    return int(rows["neuron"].nunique()) if "neuron" in rows else len(rows)
