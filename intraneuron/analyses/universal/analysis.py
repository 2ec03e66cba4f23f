"""Universal neurons (Gurnee et al. 2024) behind the Analysis seam: which neurons of the reference
model have a highly correlated partner in every other model (trained from other seeds), beyond what
a random rotation of the other model's neurons gives, and how they differ from the rest.

One lockstep pass (per memory tile) streams the same windows through every model; per reference
neuron and other model it keeps the best partners over all the other model's layers, and the same
under the rotation baseline. Universal: mean over models of the max correlation minus the mean of
the baseline's max (the excess correlation) above `threshold` (the paper's 0.5). Beside it the
baseline-relative score, excess / (1 - mean baseline), above `relative_threshold`: the excess
cannot exceed 1 - baseline, so with high baselines (small, briefly trained models) the paper's
criterion cannot be met whatever the neurons do.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from intraneuron.analyses.base import Analysis, Job, LayerResult, Requirements
from intraneuron.errors import ConfigError
from intraneuron.stats.summary import distribution

DROPPABLE = ("bos", "eos", "pad", "newline")  # tokens whose rows can be left out of the correlations


class UniversalAnalysis(Analysis):
    """Universal neurons: each neuron's best correlates in other models against a rotation baseline (Gurnee et al. 2024).

    `analysis=universal`: the correlation site, partners kept, baseline, threshold and memory.
    """

    name = "universal"
    headline = {
        "universal_frac": "universal/frac",
        "universal_n": "universal/n",
        "excess_corr_median": "excess_corr/median",
        "universal_relative_frac": "universal_relative/frac",
        "relative_corr_median": "relative_corr/median",
        "mean_corr_median": "mean_corr/median",
        "baseline_corr_median": "mean_baseline/median",
        "universal_kurtosis_percentile_median": "universal_percentile/kurtosis/median",
        "universal_frac_positive_percentile_median": "universal_percentile/frac_positive/median",
        "dead_frac": "dead/frac",
    }
    rank_by = ("excess_corr", "relative_corr", "mean_corr", "min_corr", "kurtosis", "skew")
    # per-neuron statistics compared between universal neurons and the rest (within-layer percentiles)
    COMPARED = ("frac_positive", "mean", "skew", "kurtosis", "input_bias", "in_out_sim", "l2_penalty", "vocab_kurt")

    def __init__(
        self,
        site: str = "mlp.hook_post",
        other_layers: list[int] | None = None,
        top_k: int = 5,
        baseline: str = "rotation",
        threshold: float = 0.5,
        relative_threshold: float = 0.5,
        drop_tokens: list[str] | None = None,
        memory_gb: float = 2.0,
        seed: int = 0,
        weights: bool = True,
    ):
        from intraneuron.extraction.lockstep import BASELINES
        from intraneuron.models.adapters import SITE_TEMPLATES

        self.site = site
        self.other_layers = other_layers
        self.top_k = top_k
        self.baseline = baseline
        self.threshold = threshold
        self.relative_threshold = relative_threshold
        self.drop_tokens = drop_tokens
        self.memory_gb = memory_gb
        self.seed = seed
        self.weights = weights
        if site not in ("mlp.hook_post", "mlp.hook_pre"):
            raise ConfigError("analysis.site", site, [t.removeprefix("blocks.{layer}.") for t in SITE_TEMPLATES[1:]])
        if top_k < 1:
            raise ConfigError("analysis.top_k", top_k, "an integer >= 1")
        if baseline not in BASELINES:
            raise ConfigError("analysis.baseline", baseline, BASELINES)
        if not -1.0 <= threshold <= 2.0:
            raise ConfigError("analysis.threshold", threshold, "an excess correlation in [-1, 2] (paper: 0.5)")
        if not 0.0 <= relative_threshold < 1.0:
            raise ConfigError("analysis.relative_threshold", relative_threshold,
                              "a share of the room above the baseline in [0, 1) (default 0.5)")  # fmt: skip
        bad = [t for t in (drop_tokens or []) if t not in DROPPABLE]
        if bad:
            raise ConfigError("analysis.drop_tokens", drop_tokens, f"a list of {', '.join(DROPPABLE)}")
        if memory_gb <= 0:
            raise ConfigError("analysis.memory_gb", memory_gb, "a positive number of GiB")
        if other_layers is not None and (not other_layers or min(other_layers) < 0):
            raise ConfigError("analysis.other_layers", other_layers, "null (all layers) or layer indices >= 0")

    def requirements(self, run) -> Requirements:
        return Requirements(stats=frozenset({"moments", "histogram", "topk"}), n_models=1 + len(run.models.others))

    def setting(self, run) -> str:
        return f"vs {len(run.models.others)} models, {self.baseline} baseline, threshold {self.threshold:g}"

    def check(self, run) -> None:
        if not run.models.others:
            raise ConfigError("models.others", [], "at least one model to compare with `model` "
                              "(e.g. models=seed_models)")  # fmt: skip

    def check_model(self, run, handle) -> None:
        if self.weights:
            from intraneuron.models.weights import weight_layout

            layout = weight_layout(handle)
            if not layout.processable or layout.final_norm is None:
                raise ConfigError("analysis.weights", True, f"false for {handle.config.model_type} "
                                  "(no processed weights or no unembedding to compare w_out with)")  # fmt: skip
        if self.other_layers is not None and max(self.other_layers) >= handle.n_layers:
            raise ConfigError("analysis.other_layers", self.other_layers, f"layers < {handle.n_layers}")

    def collect(self, job: Job, profiles, on_progress=None) -> bool:
        from intraneuron.analyses.universal.correlations import cached_correlations

        self.correlations_ = cached_correlations(job, self, on_progress)
        return True

    def analyse_layer(self, job: Job, layer: int, profile) -> LayerResult:
        from intraneuron.analyses.neuron_stats.analysis import neuron_table
        from intraneuron.analyses.universal.figures import layer_figures
        from intraneuron.analyses.universal.table import (
            correlation_table,
            partners_table,
            percentiles,
        )

        names = [m.name for m in job.run.models.others]
        neurons = np.arange(profile.d_mlp)
        table = correlation_table(self.correlations_, layer, names, [h.d_mlp for h in job.others], self.threshold,
                                  self.relative_threshold)  # fmt: skip
        stats = neuron_table(profile, neurons).drop(columns=["layer", "neuron"])
        table = pd.concat([table, stats], axis=1)
        if self.weights:
            from intraneuron.analyses.universal.neuron_weights import neuron_weight_table

            weights = neuron_weight_table(job.handle, layer).drop(columns=["layer", "neuron"])
            table = pd.concat([table, weights.reset_index(drop=True)], axis=1)
        table.insert(0, "layer", layer)
        compared = [c for c in self.COMPARED if c in table]
        ranks = percentiles(table, compared)
        metrics = layer_metrics(table, ranks, compared)
        tables = {
            "neurons": table,
            "partners": partners_table(self.correlations_, layer, names, [h.d_mlp for h in job.others]),
            "percentiles": ranks,
        }
        reasons = layer_reasons(table, metrics, self.threshold, self.relative_threshold)
        figures = layer_figures(table, ranks, compared, layer, self.threshold, self.relative_threshold)
        return LayerResult(tables=tables, metrics=metrics, reasons=reasons, figures=figures)

    def run_figures(self, metrics: dict[int, dict[str, float]]) -> dict:
        from intraneuron.analyses.universal.figures import share_by_layer

        return {"universal_share_by_layer": share_by_layer(metrics)} if len(metrics) > 1 else {}


def layer_metrics(table: pd.DataFrame, ranks: pd.DataFrame, compared: list[str]) -> dict[str, float]:
    alive = table["mean_corr"].notna()
    metrics = {"dead/frac": float((~alive).mean()) if len(table) else np.nan}
    for criterion in ("universal", "universal_relative"):
        metrics[f"{criterion}/n"] = float(table[criterion].sum())
        metrics[f"{criterion}/frac"] = float(table[criterion].mean()) if len(table) else np.nan
    for column in ("excess_corr", "relative_corr", "mean_corr", "max_corr", "min_corr", "mean_baseline"):
        for stat, value in distribution(table[column]).items():
            metrics[f"{column}/{stat}"] = value
    for criterion in ("universal", "universal_relative"):
        chosen = table[criterion].to_numpy(bool)
        for column in compared:  # where universal neurons sit in the layer (50 = like everyone else)
            for stat, value in distribution(ranks.loc[chosen, column]).items():
                metrics[f"{criterion}_percentile/{column}/{stat}"] = value
    return metrics


def layer_reasons(table: pd.DataFrame, metrics: dict[str, float], threshold: float,
                  relative_threshold: float = 0.5) -> dict[str, str]:  # fmt: skip
    """Why a layer metric is NaN: no neuron has a partner correlation (all dead), or none is universal."""
    from intraneuron.analyses.reasons import counted, nan_reasons

    rules = []
    if not table["mean_corr"].notna().any():  # a neuron constant over the corpus correlates with nothing
        why = "no correlations: " + counted(["dead (constant over the corpus)"] * len(table), len(table))
        rules += [(f"{column}/", why) for column in ("excess_corr", "relative_corr", "mean_corr", "max_corr", "min_corr",
                                                     "mean_baseline")]  # fmt: skip
    if not table["universal"].any():
        rules.append(("universal_percentile/", f"no universal neuron: excess correlation above "
                      f"analysis.threshold={threshold:g} for 0 of {len(table)} neurons"))  # fmt: skip
    if not table["universal_relative"].any():
        rules.append(("universal_relative_percentile/", f"no universal neuron: relative correlation above "
                      f"analysis.relative_threshold={relative_threshold:g} for 0 of {len(table)} neurons"))  # fmt: skip
    return nan_reasons(metrics, rules)
