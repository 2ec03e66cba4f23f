"""Neuron cards: which neurons of a layer get one (`report` group) and what each card holds.

A card puts together what the analysis sees of the neuron (`Analysis.neuron_view`: its tokens by
category, a one-line summary of them, why they differ from the top contexts, its figures), the
neuron's row of the layer's neurons table, its activation density and histogram from the streaming
pass, the tokens its output promotes and suppresses through the unembedding (`logit_tokens`), and
its top and lowest activating contexts, every token shaded by the neuron's activation
(`reports.contexts`: the model is re-run on the handful of windows shown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from intraneuron.reports.contexts import Context, card_contexts
from intraneuron.reports.figure_titles import heading, png, stamp
from intraneuron.reports.logit_tokens import LogitTokens, logit_tokens

__all__ = ["Context", "NeuronCard", "build_cards", "category_summary", "select_neurons"]
HISTOGRAM_FIGURE = "histogram"


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
    summary: str = ""  # one line on its token groups (category_summary)
    contrast: str = ""  # why its tokens differ from its top contexts
    density: float = math.nan  # share of the corpus's tokens where its activation is > 0
    n_tokens: int = 0  # tokens of the corpus
    logits: LogitTokens | None = None  # what its output promotes and suppresses
    logits_note: str = ""  # why there are none, when there are none
    lowest: list[Context] = field(default_factory=list)  # its lowest activating contexts
    lowest_note: str = ""  # how they were searched


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


def histogram_figure(profile, neuron: int):
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
    fig.suptitle(f"activation histogram: {int(counts.sum())} tokens{outside}")
    ax.set(xlabel="activation", ylabel="tokens")
    return fig


def category_summary(groups: dict[str, list[tuple[str, float]]], test: str = "") -> str:
    """One line on token groups: "3 categories; top: 'a' (12 tokens, mean 4.1) vs 'c' (5 tokens,
    mean 1.2); <test>" (the highest and lowest group by mean activation)."""
    means = {title: float(np.mean([a for _, a in tokens])) for title, tokens in groups.items() if tokens}
    if not means:
        return "no tokens"
    ranked = sorted(means, key=lambda title: -means[title])

    def group(title: str) -> str:
        return f"'{title}' ({len(groups[title])} tokens, mean {means[title]:.3g})"

    kind = "categories" if len(ranked) > 1 else "group"
    line = f"{len(ranked)} {kind}; " + (f"top: {group(ranked[0])} vs {group(ranked[-1])}" if len(ranked) > 1
                                      else group(ranked[0]))  # fmt: skip
    return f"{line}; {test}" if test else line


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
    contexts = card_contexts(job, layer, profile, list(selected), report)
    logits, logits_note = logit_tokens(job.handle, layer, list(selected), job.token_texts, report.logit_tokens)
    rows = neurons_table.set_index("neuron", drop=False) if "neuron" in neurons_table else pd.DataFrame()
    top = profile.numpy("topk_values")[:, 0] if "topk_values" in profile.tensors else None  # [D]
    positive = profile.numpy("act_frac_positive") if "act_frac_positive" in profile.tensors else None  # [D]
    setting = analysis.setting(job.run)
    cards = []
    for neuron, reason in selected.items():
        view = analysis.neuron_view(job, layer, profile, neuron)
        figures = dict(view.figures)
        histogram = histogram_figure(profile, neuron)
        if histogram is not None:
            figures[HISTOGRAM_FIGURE] = histogram
        line = heading(job.run.model.name, layer, analysis.name, setting, neuron)
        figures = {name: png(stamp(fig, line)) for name, fig in figures.items()}
        stats = rows.loc[neuron].to_dict() if neuron in rows.index else {}
        missing = {name: analysis.missing_reason(stats, name) for name, value in stats.items() if _is_nan(value)}
        key_stats = list(dict.fromkeys(c for c in (ranking, *analysis.rank_by) if c)) if stats else []
        scale = float(top[neuron]) if top is not None and np.isfinite(top[neuron]) else _max_abs(view.token_groups)
        cards.append(NeuronCard(
            layer=layer, neuron=neuron, reason=reason,
            subtitle=f"{job.run.model.name} · analysis {analysis.name}" + (f" · {setting}" if setting else ""),
            stats=stats, key_stats=key_stats,
            token_groups=view.token_groups, note=view.note, contexts=contexts.top[neuron],
            scale=abs(scale) or 1.0, figures=figures, missing={k: why for k, why in missing.items() if why},
            summary=view.summary or category_summary(view.token_groups), contrast=view.contrast,
            density=float(positive[neuron]) if positive is not None else math.nan, n_tokens=profile.n_tokens,
            logits=logits.get(neuron), logits_note=logits_note,
            lowest=contexts.lowest.get(neuron, []), lowest_note=contexts.lowest_note.get(neuron, ""),
        ))  # fmt: skip
    return cards


def _is_nan(value) -> bool:
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def _max_abs(groups: dict[str, list[tuple[str, float]]]) -> float:
    values = [abs(a) for tokens in groups.values() for _, a in tokens]
    return max(values, default=1.0)
