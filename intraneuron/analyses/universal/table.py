"""The universal analysis's per-neuron tables from the lockstep correlations of one layer."""

from __future__ import annotations

import numpy as np
import pandas as pd


def correlation_table(correlations, layer: int, names: list[str], d_mlps: list[int], threshold: float,
                      relative_threshold: float = 0.5) -> pd.DataFrame:  # fmt: skip
    """One row per reference neuron: per other model its max correlation, that partner (layer,
    neuron) and the baseline's max; over models the max, mean and min correlation, the mean
    baseline, the excess correlation (mean_corr - mean_baseline) and `universal` (excess >
    threshold); the baseline-relative score relative_corr = excess / (1 - mean_baseline), the share
    of the room above the baseline that the correlation fills, and `universal_relative` (relative_corr
    > relative_threshold). A dead neuron (no variance) has NaN correlations and is never universal."""
    columns: dict[str, np.ndarray] = {}
    corr, base = [], []
    for m, (name, d_mlp) in enumerate(zip(names, d_mlps, strict=True)):
        summary = correlations.actual[m][layer]
        values = summary["max_corr"].double().numpy()  # [D]
        partner = summary["partner"].long().numpy()  # [D], -1 = none
        columns[f"max_corr_{name}"] = values
        columns[f"partner_layer_{name}"] = np.where(partner >= 0, partner // d_mlp, -1)
        columns[f"partner_neuron_{name}"] = np.where(partner >= 0, partner % d_mlp, -1)
        corr.append(values)
        if correlations.baseline:
            baseline = correlations.baseline[m][layer]["max_corr"].double().numpy()
            columns[f"baseline_{name}"] = baseline
            base.append(baseline)
    corr_m = np.vstack(corr)  # [M, D]
    base_m = np.vstack(base) if base else np.zeros_like(corr_m)
    with np.errstate(all="ignore"):  # all-NaN columns are dead neurons: NaN, as they should be
        table = pd.DataFrame({
            "neuron": np.arange(corr_m.shape[1]),
            "max_corr": _nan_reduce(np.max, corr_m), "mean_corr": corr_m.mean(0), "min_corr": _nan_reduce(np.min, corr_m),
            "mean_baseline": base_m.mean(0), "max_baseline": _nan_reduce(np.max, base_m),
        })  # fmt: skip
    table["excess_corr"] = table["mean_corr"] - table["mean_baseline"]
    table["universal"] = (table["excess_corr"] > threshold).fillna(False).astype(bool)
    # excess <= 1 - baseline: with a baseline of 0.6 no neuron can pass excess > 0.5; the relative
    # score asks the same question at every baseline (0 = no better than it, 1 = perfectly correlated)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["relative_corr"] = table["excess_corr"] / (1 - table["mean_baseline"])
    table["universal_relative"] = (table["relative_corr"] > relative_threshold).fillna(False).astype(bool)
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def _nan_reduce(reduce, values: np.ndarray) -> np.ndarray:
    out = reduce(np.where(np.isnan(values), -np.inf if reduce is np.max else np.inf, values), axis=0)
    out[np.isnan(values).all(0)] = np.nan
    return out


def partners_table(correlations, layer: int, names: list[str], d_mlps: list[int]) -> pd.DataFrame:
    """Long format: neuron, model, rank (0 = best), corr, partner_layer, partner_neuron."""
    frames = []
    for m, (name, d_mlp) in enumerate(zip(names, d_mlps, strict=True)):
        summary = correlations.actual[m][layer]
        top = summary["top_corr"].double().numpy()  # [D, K]
        partner = summary["top_partner"].long().numpy()  # [D, K]
        neuron, rank = np.nonzero(partner >= 0)
        p = partner[neuron, rank]
        frames.append(pd.DataFrame({
            "neuron": neuron, "model": name, "rank": rank, "corr": top[neuron, rank],
            "partner_layer": p // d_mlp, "partner_neuron": p % d_mlp,
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def percentiles(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Within-layer percentile (0-100] of each neuron on each statistic, with `neuron`, `universal`
    and `universal_relative`: how universal neurons compare with all neurons of their layer."""
    ranks = {c: table[c].rank(pct=True) * 100 for c in columns}
    return pd.DataFrame({"neuron": table["neuron"], "universal": table["universal"],
                         "universal_relative": table["universal_relative"], **ranks})  # fmt: skip
