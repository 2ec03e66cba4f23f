"""Runs side by side: one row per run, the params that differ between them, every headline metric.

A table's columns follow one convention, which `write_summary` relies on: `run_name`, `run_id`,
`status`, then the params that differ between the runs (values as MLflow stores them, strings;
missing where a run does not have the key), then the headline metrics `L<l>/<name>` (NaN where a
run did not log one, e.g. a FAILED job). Figures plot each headline metric against each param;
params that split the runs exactly like an earlier one (the keys of one config group swapped
together, e.g. a clusterer's class and its own options) share its figures.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from intraneuron.errors import ConfigError, NotFound
from intraneuron.reports.artifacts import HEADLINE_TAG

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

RUN_COLUMNS = ("run_name", "run_id", "status")
PARENT_TAG = "mlflow.parentRunId"
MAX_FIGURES = 24  # beyond this a summary page stops being read; the CSV keeps every number
UNSET = "(unset)"  # category of a run that does not have the param at all
_HEADLINE = re.compile(r"^L(\d+)/(.+)$")
RUN_ID_FORM = ("an MLflow run id: a letter or digit, then up to 255 letters, digits, _ or - "
               "(`intraneuron compare <experiment>` lists them)")  # fmt: skip


def sweep_table(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """The child runs of a sweep's parent run, ordered by Hydra job number."""
    parent = get_run(client, parent_run_id)
    runs = _search(client, parent.info.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    runs.sort(key=lambda r: (_job_num(r), r.info.start_time or 0))
    return runs_table(runs)


def experiment_table(client: MlflowClient, experiment_id_or_name: str) -> pd.DataFrame:
    """Every run of an experiment that logged headline metrics (parents have none), newest first."""
    experiment = find_experiment(client, experiment_id_or_name)
    if experiment is None:
        raise NotFound(f"no experiment {experiment_id_or_name!r} in {client.tracking_uri}")
    runs = _search(client, experiment.experiment_id, "", order_by=["attributes.start_time DESC"])
    return runs_table([r for r in runs if HEADLINE_TAG in r.data.tags])


def find_experiment(client: MlflowClient, id_or_name: str):
    """An experiment by name, else by id; None if neither exists."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(id_or_name)
    if experiment is None and id_or_name.isdigit():
        try:
            experiment = client.get_experiment(id_or_name)
        except MlflowException:
            return None
    return experiment


def runs_table(runs: list) -> pd.DataFrame:
    """The comparison table of MLflow runs, in the order given."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.data.params))
    swept = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    rows = [
        {"run_name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status,
         **{k: r.data.params.get(k) for k in swept},
         **{k: v for k, v in r.data.metrics.items() if _is_headline(k, r)}}
        for r in runs
    ]  # fmt: skip
    metrics = _order_metrics({k for row in rows for k in row if _HEADLINE.match(k)}, runs)
    table = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *swept, *metrics])
    table[metrics] = table[metrics].astype(float)
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if _HEADLINE.match(str(c))]


def split_metric(column: str) -> tuple[int, str]:
    """A headline metric column's layer and label: "L0/differentiated_frac" -> (0, "differentiated_frac")."""
    layer, name = _HEADLINE.match(column).groups()
    return int(layer), name


def param_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in RUN_COLUMNS and not _HEADLINE.match(str(c))]


def sweep_figures(table: pd.DataFrame, max_figures: int = MAX_FIGURES) -> tuple[dict[str, Figure], list[str]]:
    """Each headline metric against each param with a split of its own: file name -> figure, and
    what was left out (in words). Each figure carries its points as `fig.intraneuron_data`."""
    axes, aliases = plotted_params(table)
    figures: dict[str, Figure] = {}
    left_out = [f"{alias} (splits the runs as {param})" for alias, param in aliases.items()]
    for metric in metric_columns(table):
        for param in axes:
            if not table[metric].notna().any():
                left_out.append(f"{metric} (no run has a value)")
                break
            if table[metric].dropna().nunique() == 1 and len(table) > 1:  # a flat line says nothing
                left_out.append(f"{metric} (the same in every run: {format_value(table[metric].dropna().iloc[0])})")
                break
            if len(figures) == max_figures:
                left_out.append(f"{metric} vs {param} (over {max_figures} figures)")
                continue
            name = _unique(f"{file_safe(metric)}_vs_{file_safe(param)}.png", figures)
            figures[name] = _metric_figure(table, metric, param)
    return figures, left_out


def plotted_params(table: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The params that get figures, and each other param -> the plotted one splitting runs alike."""
    groups: dict[tuple, list[str]] = {}
    for param in param_columns(table):
        codes, _ = pd.factorize(table[param].fillna(UNSET))
        if len(set(codes)) > 1:
            groups.setdefault(tuple(codes), []).append(param)
    axes, aliases = [], {}
    for members in groups.values():
        best = min(members, key=lambda p: (int(table[p].isna().sum()), members.index(p)))
        axes.append(best)
        aliases.update({p: best for p in members if p != best})
    return axes, aliases


def write_summary(table: pd.DataFrame, out_dir: str | Path, title: str) -> list[Path]:
    """summary.csv, summary.html (self-contained, figures inline) and one PNG per figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "summary.csv"
    table.to_csv(csv, index=False)
    figures, left_out = sweep_figures(table)
    pngs = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=100)
        pngs.append(out / name)
    page = out / "summary.html"
    page.write_text(_html(table, title, pngs, left_out), encoding="utf-8")
    return [csv, page, *pngs]


def summarise_sweep(client: MlflowClient, parent_run_id: str, out_dir: str | Path) -> list[Path]:
    """Write a sweep's summary to `out_dir` (a folder of its own: all of it is logged) and log it to
    the parent run under `sweep_summary/`."""
    parent = get_run(client, parent_run_id)
    overrides = parent.data.params.get("sweep.overrides", "")
    title = f"Sweep {parent.info.run_name}" + (f": {overrides}" if overrides else "")
    paths = write_summary(sweep_table(client, parent_run_id), out_dir, title)
    client.log_artifacts(parent_run_id, str(out_dir), "sweep_summary")
    return paths


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


def format_value(value: Any) -> str:
    """A cell as text: numbers to 3 significant digits, missing as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def get_run(client: MlflowClient, run_id: str, argument: str = "run_id"):
    """client.get_run, with NotFound for an id the store does not have, and a ConfigError naming
    `argument` for a value that is no run id at all ('', a path, a quote: MLflow's own check)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"no run {run_id!r} in {client.tracking_uri}") from None
        if error.error_code == "INVALID_PARAMETER_VALUE":
            raise ConfigError(argument, run_id, RUN_ID_FORM) from None
        raise


def _search(client: MlflowClient, experiment_id: str, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _is_headline(metric: str, run) -> bool:
    """An `L<l>/<name>` metric whose name the run's analysis declared a headline (its tag): not the
    companions logged beside them (a headline's pseudo-neurons' value, excess and interval)."""
    if not (match := _HEADLINE.match(metric)):
        return False
    declared = run.data.tags.get(HEADLINE_TAG)
    return declared is None or match.group(2) in declared.split(",")


def _job_num(run) -> int:
    text = run.data.tags.get("hydra.job_num", "")
    return int(text) if text.isdigit() else 1 << 30


def _order_metrics(metrics: set[str], runs: list) -> list[str]:
    """By layer, then in the analysis's own headline order, then by name."""
    order: dict[str, int] = {}
    for run in runs:
        for name in run.data.tags.get(HEADLINE_TAG, "").split(","):
            order.setdefault(name, len(order))

    def key(metric: str):
        layer, name = split_metric(metric)
        return layer, order.get(name, len(order)), name

    return sorted(metrics, key=key)


def _numeric(values: pd.Series) -> pd.Series | None:
    """The param's values as numbers, or None if any is missing or not a number."""
    numbers = pd.to_numeric(values, errors="coerce")
    return None if numbers.isna().any() else numbers.astype(float)


def _metric_figure(table: pd.DataFrame, metric: str, param: str) -> Figure:
    from matplotlib.figure import Figure

    rows = table[table[metric].notna()]
    y = rows[metric].astype(float)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    numbers = _numeric(table[param])
    if numbers is not None:
        x = numbers[rows.index]
        means = y.groupby(x).mean()
        ax.plot(means.index, means.values, color="0.6", zorder=1, label="mean")
        ax.scatter(x, y, zorder=2)
        data = {"x": x.tolist()}
    else:
        labels = rows[param].fillna(UNSET).astype(str)
        categories = list(dict.fromkeys(table[param].fillna(UNSET).astype(str)))
        ax.scatter([categories.index(v) for v in labels], y, zorder=2)
        ax.set_xticks(range(len(categories)), [_short(c) for c in categories],
                      rotation=20 if len(categories) > 3 else 0, ha="right" if len(categories) > 3 else "center")  # fmt: skip
        ax.set_xlim(-0.5, len(categories) - 0.5)
        data = {"x": labels.tolist(), "categories": categories}
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    # axis labels name the metric and the parameter; a long title would only be cut off
    ax.set_title(f"{len(rows)} of {len(table)} runs", fontsize=10)
    ax.grid(alpha=0.3)
    figure.intraneuron_data = {"metric": metric, "param": param, "numeric": numbers is not None,
                               "run_id": rows["run_id"].tolist(), "y": y.tolist(), **data}  # fmt: skip
    return figure


def _short(label: str, width: int = 24) -> str:
    """A class path by its class name, any label cut to `width` (the full text is in the table)."""
    if re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Z]\w*", label):
        label = label.rsplit(".", 1)[1]
    return label if len(label) <= width else label[: width - 1] + "…"


def _unique(name: str, taken: dict) -> str:
    stem, n = name.removesuffix(".png"), 2
    while name in taken:
        name, n = f"{stem}_{n}.png", n + 1
    return name


_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.FAILED,tr.KILLED{color:#a00}figure{display:inline-block;margin:.5em}img{max-width:640px}
.wrap{overflow-x:auto}"""


def _html(table: pd.DataFrame, title: str, pngs: list[Path], left_out: list[str]) -> str:
    esc = html.escape
    metrics = set(metric_columns(table))
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    body = []
    for row in table.itertuples(index=False):
        cells = "".join(
            f'<td class="n">{esc(format_value(v))}</td>' if c in metrics else f"<td>{esc(format_value(v))}</td>"
            for c, v in zip(table.columns, row, strict=True)
        )
        body.append(f'<tr class="{esc(str(row[2]))}">{cells}</tr>')
    figures = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{esc(p.name)}</figcaption></figure>'
        for p in pngs
    )
    params = ", ".join(param_columns(table)) or "none"
    notes = "".join(f"<li>{esc(item)}</li>" for item in left_out)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
        f"<p>{len(table)} runs. Params that differ between them: {esc(params)}. "
        "Numbers to 3 significant digits; summary.csv has them in full.</p>\n"
        f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>\n<h2>Headline metrics by param</h2>\n"
        + (figures or "<p>No figures: no param differs between the runs, or no metric was logged.</p>")
        + (f"\n<h3>Not plotted</h3><ul>{notes}</ul>" if notes else "")
        + "\n</body></html>\n"
    )
