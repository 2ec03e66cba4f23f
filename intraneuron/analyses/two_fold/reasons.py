"""Why a two-fold layer metric or a neuron's statistic is NaN.

A layer metric draws on one population of neurons: the analysed ones (not `skipped`), those of them
with categories (no `topdown_skipped`: the top-down statistics and their geometry excess), or the
pseudo-neurons (the geometry null). When that population is empty the reason counts why its
neurons were left out; a geometry null smaller than analysis.min_pseudo_neurons is an
"insufficient null". A neuron's own reasons are its `skipped` and `topdown_skipped` columns and
the size of the null its geometry p was withheld for (`<stat>_n_null`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from intraneuron.analyses.reasons import counted, nan_reasons
from intraneuron.analyses.two_fold.aggregate import NULL_COMPARED, compared_keys
from intraneuron.analyses.two_fold.geometry_null import (
    GEOMETRY_COLUMNS,
    MIN_NULL,
    WITH_CATEGORIES,
    null_size,
)
from intraneuron.analyses.two_fold.neuron import TOPDOWN_KEYS
from intraneuron.analyses.two_fold.rows import blank as _blank

PSEUDO_OFF = "no pseudo-neurons: geometry null off (extraction.pseudo_neurons=0)"
# metrics against the pseudo-neurons, and those of them that compare top-down statistics
PSEUDO_METRICS = ("geometry/", "bottomup/top_sig_frac_pseudo", "bottomup/top_sig_vs_pseudo_p",
                  "bottomup/top_pi0_geometry", *compared_keys())  # fmt: skip
# what needs categories: the top-down statistics, their agreement with the segments, their excess
TOPDOWN_METRICS = ("topdown/", "homomorphism/ari", "homomorphism/ami", "geometry/epsilon2", "geometry/silhouette",
                   "geometry/ari")  # fmt: skip
TOPDOWN_COLUMNS = (*TOPDOWN_KEYS, "ari", "ami")  # of a neuron's row, with the geometry excess columns of each
MANTEL_METRICS = ("homomorphism/mantel_sig_frac_bh", "homomorphism/mantel_pi0")
# a skip reason (with the neuron's own numbers) -> the kind that neurons skipped alike share
_SKIP_KINDS = (("selectivity ", "too little selectivity (core_tokens.min_selectivity)"),
               (" core tokens (< ", "too few core tokens (core_tokens.min_core_tokens)"))  # fmt: skip


def layer_reasons(
    rows: pd.DataFrame, pseudo_rows: pd.DataFrame | None, metrics: Mapping[str, float], *, mantel: bool = True,
    min_null: int = MIN_NULL,
) -> dict[str, str]:  # fmt: skip
    """metric key -> why it is NaN, for the NaN `metrics` of the layer whose neurons are `rows`
    (pseudo_rows: its pseudo-neurons, None when off; mantel: Mantel permutations were run;
    min_null: analysis.min_pseudo_neurons)."""
    analysed = rows[_blank(rows, "skipped")]
    rules = [("", "no neuron analysed: " + counted(map(skip_kind, rows["skipped"]), len(rows)))] if analysed.empty else []
    if pseudo_rows is None:
        rules += [(prefix, PSEUDO_OFF) for prefix in PSEUDO_METRICS]
    else:
        rules += _insufficient_null(pseudo_rows, min_null, pseudo_values_only=True)
    if analysed[_blank(analysed, "topdown_skipped")].empty:
        why = "no categories: " + counted(_k(analysed), len(analysed), "analysed neurons")
        rules += [(prefix, why) for prefix in TOPDOWN_METRICS]
    if pseudo_rows is not None:
        pseudo = pseudo_rows[_blank(pseudo_rows, "skipped")]
        if pseudo.empty:
            why = "no pseudo-neuron analysed: " + counted(map(skip_kind, pseudo_rows["skipped"]), len(pseudo_rows), "pseudo-neurons")
            rules += [(prefix, why) for prefix in PSEUDO_METRICS]
        elif pseudo[_blank(pseudo, "topdown_skipped")].empty:
            why = "no categories among the pseudo-neurons: " + counted(_k(pseudo), len(pseudo), "pseudo-neurons")
            rules += [(prefix, why) for prefix in TOPDOWN_METRICS if prefix.startswith("geometry/")]
            rules += [(f"{key}_", why) for key in NULL_COMPARED if key.startswith(TOPDOWN_METRICS)]
        rules += _insufficient_null(pseudo_rows, min_null, pseudo_values_only=False)
    if not mantel:
        rules += [(prefix, "no Mantel test: analysis.n_mantel_permutations=0") for prefix in MANTEL_METRICS]
    return nan_reasons(metrics, rules)


def _insufficient_null(pseudo_rows: pd.DataFrame, min_null: int, *, pseudo_values_only: bool) -> list[tuple[str, str]]:
    """Rules for the metrics a null of fewer than min_null pseudo-neurons withholds: the
    pseudo-neurons' values of the headline summaries ("<metric>_pseudo", pseudo_values_only) or
    their excesses and each geometry statistic's metrics ("geometry/<stat>_")."""
    n = len(pseudo_rows)
    analysed = int(_blank(pseudo_rows, "skipped").sum())
    why = f"insufficient null: {{}} of {n} pseudo-neurons {{}} (< analysis.min_pseudo_neurons={min_null})"
    if analysed < n:
        skipped = pseudo_rows.loc[~_blank(pseudo_rows, "skipped"), "skipped"]
        why += "; not analysed: " + counted(map(skip_kind, skipped), n, "pseudo-neurons")
    rules = []
    if analysed < min_null:
        suffix = ("_pseudo",) if pseudo_values_only else ("_excess",)
        rules += [(f"{key}{s}", why.format(analysed, "analysed")) for key in NULL_COMPARED for s in suffix]
    if not pseudo_values_only:
        for c in GEOMETRY_COLUMNS:
            if (size := null_size(pseudo_rows, c)) < min_null:
                given = f"give {c}" + (" (with categories)" if c in WITH_CATEGORIES else "")
                rules.append((f"geometry/{c}_", why.format(size, given)))
    return rules


def neuron_reason(row: Mapping[str, Any], column: str, min_null: int = MIN_NULL) -> str:
    """Why `column` of a neuron's row is NaN: it was skipped, it has no categories (a top-down
    statistic or its excess over the pseudo-neurons), or its geometry null was smaller than
    min_null (analysis.min_pseudo_neurons); "" otherwise."""
    if row.get("skipped"):
        return f"not analysed: {row['skipped']}"
    if row.get("topdown_skipped") and column.startswith(TOPDOWN_COLUMNS):
        return f"no categories: {row['topdown_skipped']}"
    for c in GEOMETRY_COLUMNS:
        size = row.get(f"{c}_n_null", np.nan)
        if column in (f"{c}_p_geometry", f"{c}_excess") and np.isfinite(size) and size < min_null:
            return f"insufficient null: {int(size)} pseudo-neurons give {c} (< analysis.min_pseudo_neurons={min_null})"
    return ""


def skip_kind(reason: str) -> str:
    """A neuron's skip reason without its own numbers, so that neurons skipped alike count together."""
    return next((kind for marker, kind in _SKIP_KINDS if marker in reason), reason)


def _k(rows: pd.DataFrame) -> list[str]:
    """"K = <n_categories>" of each row."""
    k = pd.to_numeric(rows["n_categories"], errors="coerce").to_numpy(dtype=np.float64)
    return [f"K = {int(v)}" if np.isfinite(v) else "K unknown" for v in k]

