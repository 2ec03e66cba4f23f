"""Figure titles that say which run drew them: model, layer, analysis and its key setting.

A figure is often seen apart from its run: MLflow's Compare view puts the runs' figures side by
side, a PNG gets copied into a draft. Every figure a run logs gets a first title line such as
"SmolLM2-135M · layer 0 · two_fold · ward, K by gap, top 100 types" above the analysis's own title,
and the whole title as the PNG's Title metadata, which scripts and tests read without OCR.

Files stay at the artifact root (`L<l>_<name>.png`): the Compare view of MLflow 3 (3.17) lists the
files common to the runs' artifact roots only, folders dropped, so figures in per-layer folders
would not be shown there side by side.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable

SEPARATOR = " · "
CHARS_PER_INCH = 10  # of a suptitle at matplotlib's default size (12 pt: about 11 per inch): where a line wraps


def heading(model: str, layers: int | Iterable[int], analysis: str, setting: str = "", neuron: int | None = None) -> str:
    """"<model> · layer <l>[ · neuron <n>] · <analysis>[ · <setting>]" ("layers 0, 3" for several)."""
    if isinstance(layers, int):
        where = f"layer {layers}"
    else:
        layers = list(layers)
        where = f"layer {layers[0]}" if len(layers) == 1 else "layers " + ", ".join(map(str, layers))
    parts = [model, where, *([f"neuron {neuron}"] if neuron is not None else []), analysis, setting]
    return SEPARATOR.join(p for p in parts if p)


def stamp(fig, line: str):
    """Put `line` above the figure's own title (its suptitle; a figure without one gets `line` alone),
    wrapped to the figure's width; the PNG's Title metadata keeps it on one line."""
    if line:
        own = fig.get_suptitle()
        fig.intraneuron_title = f"{line}\n{own}" if own else line
        wrapped = textwrap.fill(line, width=max(20, int(fig.get_figwidth() * CHARS_PER_INCH)))
        fig.suptitle(f"{wrapped}\n{own}" if own else wrapped)
    return fig


def png(fig) -> bytes:
    """The figure as PNG bytes (100 dpi), its title as the PNG's Title metadata."""
    buffer = io.BytesIO()
    title = getattr(fig, "intraneuron_title", None) or fig.get_suptitle()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Title": title} if title else None)
    return buffer.getvalue()


def png_title(data: bytes) -> str:
    """The Title metadata of PNG bytes ("" when it has none)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.info.get("Title", "")
