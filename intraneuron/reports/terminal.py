"""`intraneuron compare` in the terminal: a table with one row per run (per run and layer when a
run has several), the params that differ between the runs as columns, then each headline metric
under the label its analysis declares (`Analysis.headline`).

Layers are rows rather than `L<l>/` column prefixes, so a column is one label, printed in full,
and a layer sweep lists each run once. Rich lays the table out. A pipe or a file gets it at its
natural width with every cell on one line (a label or a run is found with grep). A terminal too
narrow for it gets the runs with their params first, then their metrics in as few tables as fit
its width, each label broken at its underscores: a dozen labels side by side need about 200
columns, and squeezing them into fewer would fold every number.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from intraneuron.reports.compare import format_value, metric_columns, param_columns, split_metric

if TYPE_CHECKING:
    import pandas as pd

LABEL_LINE = 12  # characters per header line of a label broken to fit a terminal


def compare_text(table: pd.DataFrame, width: int | None = None) -> str:
    """The comparison table (reports.compare.runs_table) as text: at its natural width when
    `width` is None, else fitted to `width` columns."""
    by_layer: dict[int, dict[str, str]] = {}  # layer -> label -> its metric column
    for column in metric_columns(table):
        layer, label = split_metric(column)
        by_layer.setdefault(layer, {})[label] = column
    labels = list(dict.fromkeys(label for columns in by_layer.values() for label in columns))
    keys = ["run_name", "run_id", "status", *param_columns(table)]
    rows = []  # (run, layer): a run with no metric (FAILED) still gets its row
    for _, run in table.iterrows():
        layers = [layer for layer, columns in by_layer.items() if run[list(columns.values())].notna().any()]
        rows += [(run, by_layer.get(layer, {}), layer) for layer in layers or [None]]
    whole = _grid(rows, keys, labels, one_line=width is None)
    if width is None or _console(None).measure(whole).maximum <= width:
        return _render([whole], width)
    grids = [_grid([(run, {}, None) for _, run in table.iterrows()], keys, [], one_line=False)]
    block: list[str] = []
    for label in labels:  # as many labels beside the run's name as fit
        grid = _grid(rows, ["run_name"], [*block, label], one_line=False, broken=True)
        if block and _console(None).measure(grid).maximum > width:
            grids.append(_grid(rows, ["run_name"], block, one_line=False, broken=True))
            block = []
        block.append(label)
    grids.append(_grid(rows, ["run_name"], block, one_line=False, broken=True))
    return _render(grids, width)


def _grid(rows: list, keys: list[str], labels: list[str], *, one_line: bool, broken: bool = False):
    """A rich Table of `rows` ((run, label -> metric column, layer)): the runs' `keys`, the layer
    when there are labels, and the labels' values. one_line: no cell wraps; broken: labels broken
    at underscores (`_broken`)."""
    from rich import box
    from rich.table import Table

    grid = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for key in keys:
        grid.add_column("run" if key == "run_name" else key, overflow="fold", no_wrap=one_line or key == "status")
    if labels:
        grid.add_column("layer", justify="right", no_wrap=True)
    for label in labels:
        grid.add_column(_broken(label) if broken else label, justify="right", no_wrap=True)
    for run, columns, layer in rows:
        metrics = [format_value(run[columns[label]]) if label in columns else "" for label in labels]
        grid.add_row(*(format_value(run[key]) for key in keys), *(["" if layer is None else str(layer)] if labels else []),
                     *metrics)  # fmt: skip
    return grid


def _console(width: int | None):
    """A console writing to a string; width None: wide enough for any table's natural width (rich
    stops at the table's own width)."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width or 1_000_000, color_system=None, highlight=False, emoji=False)


def _render(grids: list, width: int | None) -> str:
    console = _console(width)
    for i, grid in enumerate(grids):
        if i:
            console.print()
        console.print(grid, crop=False)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _broken(label: str, line: int = LABEL_LINE) -> str:
    """The label on lines of about `line` characters, broken after underscores only:
    "top_minus_rest_homogeneity_median" -> "top_minus_\\nrest_\\nhomogeneity_\\nmedian"."""
    lines = [""]
    for word in label.replace("_", "_\n").splitlines():
        if len(lines[-1]) > 3 and len(lines[-1]) + len(word) > line:  # "no_" stays with its word
            lines.append("")
        lines[-1] += word
    return "\n".join(lines)

