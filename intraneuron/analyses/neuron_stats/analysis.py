"""Per-neuron activation statistics of a layer, straight from the extraction's streaming reducers.

The statistics of Gurnee et al. (2024) "Universal neurons": moments (mean, variance, skew,
kurtosis), sparsity (how often the neuron is positive, how often near zero), the activation
histogram and the top-k activating contexts. Everything is read from the cached profile: no
per-token activations are ever held, so a whole layer of a large model costs one streaming pass.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd

from intraneuron.analyses.base import Analysis, Job, LayerResult, Requirements
from intraneuron.analyses.neurons import NeuronsConfig
from intraneuron.errors import ConfigError
from intraneuron.stats.summary import distribution

# per-neuron column -> profile tensor ([D] each)
MOMENTS = {
    "mean": "act_mean",
    "var": "act_var",
    "skew": "act_skew",
    "kurtosis": "act_kurt",  # raw (Pearson): a Gaussian has 3
    "min": "act_min",
    "max": "act_max",
    "frac_positive": "act_frac_positive",  # activation frequency
}
# per-neuron columns summarised over the layer as metrics "<column>/<mean|median|q..|n>"
SUMMARISED = ("mean", "std", "skew", "kurtosis", "frac_positive", "frac_near_zero")
NEAR_ZERO_UNDEFINED = ("0 is no bin edge of the activation histogram "
                       "(extraction.hist_min, extraction.hist_max, extraction.hist_bins)")  # fmt: skip


class NeuronStatsAnalysis(Analysis):
    """Per-neuron moments, skew, kurtosis, sparsity, histogram and top-k contexts (Gurnee et al. 2024).

    `analysis=neuron_stats`: how many top contexts to keep per neuron and how much text around them.
    """

    name = "neuron_stats"
    groups: ClassVar = {"neurons": NeuronsConfig}
    headline = {
        "neurons": "neurons/n",
        "skew_median": "skew/median",
        "kurtosis_median": "kurtosis/median",
        "activation_frequency_median": "frac_positive/median",
        "near_zero_frac_median": "frac_near_zero/median",
        "std_median": "std/median",
    }

    main_headline = "kurtosis_median"  # heavy tails: the neurons that fire rarely and strongly
    rank_by = ("kurtosis", "skew", "max", "std", "frac_positive")  # report.top_by; the first is the default

    def __init__(self, n_contexts: int = 10, context_tokens: int = 12):
        self.n_contexts = n_contexts
        self.context_tokens = context_tokens
        if n_contexts < 0:
            raise ConfigError("analysis.n_contexts", n_contexts, "an integer >= 0")
        if context_tokens < 0:
            raise ConfigError("analysis.context_tokens", context_tokens, "an integer >= 0")

    def requirements(self, run) -> Requirements:
        return Requirements(stats=frozenset({"moments", "histogram", "topk"}))

    def check(self, run) -> None:
        if self.n_contexts > run.extraction.top_k:
            raise ConfigError(
                "analysis.n_contexts", self.n_contexts,
                f"<= extraction.top_k={run.extraction.top_k} (occurrences kept per neuron)",
            )  # fmt: skip

    def analyse_layer(self, job: Job, layer: int, profile) -> LayerResult:
        neurons = job.run.groups["neurons"].indices(profile.d_mlp)  # [m]
        table = neuron_table(profile, neurons)
        tables = {
            "neurons": table,
            "histogram": histogram_table(profile, neurons),
            "contexts": contexts_table(
                profile, neurons, job.windows.ids, job.token_texts, self.n_contexts, self.context_tokens
            ),
        }
        return layer_result(tables, layer)

    def merge_layer(self, run, layer: int, shards: list[dict[str, pd.DataFrame]]) -> LayerResult:
        """Every table is per neuron and every metric a summary over the neurons table, so the
        layer is the shards' tables concatenated by neuron with its metrics recomputed."""
        from intraneuron.analyses.merge import check_disjoint, concat_by_neuron

        check_disjoint(shards)
        tables = {name: concat_by_neuron([s.get(name) for s in shards]) for name in ("neurons", "histogram", "contexts")}
        return layer_result(tables, layer)


def layer_result(tables: dict[str, pd.DataFrame], layer: int) -> LayerResult:
    """The layer's metrics and figure from its tables, and why a metric is NaN."""
    from intraneuron.analyses.reasons import nan_reasons

    table = tables["neurons"]
    metrics = layer_metrics(table)
    # frac_near_zero is NaN for every neuron when 0 is no bin edge of the histogram
    near_zero = "" if table["frac_near_zero"].notna().any() else NEAR_ZERO_UNDEFINED
    return LayerResult(tables=tables, metrics=metrics, figures={"moments": moments_figure(table, layer)},
                       reasons=nan_reasons(metrics, [("frac_near_zero/", near_zero)]))  # fmt: skip


def layer_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The layer metrics: the neuron count and the distribution of each SUMMARISED column."""
    metrics = {"neurons/n": float(len(table))}
    for column in SUMMARISED:
        for stat, value in distribution(table[column]).items():
            metrics[f"{column}/{stat}"] = value
    return metrics


def neuron_table(profile, neurons: np.ndarray) -> pd.DataFrame:
    """One row per neuron: its moments, std, sparsity, and the fraction of activations in the
    histogram bins either side of zero (|a| < one bin width, when 0 lies inside the range)."""
    columns = {name: profile.numpy(tensor)[neurons].astype(np.float64) for name, tensor in MOMENTS.items()}
    columns["std"] = np.sqrt(columns["var"])
    columns["frac_near_zero"] = _near_zero_fraction(profile)[neurons]
    return pd.DataFrame({"layer": profile.layer, "neuron": neurons, **columns})


def _near_zero_fraction(profile) -> np.ndarray:
    """[D] share of activations in the two inner bins that touch 0 (NaN when 0 is not an edge)."""
    edges = profile.numpy("hist_edges").astype(np.float64)  # [B + 1]
    counts = profile.numpy("hist_counts").astype(np.float64)  # [D, B + 2]; column b + 1 is inner bin b
    width = np.ptp(edges) / (edges.size - 1)
    zero = np.flatnonzero(np.abs(edges) < 1e-3 * width)  # float32 linspace puts "0" a rounding off
    if zero.size == 0 or zero[0] in (0, edges.size - 1):
        return np.full(counts.shape[0], np.nan)
    e = int(zero[0])  # inner bins e - 1 ([edges[e-1], 0)) and e ([0, edges[e+1]))
    return counts[:, e : e + 2].sum(1) / counts.sum(1)


def histogram_table(profile, neurons: np.ndarray) -> pd.DataFrame:
    """Long format, non-empty bins only: neuron, bin_low, bin_high, count. The under- and overflow
    bins have bin_low = -inf and bin_high = +inf respectively."""
    edges = profile.numpy("hist_edges").astype(np.float64)  # [B + 1]
    low = np.concatenate([[-np.inf], edges])  # [B + 2]
    high = np.concatenate([edges, [np.inf]])  # [B + 2]
    counts = profile.numpy("hist_counts")[neurons]  # [m, B + 2]
    row, column = np.nonzero(counts)
    return pd.DataFrame({
        "neuron": neurons[row], "bin_low": low[column], "bin_high": high[column],
        "count": counts[row, column].astype(np.int64),
    })  # fmt: skip


def contexts_table(
    profile, neurons: np.ndarray, ids: np.ndarray, token_texts: list[str], n_contexts: int, before: int
) -> pd.DataFrame:
    """The n_contexts top activating occurrences of each neuron with the text leading up to them:
    neuron, rank (0 = highest), activation, window, position, token, context (the `before` tokens
    preceding it in its window)."""
    values = profile.numpy("topk_values")[neurons, :n_contexts]  # [m, c]
    window, position = (a[neurons, :n_contexts] for a in profile.topk_window_and_pos())  # [m, c] each
    rows = []
    for j, neuron in enumerate(neurons):
        for rank in range(values.shape[1]):
            if not np.isfinite(values[j, rank]):  # fewer occurrences than k in the corpus
                break
            w, p = int(window[j, rank]), int(position[j, rank])
            preceding = np.asarray(ids[w, max(0, p - before) : p])
            rows.append({
                "neuron": int(neuron), "rank": rank, "activation": float(values[j, rank]),
                "window": w, "position": p, "token": token_texts[int(ids[w, p])],
                "context": "".join(token_texts[int(t)] for t in preceding),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=["neuron", "rank", "activation", "window", "position", "token", "context"])


def moments_figure(table: pd.DataFrame, layer: int):
    """Skew against kurtosis (log scale) per neuron, coloured by activation frequency."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    points = ax.scatter(table["skew"], table["kurtosis"], c=table["frac_positive"], s=6, cmap="viridis")
    ax.set_yscale("log")
    ax.set(xlabel="skew", ylabel="kurtosis (Gaussian = 3)", title=f"layer {layer}: {len(table)} neurons")
    fig.colorbar(points, ax=ax, label="fraction positive")
    plt.close(fig)
    return fig
