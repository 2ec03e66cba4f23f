"""Neuron cards: which neurons of a layer get one (`report` group) and what each card holds.

A card puts together what the analysis sees of the neuron (`Analysis.neuron_view`: its tokens by
category and its figures), the neuron's row of the layer's neurons table, its activation histogram
from the streaming pass and its top activating contexts, every token shaded by the neuron's
activation. The profile keeps only the top-k (position, value) pairs, so the shading comes from
re-running the model on the handful of windows shown (`extraction.contexts`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

HISTOGRAM_FIGURE = "histogram"


@dataclass
class Context:
    """One top activating occurrence with the tokens around it."""

    activation: float  # the neuron's activation at the occurrence (the profile's top-k value)
    window: int
    position: int  # in the window
    tokens: list[str]  # text of the tokens shown
    acts: list[float]  # the neuron's activation at each of them
    focus: int  # index in `tokens` of the occurrence


@dataclass
class NeuronCard:
    layer: int
    neuron: int
    reason: str  # why it was selected: "top 1 by epsilon2 (0.31)", "random", ...
    subtitle: str  # model, analysis
    stats: dict[str, Any]  # its row of the neurons table (empty when it is not in the table)
    key_stats: list[str]  # the columns shown first
    token_groups: dict[str, list[tuple[str, float]]]
    note: str
    contexts: list[Context]
    scale: float  # activation that gets full shading: the neuron's top activation
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG, the analysis's then the histogram
    missing: dict[str, str] = field(default_factory=dict)  # stat -> why it is NaN (Analysis.missing_reason)


def select_neurons(table: pd.DataFrame, report, ranking: str | None, seed: tuple[int, ...] = ()) -> dict[int, str]:
    """neuron -> why it gets a card, in display order: `report.neurons`, the `report.top` ones by
    `ranking` (largest first, NaN never), then `report.random` others of the table drawn with
    (report.seed, *seed)."""
    chosen: dict[int, str] = {int(n): "asked for (report.neurons)" for n in report.neurons}
    if ranking is not None and report.top and len(table) and ranking in table:
        ranked = table[["neuron", ranking]].dropna().sort_values([ranking, "neuron"], ascending=[False, True])
        n_top = 0
        for rank, (neuron, value) in enumerate(ranked.itertuples(index=False), start=1):
            if n_top == report.top:
                break
            if int(neuron) not in chosen:
                chosen[int(neuron)] = f"top {rank} by {ranking} ({value:.3g})"
                n_top += 1
    if report.random and len(table):
        rest = np.array(sorted(set(table["neuron"].astype(int)) - set(chosen)), dtype=np.int64)
        rng = np.random.default_rng((report.seed, *seed))
        for neuron in sorted(rng.choice(rest, size=min(report.random, rest.size), replace=False).tolist()):
            chosen[neuron] = "random"
    return chosen


def top_contexts(job, layer: int, profile, neurons: list[int], n_contexts: int, width: int) -> dict[int, list[Context]]:
    """Each neuron's `n_contexts` top occurrences with `width` tokens either side, from one
    re-run of the model over the union of their windows."""
    from intraneuron.extraction.contexts import window_activations

    if not neurons or n_contexts == 0 or "topk_values" not in profile.tensors:
        return {n: [] for n in neurons}
    values = profile.numpy("topk_values")[neurons, :n_contexts]  # [m, c]
    window, position = (a[neurons, :n_contexts] for a in profile.topk_window_and_pos())  # [m, c] each
    finite = np.isfinite(values)  # fewer occurrences than k in the corpus leave NaN
    needed = np.unique(window[finite])  # [w]
    ids = np.asarray(job.windows.ids[needed], dtype=np.int64)  # [w, T]
    extraction = job.run.extraction
    acts = window_activations(job.handle, ids, layer, extraction.site, np.asarray(neurons),
                              device=extraction.device, batch_size=extraction.batch_size)  # [w, T, m] fmt: skip
    row_of = {int(w): i for i, w in enumerate(needed)}
    texts, T = job.token_texts, ids.shape[1]
    out: dict[int, list[Context]] = {}
    for j, neuron in enumerate(neurons):
        contexts = []
        for r in np.flatnonzero(finite[j]):
            w, p = int(window[j, r]), int(position[j, r])
            lo, hi = max(0, p - width), min(T, p + width + 1)
            i = row_of[w]
            contexts.append(Context(
                activation=float(values[j, r]), window=w, position=p,
                tokens=[texts[t] for t in ids[i, lo:hi]], acts=acts[i, lo:hi, j].astype(float).tolist(),
                focus=p - lo,
            ))  # fmt: skip
        out[neuron] = contexts
    return out


def histogram_png(profile, neuron: int, layer: int) -> bytes | None:
    """The neuron's activation histogram over the corpus (log counts), from the streaming pass."""
    if "hist_counts" not in profile.tensors:
        return None
    edges = profile.numpy("hist_edges").astype(np.float64)  # [B + 1]
    counts = profile.numpy("hist_counts")[neuron].astype(np.float64)  # [B + 2]: under, inner..., over
    inner = counts[1:-1]
    nonzero = np.flatnonzero(inner)
    if nonzero.size == 0:
        return None
    lo, hi = nonzero[0], nonzero[-1] + 1
    fig = _figure()
    ax = fig.subplots()
    ax.stairs(inner[lo:hi], edges[lo : hi + 1], fill=True, color="#555")
    ax.set_yscale("log")
    outside = f"; {int(counts[0])} below, {int(counts[-1])} above the range" if counts[0] or counts[-1] else ""
    ax.set(xlabel="activation", ylabel="tokens", title=f"L{layer} N{neuron}: {int(counts.sum())} tokens{outside}")
    return figure_png(fig)


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(5, 2.8), layout="constrained")


def build_cards(job, analysis, layer: int, profile, neurons_table: pd.DataFrame | None, report) -> list[NeuronCard]:
    """The cards of one layer's selected neurons. `job`, `analysis`: the runner's Job and Analysis;
    neurons_table: the layer's per-neuron table (None: the analysis has none)."""
    if neurons_table is None:
        neurons_table = pd.DataFrame({"neuron": np.arange(profile.d_mlp)})
    ranking = report.ranking(analysis.rank_by)
    selected = select_neurons(neurons_table, report, ranking, seed=(layer,))
    contexts = top_contexts(job, layer, profile, list(selected), report.contexts, report.context_tokens)
    rows = neurons_table.set_index("neuron", drop=False) if "neuron" in neurons_table else pd.DataFrame()
    top = profile.numpy("topk_values")[:, 0] if "topk_values" in profile.tensors else None  # [D]
    cards = []
    for neuron, reason in selected.items():
        view = analysis.neuron_view(job, layer, profile, neuron)
        figures = {name: figure_png(fig) for name, fig in view.figures.items()}
        histogram = histogram_png(profile, neuron, layer)
        if histogram is not None:
            figures[HISTOGRAM_FIGURE] = histogram
        stats = rows.loc[neuron].to_dict() if neuron in rows.index else {}
        missing = {name: analysis.missing_reason(stats, name) for name, value in stats.items() if _is_nan(value)}
        key_stats = list(dict.fromkeys(c for c in (ranking, *analysis.rank_by) if c)) if stats else []
        scale = float(top[neuron]) if top is not None and np.isfinite(top[neuron]) else _max_abs(view.token_groups)
        cards.append(NeuronCard(
            layer=layer, neuron=neuron, reason=reason,
            subtitle=f"{job.run.model.name} · analysis {analysis.name}",
            stats=stats, key_stats=key_stats,
            token_groups=view.token_groups, note=view.note, contexts=contexts[neuron],
            scale=abs(scale) or 1.0, figures=figures, missing={k: why for k, why in missing.items() if why},
        ))  # fmt: skip
    return cards


def _is_nan(value) -> bool:
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def _max_abs(groups: dict[str, list[tuple[str, float]]]) -> float:
    values = [abs(a) for tokens in groups.values() for _, a in tokens]
    return max(values, default=1.0)
