"""95% corpus intervals of the layer's headline fractions, their pseudo-neurons' value and the excess.

The corpus is extracted as G contiguous blocks of windows (`analysis.interval_blocks`,
extraction/blocks.py). A full re-analysis per replicate would cost G times a layer's analysis, so
only a subsample is re-analysed: `analysis.interval_neurons` neurons and as many pseudo-neurons,
drawn with (seed, layer). For each g, the merge of every block but g is analysed for them by the
same pipeline (`TwoFoldAnalysis._analyse`: same core-token rule, vectors, seeds per neuron),
giving each unit's replicate indicators of every fraction of FRACTIONS; stats/jackknife.py turns
them into the layer's interval (the derivation and its assumptions are there).

Indicators. A fraction is sum(u) / sum(a) over the layer's selected neurons (or its
pseudo-neurons): a = in its population (analysed; with categories for differentiation; a finite p),
u = also significant. A BH fraction's u is p < alpha k / m with k and m the full analysis's BH
discoveries and tests (alpha / m when none): this reproduces the full analysis's BH decisions, and a
replicate keeps that cutoff because BH over a subsample of units is another family, with another
cutoff. A replicate neuron's geometry p is against the full run's pseudo-neurons; a replicate
pseudo-neuron's against the full run's others (leave-one-out, like the null's self-calibration): the
null's own corpus variation enters the excess through the pseudo-neurons' replicates.

Not covered: the vectors are the full run's (a per-layer embedding is not rebuilt per replicate);
medians (epsilon^2, ARI ...) have no interval; neurons=sample adds its sampling of neurons to the
real fraction, which is not in its interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from intraneuron.analyses.two_fold.aggregate import NULL_COMPARED
from intraneuron.analyses.two_fold.geometry_null import (
    comparable,
    geometry_excess,
    self_calibration,
)
from intraneuron.analyses.two_fold.rows import blank, column
from intraneuron.extraction.blocks import BlockProfiles
from intraneuron.stats.jackknife import FractionReplicates, fraction_intervals

# fraction -> (its pseudo-neurons' value, the excess): the metric keys of aggregate_layer
FRACTIONS: dict[str, tuple[str, str]] = {
    **{key: (f"{key}_pseudo", f"{key}_excess") for key in (
        "topdown/kruskal_sig_frac_bh", "bottomup/top_sig_frac_bh", "homomorphism/mantel_sig_frac_bh",
        "neurons/topdown_skipped_frac")},
    **{f"geometry/{c}_sig_frac_bh": (f"geometry/{c}_pseudo_sig_frac_bh", f"geometry/{c}_sig_frac_bh_excess")
       for c in ("z_top", "epsilon2")},
}  # fmt: skip
P_COLUMN = {
    "topdown/kruskal_sig_frac_bh": "kruskal_p", "bottomup/top_sig_frac_bh": "p_top",
    "homomorphism/mantel_sig_frac_bh": "mantel_p", "geometry/z_top_sig_frac_bh": "z_top",
    "geometry/epsilon2_sig_frac_bh": "epsilon2",
}  # geometry: the statistic whose p against the pseudo-neurons is tested
BOUNDS = ("_ci_low", "_ci_high")

Analyse = Callable[[object, np.ndarray, bool], pd.DataFrame]  # (profile, ids, pseudo) -> neurons table


def interval_keys() -> list[str]:
    """The metric keys `layer_intervals` adds."""
    return [f"{k}{b}" for key, pair in FRACTIONS.items() for k in (key, *pair) for b in BOUNDS]


def companion_metrics(headline: Mapping[str, str]) -> dict[str, str]:
    """Readable name -> metric key of each headline's pseudo value, excess and their intervals."""
    out = {}
    for name, key in headline.items():
        if key in FRACTIONS:
            pseudo, excess = FRACTIONS[key]
            out.update({f"{name}_pseudo": pseudo, f"{name}_excess": excess})
            for label, k in ((name, key), (f"{name}_pseudo", pseudo), (f"{name}_excess", excess)):
                out.update({f"{label}{b}": f"{k}{b}" for b in BOUNDS})
        elif key in NULL_COMPARED:
            out.update({f"{name}_pseudo": f"{key}_pseudo", f"{name}_excess": f"{key}_excess"})
    return out


def bh_threshold(p: np.ndarray, alpha: float) -> float:
    """alpha k / m: p < it are BH's discoveries at alpha among the m finite p (k of them; alpha / m
    when none), the decisions of `stats.summary.significant_fraction`."""
    p = np.sort(p[np.isfinite(p)])
    m = p.size
    if m == 0:
        return np.nan
    below = np.flatnonzero(p * m / np.arange(1, m + 1) < alpha)
    return alpha * max(below[-1] + 1 if below.size else 0, 1) / m


def indicators(rows: pd.DataFrame, key: str, p: np.ndarray | None, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, a) [len(rows)] of fraction `key`; p [len(rows)]: the p each row is tested with."""
    analysed = blank(rows, "skipped").to_numpy()
    with_categories = analysed & blank(rows, "topdown_skipped").to_numpy()
    if key == "neurons/topdown_skipped_frac":
        return analysed & ~with_categories, analysed
    a = (with_categories if key == "topdown/kruskal_sig_frac_bh" else analysed) & np.isfinite(p)
    return a & (p < threshold), a


def layer_intervals(
    analyse: Analyse, blocks: BlockProfiles, rows: pd.DataFrame, pseudo_rows: pd.DataFrame | None, metrics: dict[str, float],
    *, n: int, seed: int, layer: int, alpha: float, min_null: int, match: int,
) -> dict[str, float]:  # fmt: skip
    """The interval metrics (interval_keys) of one layer: rows, pseudo_rows and metrics are the full
    analysis's (every selected neuron and pseudo-neuron, by neuron); blocks: its G block profiles."""
    from intraneuron.extraction.shards import merge_profiles

    rng = np.random.default_rng([seed, layer, 18])
    ids = np.sort(rng.choice(rows["neuron"].to_numpy(), size=min(n, len(rows)), replace=False))
    use_pseudo = pseudo_rows is not None and len(pseudo_rows) > 0
    pseudo_ids = (np.sort(rng.choice(pseudo_rows["neuron"].to_numpy(), size=min(n, len(pseudo_rows)), replace=False))
                  if use_pseudo else np.empty(0, int))  # fmt: skip
    full_p = {key: _p(rows, key, pseudo_rows, min_null, match) for key in FRACTIONS}
    full_pp = {key: _pseudo_p(pseudo_rows, key, None, min_null, match) for key in FRACTIONS} if use_pseudo else {}
    cut = {key: bh_threshold(p, alpha) if p is not None else np.nan for key, p in full_p.items()}
    pseudo_cut = {key: bh_threshold(p, alpha) if p is not None else np.nan for key, p in full_pp.items()}
    reps, pseudo_reps = {k: [] for k in FRACTIONS}, {k: [] for k in FRACTIONS}
    for g in range(len(blocks)):
        profile = merge_profiles(blocks.without(g))  # streamed: one block in memory at a time
        rep = analyse(profile, ids, False)
        for key in FRACTIONS:
            reps[key].append(indicators(rep, key, _p(rep, key, pseudo_rows, min_null, match), cut[key]))
        if use_pseudo:
            prep = analyse(profile.pseudo(), pseudo_ids, True)
            for key in FRACTIONS:
                p = _pseudo_p(pseudo_rows, key, prep, min_null, match)
                pseudo_reps[key].append(indicators(prep, key, p, pseudo_cut[key]))
    out = {}
    for key, (pseudo_key, excess_key) in FRACTIONS.items():
        real = _replicates(rows, key, full_p[key], cut[key], reps[key], metrics.get(key, np.nan))
        pseudo = (_replicates(pseudo_rows, key, full_pp[key], pseudo_cut[key], pseudo_reps[key],
                              metrics.get(pseudo_key, np.nan)) if use_pseudo else None)  # fmt: skip
        found = fraction_intervals(real, pseudo)
        for k, part in ((key, "value"), (pseudo_key, "pseudo"), (excess_key, "excess")):
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = found[part]
    return out


def timed_layer_intervals(analyse: Analyse, blocks: BlockProfiles, *args, **kwargs) -> dict[str, float]:
    """layer_intervals, plus how many blocks it used and its seconds (`intervals/blocks`, `/seconds`)."""
    started = time.perf_counter()
    found = layer_intervals(analyse, blocks, *args, **kwargs)
    found["intervals/blocks"] = float(len(blocks))
    found["intervals/seconds"] = time.perf_counter() - started
    return found


def _replicates(rows, key, p, threshold, reps, value) -> FractionReplicates:
    u, a = indicators(rows, key, p, threshold)
    share = float(a.mean()) if a.size else 0.0
    return FractionReplicates(value, share, len(rows), np.array([r[0] for r in reps], float).reshape(len(reps), -1),
                              np.array([r[1] for r in reps], float).reshape(len(reps), -1))  # fmt: skip


def _p(rows: pd.DataFrame, key: str, pseudo_rows, min_null: int, match: int) -> np.ndarray | None:
    """[len(rows)] each neuron's p of fraction `key` (geometry: against the full run's pseudo-neurons)."""
    if key not in P_COLUMN:
        return None
    c = P_COLUMN[key]
    if key.startswith("geometry/"):
        if pseudo_rows is None or c not in rows:
            return np.full(len(rows), np.nan)
        judged = geometry_excess(rows, pseudo_rows, (c,), min_null=min_null, match=match)
        return column(judged, f"{c}_p_geometry").to_numpy(np.float64)
    return column(rows, c).to_numpy(np.float64)


def _pseudo_p(pseudo_rows: pd.DataFrame, key: str, replicate: pd.DataFrame | None, min_null: int,
              match: int) -> np.ndarray | None:  # fmt: skip
    """[len(rows)] each pseudo-neuron's p (rows: `replicate`, else the full pseudo_rows); a geometry
    p is leave-one-out against the full run's other pseudo-neurons."""
    rows = pseudo_rows if replicate is None else replicate
    if key not in P_COLUMN or not key.startswith("geometry/"):
        return _p(rows, key, None, 0, match)
    c = P_COLUMN[key]
    p = np.full(len(rows), np.nan)
    if c not in pseudo_rows:
        return p
    analysed = pseudo_rows[blank(pseudo_rows, "skipped")]
    mask = comparable(analysed, c).to_numpy()
    if mask.sum() < max(min_null, 2):  # no self-calibration: the pseudo value is NaN
        return p
    if replicate is None:  # the null's own self-calibration, as the run reports it
        loo = self_calibration(analysed, c, match=match)
        by_neuron = dict(zip(analysed["neuron"].to_numpy()[mask].tolist(), loo.tolist(), strict=True))
        return np.array([by_neuron.get(i, np.nan) for i in rows["neuron"].tolist()])
    for j, (i, row) in enumerate(rows.iterrows()):
        null = analysed[analysed["neuron"] != row["neuron"]]
        judged = geometry_excess(rows.loc[[i]], null, (c,), min_null=1, match=match)
        p[j] = float(judged[f"{c}_p_geometry"].iloc[0])
    return p
