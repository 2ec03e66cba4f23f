"""Per-layer figures of the universal analysis; each carries its numbers as `fig.intraneuron_data`."""

from __future__ import annotations

import numpy as np
import pandas as pd


def layer_figures(table: pd.DataFrame, ranks: pd.DataFrame, compared: list[str], layer: int,
                  threshold: float, relative_threshold: float = 0.5) -> dict:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    return {
        "correlation_vs_baseline": correlation_vs_baseline(table, layer, threshold, relative_threshold),
        "universal_percentiles": universal_percentiles(ranks, compared, layer),
    }


def correlation_vs_baseline(table: pd.DataFrame, layer: int, threshold: float, relative_threshold: float = 0.5):
    """Each neuron's mean max-correlation against its rotation-baseline level; above the line
    y = x + threshold the excess correlation makes it universal, above y = x + t (1 - x) the
    baseline-relative score does (t = relative_threshold)."""
    from matplotlib import pyplot as plt

    universal = table["universal"].to_numpy(bool)
    x, y = table["mean_baseline"].to_numpy(float), table["mean_corr"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(5, 4.2), layout="constrained")
    ax.scatter(x[~universal], y[~universal], s=5, color="0.6", label=f"other ({(~universal).sum()})")
    ax.scatter(x[universal], y[universal], s=8, color="tab:red", label=f"universal ({universal.sum()})")
    finite = np.isfinite(x)
    lo = float(np.nanmin(x)) if finite.any() else 0.0
    hi = float(np.nanmax(x)) if finite.any() else 1.0
    ax.plot([lo, hi], [lo + threshold, hi + threshold], "k--", lw=1, label=f"excess = {threshold:g}")
    t = relative_threshold
    ax.plot([lo, hi], [lo + t * (1 - lo), hi + t * (1 - hi)], ":", color="tab:blue", lw=1.2,
            label=f"relative = {t:g} ({int(table['universal_relative'].sum())} neurons)")  # fmt: skip
    ax.set(xlabel="rotation baseline: mean over models of the max correlation",
           ylabel="mean over models of the max correlation", ylim=(min(0.0, np.nanmin(y, initial=0.0)), 1.02))  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"layer {layer}: {universal.mean():.1%} of {len(table)} neurons universal")
    fig.intraneuron_data = {"mean_baseline": x, "mean_corr": y, "universal": universal, "threshold": threshold,
                            "universal_relative": table["universal_relative"].to_numpy(bool),
                            "relative_threshold": relative_threshold}  # fmt: skip
    plt.close(fig)
    return fig


def universal_percentiles(ranks: pd.DataFrame, compared: list[str], layer: int):
    """Where universal neurons sit within their layer on each statistic (50 = like the rest)."""
    from matplotlib import pyplot as plt

    universal = ranks["universal"].to_numpy(bool)
    data = {c: ranks.loc[universal, c].dropna().to_numpy(float) for c in compared}
    fig, ax = plt.subplots(figsize=(1 + 0.8 * max(len(compared), 1), 4), layout="constrained")
    shown = [c for c in compared if data[c].size]
    if shown:
        ax.boxplot([data[c] for c in shown], tick_labels=shown, showfliers=False)
    ax.axhline(50, color="k", ls="--", lw=1)
    ax.set(ylim=(0, 100), ylabel="within-layer percentile of universal neurons")
    ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"layer {layer}: {int(universal.sum())} universal neurons against all")
    fig.intraneuron_data = data
    plt.close(fig)
    return fig


def share_by_layer(metrics: dict[int, dict[str, float]]):
    """The share of universal neurons per layer (the paper's U shape over depth), with the median
    max correlation and its rotation baseline."""
    from matplotlib import pyplot as plt

    layers = sorted(metrics)
    share = np.array([metrics[l]["universal/frac"] for l in layers])
    relative = np.array([metrics[l].get("universal_relative/frac", np.nan) for l in layers])
    corr = np.array([metrics[l]["mean_corr/median"] for l in layers])
    base = np.array([metrics[l]["mean_baseline/median"] for l in layers])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    x = np.asarray(layers, dtype=float)
    left.bar(x - 0.2, 100 * share, width=0.4, color="tab:red", label="excess > threshold")
    left.bar(x + 0.2, 100 * relative, width=0.4, color="tab:blue", label="relative > relative_threshold")
    left.set(xlabel="layer", ylabel="universal neurons (%)", xticks=layers)
    left.legend(fontsize=8)
    right.plot(layers, corr, "o-", label="mean max correlation (median)")
    right.plot(layers, base, "s--", color="0.5", label="rotation baseline (median)")
    right.set(xlabel="layer", ylabel="correlation", xticks=layers, ylim=(0, 1.02))
    right.legend(fontsize=8)
    fig.suptitle(f"universal neurons by layer: {len(layers)} layers")
    fig.intraneuron_data = {"layer": np.array(layers), "share": share, "share_relative": relative, "mean_corr_median": corr,
                            "baseline_median": base}  # fmt: skip
    plt.close(fig)
    return fig
