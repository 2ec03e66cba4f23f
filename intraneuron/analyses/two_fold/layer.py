"""One layer on plain data: core tokens -> vectors -> per-neuron analyses -> four tables.

Inputs are the neurons' core tokens and callables (embed token ids, label tokens, decode ids),
so this module knows nothing of models, configs or tracking. Neurons are independent, so they are
analysed in chunks, in parallel with joblib when `n_jobs` != 1; each neuron's permutations are seeded
by (seed, layer, neuron), so the numbers do not depend on the chunking or the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from intraneuron.analyses.two_fold.core_tokens import CoreTokens
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron

Embed = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids [n] -> (X [n, d], valid [n])
Label = Callable[[np.ndarray], np.ndarray]  # ids [n] -> category labels [n] (-1 = uncovered)
PREVIEW_TOKENS = 12  # core tokens shown per neuron in the table, highest first
TABLES = ("neurons", "categories", "segments", "pairs", "k_curve")


def _analyse_chunk(
    chunk: list[tuple[CoreTokens, np.ndarray, np.ndarray | None, int]],
    layer: int,
    seed: int,
    neuron: TwoFoldNeuron,
) -> list[tuple[int, Any]]:
    return [
        (core.neuron, neuron.analyse(core.acts, X, labels, seed=(seed, layer, core.neuron)))
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
    seed: int = 0,
    n_jobs: int = 1,
    chunk_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Analyse every neuron's core tokens with `neuron`; the tables named in TABLES.

    embed gives the vectors (tokens it cannot embed are dropped and counted); label, when given,
    replaces clustering by fixed categories (e.g. WordNet supersenses).
    """
    prepared = []
    for core in cores:
        X, valid = embed(core.token_ids)
        labels = label(core.token_ids[valid]) if label is not None else None
        kept = CoreTokens(core.neuron, core.token_ids[valid], core.acts[valid])
        prepared.append((kept, X[valid], labels, int((~valid).sum())))

    chunks = [prepared[i : i + chunk_size] for i in range(0, len(prepared), chunk_size)]
    results: dict[int, Any] = {}
    jobs = (delayed(_analyse_chunk)(chunk, layer, seed, neuron) for chunk in chunks)
    for done in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
        results.update(done)
        if progress is not None:
            progress(len(done))

    rows, categories, segments, pairs, k_curves = [], [], [], [], []
    for core, _, labels, n_unembedded in prepared:
        result = results[core.neuron]
        preview = decode(core.token_ids[:PREVIEW_TOKENS]) if decode is not None else []
        rows.append({
            "layer": layer,
            "neuron": core.neuron,
            "n_core": len(core.token_ids) + n_unembedded,
            "n_unembedded": n_unembedded,
            "label_coverage": float(np.mean(labels >= 0)) if labels is not None and len(labels) else np.nan,
            "core_preview": " | ".join(preview),
            **result.row,
        })  # fmt: skip
        for table, out in ((result.categories, categories), (result.segments, segments),
                           (result.pairs, pairs), (result.k_curve, k_curves)):  # fmt: skip
            if len(table):
                out.append(table.assign(layer=layer, neuron=core.neuron))
    return {
        "neurons": pd.DataFrame(rows),
        "categories": _concat(categories),
        "segments": _concat(segments),
        "pairs": _concat(pairs),
        "k_curve": _concat(k_curves),
    }


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame()
    frame = pd.concat(tables, ignore_index=True)
    first = ["layer", "neuron"]
    return frame[first + [c for c in frame.columns if c not in first]]
