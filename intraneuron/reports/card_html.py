"""Neuron cards and their index as self-contained HTML: no script, no network, every text escaped.

Jinja2 with autoescaping renders the templates in `templates/`; images are inlined as data URIs and
a Content-Security-Policy forbids any other source, so a card opens from disk, from an MLflow
artifact preview or from an e-mail the same way, and a token such as `<script>` shows as text.
"""

from __future__ import annotations

import base64
import math
from functools import cache

import numpy as np

from intraneuron.reports.cards import NeuronCard

POSITIVE = (214, 39, 40)  # shading of positive activations (red)
NEGATIVE = (31, 119, 180)  # and of negative ones (blue)
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}  # whitespace a reader must see (contexts stay one line)


@cache
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=PackageLoader("intraneuron.reports", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def shade(value: float, scale: float) -> str:
    """CSS colour of an activation: red for positive, blue for negative, opacity |value| / scale."""
    if not math.isfinite(value) or scale <= 0:
        return "transparent"
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    alpha = min(1.0, abs(value) / scale)
    return f"rgba({r},{g},{b},{alpha:.3f})"


def shown(text: str) -> str:
    """A token's text with its invisible characters made visible."""
    return "".join(VISIBLE.get(ch, ch) for ch in text) or "∅"


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def format_stat(value, reason: str = "") -> str:
    """A statistic as text; NaN as "nan" with why, when known (a blank reads as a missing value)."""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return f"nan ({reason})" if reason else "nan"
        return f"{value:.4g}"
    return str(value)


def stat_text(card: NeuronCard, name: str) -> str:
    """A statistic of the card's row, with its interval when the row has <name>_lo and <name>_hi."""
    text = format_stat(card.stats[name], card.missing.get(name, ""))
    lo, hi = card.stats.get(f"{name}_lo"), card.stats.get(f"{name}_hi")
    if isinstance(lo, float | np.floating) and isinstance(hi, float | np.floating) and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:.4g}, {hi:.4g}]"
    return text


def render_card(card: NeuronCard, index_href: str | None = "index.html") -> str:
    """The card's HTML page."""
    scale = card.scale
    groups = [
        {
            "title": title,
            "mean": sum(a for _, a in tokens) / len(tokens) if tokens else math.nan,
            "tokens": [{"text": shown(t), "act": a, "colour": shade(a, scale)} for t, a in tokens],
        }
        for title, tokens in card.token_groups.items()
    ]
    contexts, lowest = _contexts(card.contexts, scale), _contexts(card.lowest, scale)
    bounds = {f"{name}_{end}" for name in card.stats for end in ("lo", "hi")
              if f"{name}_lo" in card.stats and f"{name}_hi" in card.stats}  # fmt: skip
    key = [(name, stat_text(card, name)) for name in card.key_stats if name in card.stats]
    other = [(name, stat_text(card, name)) for name in card.stats if name not in card.key_stats and name not in bounds]
    view = {
        "title": f"L{card.layer} N{card.neuron} · {card.subtitle}",
        "layer": card.layer,
        "neuron": card.neuron,
        "subtitle": card.subtitle,
        "reason": card.reason,
        "key_stats": key,
        "other_stats": other,
        "n_tokens": sum(len(g["tokens"]) for g in groups),
        "scale": scale,
        "note": card.note,
        "summary": card.summary,
        "contrast": card.contrast,
        "density": density_text(card.density, card.n_tokens),
        "logits": _logits(card),
        "logits_note": card.logits_note,
        "groups": groups,
        "contexts": contexts,
        "lowest": lowest,
        "lowest_note": card.lowest_note,
        "figures": [(name, png_uri(png)) for name, png in card.figures.items()],
    }
    return _environment().get_template("card.html").render(card=view, index_href=index_href)


def density_text(density: float, n_tokens: int) -> str:
    """"12.3% of 1,234,567 tokens" ("" when the pass kept no moments)."""
    if not math.isfinite(density):
        return ""
    return f"{density:.1%} of {n_tokens:,} tokens"


def _contexts(contexts, scale: float) -> list[dict]:
    return [
        {
            "activation": context.activation,
            "tokens": [
                {"text": shown(text), "act": act, "colour": shade(act, scale), "focus": i == context.focus}
                for i, (text, act) in enumerate(zip(context.tokens, context.acts, strict=True))
            ],
        }
        for context in contexts
    ]


def _logits(card: NeuronCard) -> dict[str, list[dict]] | None:
    """Promoted and suppressed tokens, shaded by their logit change relative to the largest."""
    if card.logits is None:
        return None
    pairs = {"promoted": card.logits.promoted, "suppressed": card.logits.suppressed}
    scale = max((abs(v) for tokens in pairs.values() for _, v in tokens), default=1.0) or 1.0
    return {side: [{"text": shown(t), "value": v, "colour": shade(v, scale)} for t, v in tokens]
            for side, tokens in pairs.items()}  # fmt: skip


def render_index(cards: list[NeuronCard], title: str, subtitle: str, tables: list[tuple[int, str]]) -> str:
    """The run's card index: one row per card (layer, neuron, why, its key statistics, top tokens)
    linking to `card_file(layer, neuron)`; `tables`: (layer, href) of the HTML per-neuron tables."""
    columns = list(dict.fromkeys(name for card in cards for name in card.key_stats))
    rows = [
        {
            "layer": card.layer,
            "neuron": card.neuron,
            "href": card_file(card.layer, card.neuron),
            "reason": card.reason,
            "cells": [format_stat(card.stats.get(name, "")) for name in columns],
            "preview": " | ".join(t for tokens in card.token_groups.values() for t, _ in tokens[:3])[:120],
        }
        for card in cards
    ]
    template = _environment().get_template("index.html")
    return template.render(title=title, subtitle=subtitle, columns=columns, cards=rows, tables=tables)


def render_table(table, title: str) -> str:
    """A per-neuron table as a standalone HTML page (the MLflow UI previews .html artifacts)."""
    body = table.to_html(index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    return _environment().get_template("table.html").render(title=title, table=body)


def card_file(layer: int, neuron: int) -> str:
    """File name of a card inside the run's cards/ folder."""
    return f"L{layer}_N{neuron}.html"
