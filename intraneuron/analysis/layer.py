"""One layer, end to end on plain data: profile -> core tokens -> vectors -> per-neuron analyses.

Inputs are the layer's ActivationProfile and callables (embed token ids, label tokens, decode ids),
so this module knows nothing of models, configs or tracking. Neurons are independent, so they are
analysed in chunks, in parallel with joblib when `n_jobs` != 1; each neuron's permutations are seeded
by (seed, layer, neuron), so the numbers do not depend on the chunking or the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from intraneuron.analysis.core_tokens import select_core_tokens, token_filter_mask
from intraneuron.analysis.neuron import analyse_neuron

Embed = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids [n] -> (X [n, d], valid [n])
Label = Callable[[np.ndarray], np.ndarray]  # ids [n] -> category labels [n] (-1 = uncovered)
PREVIEW_TOKENS = 12  # core tokens shown per neuron in the table, highest first


@dataclass(frozen=True)
class CoreTokens:
    """One neuron's core tokens, highest activation first."""

    neuron: int
    token_ids: np.ndarray  # [n] vocabulary ids (repeats possible for unit="occurrence")
    acts: np.ndarray  # [n] mean activation of the type, or the occurrence's activation


@dataclass
class LayerResult:
    rows: pd.DataFrame  # one row per neuron: neuron, core-token counts, preview, ROW_KEYS
    categories: pd.DataFrame  # (neuron, category) -> size, mean, sd, ...
    segments: pd.DataFrame  # (neuron, segment) -> size, homogeneity, z, p
    pairs: pd.DataFrame  # (neuron, category pair) -> Mann-Whitney, Cliff's delta, overlaps


def select_neurons(d_mlp: int, select: str, start: int = 0, stop: int | None = None,
                   n: int = 256, seed: int = 0) -> np.ndarray:  # fmt: skip
    """Neuron indices [m], ascending: all, the range [start, stop), or a seeded sample of n."""
    if select == "all":
        return np.arange(d_mlp)
    if select == "range":
        return np.arange(start, min(d_mlp, d_mlp if stop is None else stop))
    return np.sort(np.random.default_rng(seed).choice(d_mlp, size=n, replace=False))


def core_tokens_of(
    profile,
    neurons: np.ndarray,
    *,
    unit: str,
    rule: str,
    n: int,
    tau: float,
    q: float,
    max_tokens: int | None,
    min_count: int,
    keep_token: np.ndarray | None = None,
) -> list[CoreTokens]:
    """Core tokens of each neuron in `neurons` from one profile.

    unit="type": candidates are the token types seen at least `min_count` times, valued by their
    mean activation; unit="occurrence": the neuron's top-k activating positions.
    keep_token: [vocab] bool, False for tokens the filters drop (None keeps all).
    """
    if unit == "type":
        type_ids = profile.numpy("type_ids")  # [T]
        values = profile.numpy("type_mean")[:, neurons]  # [T, m]
        valid = profile.numpy("type_count") >= min_count  # [T]
        if keep_token is not None:
            valid &= keep_token[type_ids]
        picked = select_core_tokens(values, valid, rule, n, tau, q, max_tokens)
        return [
            CoreTokens(int(neuron), type_ids[idx], values[idx, j].astype(np.float64))
            for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
        ]
    token_ids = profile.numpy("topk_token_ids")[neurons]  # [m, K]
    values = profile.numpy("topk_values")[neurons].astype(np.float64)  # [m, K], -inf = unfilled
    if keep_token is not None:
        values = np.where(keep_token[token_ids], values, np.nan)  # NaN is never selected
    picked = select_core_tokens(values.T, None, rule, n, tau, q, max_tokens)
    return [
        CoreTokens(int(neuron), token_ids[j, idx], values[j, idx])
        for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
    ]


def keep_mask(token_texts: list[str], drop_whitespace_punct: bool, drop_byte_fragments: bool) -> np.ndarray | None:
    """[vocab] keep-mask of the core-token filters, or None when both are off."""
    if not (drop_whitespace_punct or drop_byte_fragments):
        return None
    return token_filter_mask(token_texts, drop_whitespace_punct, drop_byte_fragments)


def _analyse_chunk(
    chunk: list[tuple[CoreTokens, np.ndarray, np.ndarray | None, int]],
    layer: int,
    seed: int,
    options: dict[str, Any],
) -> list[tuple[int, Any]]:
    return [
        (core.neuron, analyse_neuron(core.acts, X, labels, seed=(seed, layer, core.neuron), **options))
        for core, X, labels, _ in chunk
    ]


def analyse_layer(
    layer: int,
    cores: list[CoreTokens],
    embed: Embed,
    *,
    label: Label | None = None,
    decode: Callable[[np.ndarray], list[str]] | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    chunk_size: int = 16,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> LayerResult:
    """Analyse every neuron's core tokens (see `analyse_neuron` for `options`).

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
    jobs = (delayed(_analyse_chunk)(chunk, layer, seed, options) for chunk in chunks)
    for done in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
        results.update(done)
        if progress is not None:
            progress(len(done))

    rows, categories, segments, pairs = [], [], [], []
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
                           (result.pairs, pairs)):  # fmt: skip
            if len(table):
                out.append(table.assign(layer=layer, neuron=core.neuron))
    return LayerResult(
        rows=pd.DataFrame(rows),
        categories=_concat(categories),
        segments=_concat(segments),
        pairs=_concat(pairs),
    )


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame()
    frame = pd.concat(tables, ignore_index=True)
    first = ["layer", "neuron"]
    return frame[first + [c for c in frame.columns if c not in first]]
