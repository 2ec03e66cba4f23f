"""A card's contexts: the neuron's top and lowest activating occurrences, every token shaded.

Top contexts are exact: the streaming pass keeps each neuron's top-k occurrences. The shading of
the tokens around them comes from re-running the model on just those windows
(`extraction.contexts`), since the pass never keeps whole windows of activations.

Lowest contexts (where the activation is most negative) are a search, not a full sort. The pass
keeps no bottom-k: one would be a second top-k over every token of the corpus, in the pass whose
speed is measured against a plain forward, for the handful of neurons that get a card. Instead the
windows most likely to hold a neuron's lowest activations join the same re-run: the windows of its
lowest-mean token types (the type table; a type's mean is an average of its occurrences, so at least
one of them lies at or below it), one window per type, lowest mean first, `SEARCH` windows per
context shown. Each searched window offers its lowest occurrence and the lowest of those are shown,
one per window. An analysis whose pass keeps no type table gets windows drawn at random instead
(seeded by report.seed, layer and neuron). Either way the card prints the corpus minimum from the
streaming pass (moments) beside what the search found. A neuron's contexts depend on its own windows
alone, so a card rebuilt on its own (`show --neuron`) is the card the run logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEARCH = 4  # windows searched per lowest context shown


@dataclass
class Context:
    """One occurrence with the tokens around it."""

    activation: float  # the neuron's activation at the occurrence
    window: int
    position: int  # in the window
    tokens: list[str]  # text of the tokens shown
    acts: list[float]  # the neuron's activation at each of them
    focus: int  # index in `tokens` of the occurrence


@dataclass
class CardContexts:
    top: dict[int, list[Context]]
    lowest: dict[int, list[Context]] = field(default_factory=dict)
    lowest_note: dict[int, str] = field(default_factory=dict)  # how the lowest ones were searched


def card_contexts(job, layer: int, profile, neurons: list[int], report) -> CardContexts:
    """Top (`report.contexts`) and lowest (`report.lowest_contexts`) contexts of `neurons`, with
    `report.context_tokens` tokens either side, from one re-run over the union of their windows."""
    from intraneuron.extraction.contexts import window_activations

    top = top_occurrences(profile, neurons, report.contexts)  # neuron -> [(window, position, value)]
    search = {}
    if report.lowest_contexts:
        ids = job.windows.ids
        search = {n: search_windows(ids, profile, n, SEARCH * report.lowest_contexts, (report.seed, layer, n))
                  for n in neurons}  # fmt: skip
    wanted = [w for found in top.values() for w, _, _ in found] + [w for ws, _ in search.values() for w in ws]
    needed = np.unique(np.asarray(wanted, dtype=np.int64))  # [w]
    if not needed.size:
        return CardContexts({n: [] for n in neurons})
    ids = np.asarray(job.windows.ids[needed], dtype=np.int64)  # [w, T]
    extraction = job.run.extraction
    acts = window_activations(job.handle, ids, layer, extraction.site, np.asarray(neurons),
                              device=extraction.device, batch_size=extraction.batch_size)  # [w, T, m] fmt: skip
    row_of = {int(w): i for i, w in enumerate(needed)}
    texts, width = job.token_texts, report.context_tokens

    def context(row: int, j: int, position: int, value: float) -> Context:
        lo, hi = max(0, position - width), min(ids.shape[1], position + width + 1)
        return Context(activation=value, window=int(needed[row]), position=position,
                       tokens=[texts[t] for t in ids[row, lo:hi]], acts=acts[row, lo:hi, j].astype(float).tolist(),
                       focus=position - lo)  # fmt: skip

    out = CardContexts({n: [context(row_of[w], j, p, v) for w, p, v in top[n]] for j, n in enumerate(neurons)})
    minimum = profile.numpy("act_min") if "act_min" in profile.tensors else None  # [D]
    for j, neuron in enumerate(neurons):
        if neuron not in search:
            continue
        windows, how = search[neuron]
        rows = np.array([row_of[w] for w in windows], dtype=np.int64)  # [s]
        window_acts = acts[rows, :, j].copy()  # [s, T]
        window_acts[:, : extraction.skip_first_positions] = np.inf  # positions the pass leaves out (BOS)
        position = window_acts.argmin(1)  # [s] each window's lowest occurrence
        value = window_acts[np.arange(rows.size), position]  # [s]
        shown = np.argsort(value, kind="stable")[: report.lowest_contexts]
        out.lowest[neuron] = [context(int(rows[i]), j, int(position[i]), float(value[i])) for i in shown]
        floor = f"; the corpus minimum is {float(minimum[neuron]):.3g}" if minimum is not None else ""
        out.lowest_note[neuron] = f"the lowest of {rows.size} windows searched: {how}{floor}"
    return out


def top_occurrences(profile, neurons: list[int], n: int) -> dict[int, list[tuple[int, int, float]]]:
    """Each neuron's `n` top occurrences from the profile: (window, position, activation)."""
    if not neurons or n == 0 or "topk_values" not in profile.tensors:
        return {neuron: [] for neuron in neurons}
    values = profile.numpy("topk_values")[neurons, :n]  # [m, c]
    window, position = (a[neurons, :n] for a in profile.topk_window_and_pos())  # [m, c] each
    finite = np.isfinite(values)  # fewer occurrences than k in the corpus leave NaN
    return {
        neuron: [(int(window[j, r]), int(position[j, r]), float(values[j, r])) for r in np.flatnonzero(finite[j])]
        for j, neuron in enumerate(neurons)
    }


def search_windows(ids, profile, neuron: int, n: int, seed: tuple[int, ...]) -> tuple[list[int], str]:
    """Up to `n` windows (indices into ids [n_windows, T]) in which to look for the neuron's lowest
    activations, and how they were chosen (see the module docstring)."""
    if "type_mean" not in profile.tensors:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(ids.shape[0], size=min(n, ids.shape[0]), replace=False)
        return sorted(int(w) for w in chosen), "windows drawn at random (this analysis keeps no token-type table)"
    type_ids = profile.numpy("type_ids").astype(np.int64)  # [T]
    means = profile.numpy("type_mean")[:, neuron]  # [T]
    candidates = type_ids[np.argsort(means, kind="stable")[:n]]  # the n lowest-mean types, lowest first
    rank = np.full(int(candidates.max()) + 1, -1, dtype=np.int64)  # token id -> its rank
    rank[candidates] = np.arange(candidates.size)
    window, position = np.nonzero(np.isin(ids, candidates))  # [h] each, every occurrence of a candidate
    by_type = rank[np.asarray(ids[window, position], dtype=np.int64)]  # [h]
    order = np.lexsort((window, by_type))  # by type rank, then window
    window, by_type = window[order], by_type[order]
    starts = np.flatnonzero(np.r_[True, by_type[1:] != by_type[:-1]])  # [types found]
    chosen: list[int] = []
    for start, end in zip(starts, [*starts[1:], by_type.size], strict=True):
        free = [int(w) for w in np.unique(window[start:end]) if w not in chosen]
        if free:  # one window per type: its first that no lower type took
            chosen.append(free[0])
    return chosen, f"one window for each of its {candidates.size} lowest-mean token types"
