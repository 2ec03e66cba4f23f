"""One layer on plain data: core tokens -> vectors -> per-neuron analyses -> four tables.

Inputs are the neurons' core tokens and callables (embed token ids, label tokens, decode ids, the
neuron's read-in directions), so this module knows nothing of models, configs or tracking. Neurons
are independent, so they are analysed in chunks, in parallel with joblib when `n_jobs` != 1; each
neuron's permutations are seeded by (seed, layer, neuron, *stream), so the numbers do not depend on
the chunking or the number of workers (pseudo-neurons use another stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from intraneuron.analyses.two_fold.core_tokens import CoreTokens
from intraneuron.analyses.two_fold.geometry import project_out
from intraneuron.analyses.two_fold.neuron import ROW_KEYS, TwoFoldNeuron

Embed = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids [n] -> (X [n, d], valid [n])
Label = Callable[[np.ndarray], np.ndarray]  # ids [n] -> category labels [n] (-1 = uncovered)
ReadIn = Callable[[int], np.ndarray]  # neuron -> its read-in directions [r, d]
PREVIEW_TOKENS = 12  # core tokens shown per neuron in the table, highest first
TABLES = ("neurons", "categories", "segments", "pairs", "k_curve")


def _analyse_chunk(
    chunk: list[tuple[CoreTokens, np.ndarray, np.ndarray | None, int]],
    layer: int,
    seed: int,
    neuron: TwoFoldNeuron,
    stream: tuple[int, ...] = (),
) -> list[tuple[int, Any]]:
    return [
        (core.neuron, neuron.analyse(core.acts, X, labels, seed=(seed, layer, core.neuron, *stream)))
        for core, X, labels, _ in chunk
    ]


def analyse_layer(
    layer: int,
    cores: list[CoreTokens],
    embed: Embed,
    neuron: TwoFoldNeuron,
    *,
    label: Label | None = None,
    decode: Callable[[np.ndarray], list[str]] | None = None,
    read_in: ReadIn | None = None,
    seed: int = 0,
    stream: tuple[int, ...] = (),
    n_jobs: int = 1,
    chunk_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Analyse every neuron's core tokens with `neuron`; the tables named in TABLES.

    embed gives the vectors (tokens it cannot embed are dropped and counted); read_in, when given,
    gives each neuron's read-in directions, removed from its vectors (the geometry control); label,
    when given, replaces clustering by fixed categories (e.g. WordNet supersenses). A core marked
    skipped (e.g. too little selectivity) gets a row with its reason and no analysis.
    """
    prepared, skipped = [], []
    for core in cores:
        if core.skipped:
            skipped.append(core)
            continue
        X, valid = embed(core.token_ids)
        X = X[valid]
        if read_in is not None:
            X = project_out(X, read_in(core.neuron))
        labels = label(core.token_ids[valid]) if label is not None else None
        kept = replace(core, token_ids=core.token_ids[valid], acts=core.acts[valid])
        prepared.append((kept, X, labels, int((~valid).sum())))

    chunks = [prepared[i : i + chunk_size] for i in range(0, len(prepared), chunk_size)]
    results: dict[int, Any] = {}
    jobs = (delayed(_analyse_chunk)(chunk, layer, seed, neuron, stream) for chunk in chunks)
    for done in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
        results.update(done)
        if progress is not None:
            progress(len(done))
    if progress is not None and skipped:
        progress(len(skipped))

    rows, categories, segments, pairs, k_curves = [], [], [], [], []
    for core in skipped:
        row = dict.fromkeys(ROW_KEYS, np.nan)
        row.update(skipped=core.skipped, topdown_skipped="", n_tokens=float(len(core.token_ids)))
        rows.append({**_core_columns(layer, core, 0, None, decode), **row})
    for core, _, labels, n_unembedded in prepared:
        result = results[core.neuron]
        rows.append({**_core_columns(layer, core, n_unembedded, labels, decode), **result.row})
        for table, out in ((result.categories, categories), (result.segments, segments),
                           (result.pairs, pairs), (result.k_curve, k_curves)):  # fmt: skip
            if len(table):
                out.append(table.assign(layer=layer, neuron=core.neuron))
    neurons = pd.DataFrame(rows)
    if len(neurons):
        neurons = neurons.sort_values("neuron", kind="stable", ignore_index=True)
    return {
        "neurons": neurons,
        "categories": _concat(categories),
        "segments": _concat(segments),
        "pairs": _concat(pairs),
        "k_curve": _concat(k_curves),
    }


def _core_columns(layer: int, core: CoreTokens, n_unembedded: int, labels, decode) -> dict:
    """The columns of a neuron's row that describe its core tokens rather than the analysis."""
    preview = decode(core.token_ids[:PREVIEW_TOKENS]) if decode is not None else []
    return {
        "layer": layer,
        "neuron": core.neuron,
        "n_core": len(core.token_ids) + n_unembedded,
        "n_unembedded": n_unembedded,
        "label_coverage": float(np.mean(labels >= 0)) if labels is not None and len(labels) else np.nan,
        "core_preview": " | ".join(preview),
        "core_overlap": core.core_overlap,
        "core_reliability": core.core_reliability,
        "selectivity": core.selectivity,
    }


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame()
    frame = pd.concat(tables, ignore_index=True)
    first = ["layer", "neuron"]
    return frame[first + [c for c in frame.columns if c not in first]]
