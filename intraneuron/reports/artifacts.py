"""The artifact contract: every path and metric key a run writes is spelled here, once.

Writers (the runner, the tracking lifecycle) and readers (tests, studies, reports) both go through
these names, so a table moved or renamed is moved in one place. Kept free of heavy imports: the
tracking layer imports it at start-up.

Per layer, a run logs as MLflow metrics only its analysis's headline metrics (`L<l>/<name>`, about
ten, named to be read without the README), so the runs table and Compare show what matters; every
other layer aggregate goes to the layer's `summary` table. Figures sit at the artifact root
(`L<l>_<name>.png`), where MLflow's Compare view shows them side by side across runs, each titled
with the model, layer, analysis and key setting that drew it (`figure_titles`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

COMPOSED_CONFIG = "config/composed.yaml"  # the resolved config of the job
OVERRIDES = "config/overrides.yaml"  # the command-line overrides of the job
ERROR_TEXT = "error.txt"  # full traceback of a failed job
SUMMARY_TABLE = "summary"  # per layer: every aggregate metric of the analysis (metric, value)
HEADLINE_TAG = "intraneuron.headline"  # the analysis's headline metric names, comma-separated
REASON_TAG = "reason."  # + the key of a NaN headline metric ("reason.L0/differentiated_frac"): why
NO_REASON = "the analysis gives no reason"  # a NaN headline whose analysis did not say why
MAIN_HEADLINE_TAG = "intraneuron.headline.main"  # the one the experiment's runs table is sorted by
CARDS_DIR = "cards"  # neuron cards (L<l>_N<n>.html) and their index.html
CARD_INDEX = f"{CARDS_DIR}/index.html"
HTML_TABLES = ("neurons",)  # tables also logged as an HTML page, which the MLflow UI previews


def layer_prefix(layer: int | str) -> str:
    """Folder of a layer's artifacts: "layer_3/" ("layer_<l>/" for "<l>")."""
    return f"layer_{layer}/"


def layer_metric(layer: int | str, name: str) -> str:
    """MLflow key of a layer's headline metric: layer_metric(0, "differentiated_frac") -> "L0/differentiated_frac"."""
    return f"L{layer}/{name}"


def reason_tag(layer: int | str, name: str) -> str:
    """Tag saying why a layer's headline metric is NaN: reason_tag(0, "differentiated_frac") -> "reason.L0/differentiated_frac"."""
    return REASON_TAG + layer_metric(layer, name)


def headline_tags(analysis) -> dict[str, str]:
    """The tags naming an analysis's headline metrics and its main one (the first unless it says)."""
    names = list(analysis.headline)
    return {HEADLINE_TAG: ",".join(names), MAIN_HEADLINE_TAG: analysis.main_headline or names[0]}


def table_path(layer: int | str, name: str) -> str:
    """Artifact path of a layer's table: "layer_<l>/tables/<name>.parquet"."""
    return f"{layer_prefix(layer)}tables/{name}.parquet"


def figure_path(layer: int | str, name: str) -> str:
    """Artifact path of a layer's figure, at the root: "L<l>_<name>.png"."""
    return f"L{layer}_{name}.png"


def table_html_path(layer: int | str, name: str) -> str:
    """Artifact path of a layer's table as HTML: "layer_<l>/tables/<name>.html"."""
    return f"{layer_prefix(layer)}tables/{name}.html"


def run_figure_path(name: str) -> str:
    """Artifact path of a figure across the run's layers, at the root: "<name>.png"."""
    return f"{name}.png"


def neuron_figure_path(layer: int | str, neuron: int, name: str) -> str:
    """Artifact path of a carded neuron's figure, at the root: "L<l>_N<n>_<name>.png"."""
    return f"L{layer}_N{neuron}_{name}.png"


def card_path(layer: int | str, neuron: int) -> str:
    """Artifact path of a neuron's card: "cards/L<l>_N<n>.html"."""
    return f"{CARDS_DIR}/L{layer}_N{neuron}.html"


def figure_heading(run, layers, neuron: int | None = None) -> str:
    """The title line of a run's figures (figure_titles.heading); `run`: the job's RunConfig."""
    from intraneuron.reports.figure_titles import heading

    return heading(run.model.name, layers, run.analysis.name, run.analysis.setting(run), neuron)


def log_figure(tracker, fig, artifact_path: str, heading: str = "") -> None:
    """A matplotlib figure as PNG, `heading` above its own title and the title in its metadata."""
    from intraneuron.reports.figure_titles import png, stamp

    tracker.log_bytes(png(stamp(fig, heading)), artifact_path)


def log_layer_result(tracker, layer: int, result, headline: dict[str, str], companions: Mapping[str, str] | None = None,
                     heading: str = "") -> tuple[dict[str, float], dict[str, str]]:  # fmt: skip
    """Write one layer's LayerResult; return its headline metrics (readable name -> value) and why
    those that are NaN are (readable name -> reason).

    `headline` maps each readable name to its key in `result.metrics`; those are logged as MLflow
    metrics, and the reason of each NaN one as a tag (`reason_tag`); all of `result.metrics` goes
    to the summary table, non-empty tables as Parquet and figures as PNG at the root, titled with
    `heading` (`figure_heading`). `tracker` is a tracking.RunLogger. `companions` (readable name ->
    key) are logged as MLflow metrics too, but neither returned nor given reasons (a headline's null
    value, excess and interval).
    """
    import math

    import pandas as pd

    values = {name: float(result.metrics[key]) for name, key in headline.items() if key in result.metrics}
    reasons = {name: result.reasons.get(headline[name]) or NO_REASON for name, value in values.items() if math.isnan(value)}
    extra = {name: float(result.metrics[key]) for name, key in (companions or {}).items() if key in result.metrics}
    tracker.log_metrics({layer_metric(layer, name): value for name, value in {**values, **extra}.items()})
    if reasons:
        tracker.set_tags({reason_tag(layer, name): reason for name, reason in reasons.items()})
    summary = pd.DataFrame({"metric": list(result.metrics), "value": [float(v) for v in result.metrics.values()]})
    tables = {**result.tables, SUMMARY_TABLE: summary}
    for name, table in tables.items():
        if len(table):
            tracker.log_table(table, table_path(layer, name))
    for name in HTML_TABLES:
        if len(tables.get(name, ())):
            from intraneuron.reports.card_html import render_table

            tracker.log_text(render_table(tables[name], f"Layer {layer}: {name}"), table_html_path(layer, name))
    for name, figure in result.figures.items():
        log_figure(tracker, figure, figure_path(layer, name), heading)
    return values, reasons


def headline_text(values: dict[str, float], reasons: dict[str, str]) -> str:
    """A layer's headline metrics in a line, a NaN one with its reason: "neurons_analysed=94,
    differentiated_frac=nan (no categories: K = 1 for 94 of 94 analysed neurons), ..."."""
    return ", ".join(f"{name}={value:.3g}" + (f" ({reasons[name]})" if name in reasons else "")
                     for name, value in values.items())  # fmt: skip


def log_cards(tracker, cards: list, title: str) -> None:
    """Write neuron cards (reports.cards.NeuronCard), their figures at the root and the index."""
    from intraneuron.reports.card_html import render_card, render_index

    for card in cards:
        tracker.log_text(render_card(card), card_path(card.layer, card.neuron))
        for name, png in card.figures.items():
            tracker.log_bytes(png, neuron_figure_path(card.layer, card.neuron, name))
    if cards:
        layers = sorted({card.layer for card in cards})
        tables = [(layer, f"../{table_html_path(layer, 'neurons')}") for layer in layers]
        subtitle = f"{len(cards)} neuron cards; each opens from disk, with no network"
        tracker.log_text(render_index(cards, title, subtitle, tables), CARD_INDEX)


def load_table(client, run_id: str, layer: int, name: str):
    """A layer's table read back from a run (pandas DataFrame); `client` is an MlflowClient."""
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(
        run_id=run_id, artifact_path=table_path(layer, name), tracking_uri=client.tracking_uri
    )
    return pd.read_parquet(local)


def load_summary(client, run_id: str, layer: int) -> dict[str, float]:
    """Every aggregate metric of one layer of a run (the summary table), as a dict."""
    table = load_table(client, run_id, layer, SUMMARY_TABLE)
    return dict(zip(table["metric"], table["value"].astype(float), strict=True))


def layer_metrics(run, layer: int) -> dict[str, float]:
    """A layer's headline metrics of an MLflow Run and their companions (pseudo value, excess,
    intervals), without the "L<l>/" prefix."""
    prefix = layer_metric(layer, "")
    return {key.removeprefix(prefix): value for key, value in run.data.metrics.items() if key.startswith(prefix)}


@contextlib.contextmanager
def quiet_downloads():
    """No MLflow artifact-download progress bars between a command's printed lines (and in a sweep's log)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
