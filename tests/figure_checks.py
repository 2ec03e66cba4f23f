"""What every figure of a report must be: closed (no pyplot leak across a run's many figures),
carrying its data, and a PNG of non-trivial size."""

from __future__ import annotations

from io import BytesIO

from matplotlib import pyplot as plt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_closed_png_with_data(fig, name: str, title: str, min_bytes: int = 10_000) -> None:
    assert fig.number not in plt.get_fignums(), name
    assert isinstance(fig.intraneuron_data, dict), name
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    png = buffer.getvalue()
    assert png.startswith(PNG_MAGIC), name
    assert len(png) > min_bytes, (name, len(png))
    assert title in fig.get_suptitle(), name
