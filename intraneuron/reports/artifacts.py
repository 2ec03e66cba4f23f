"""The artifact contract: every path and metric key a run writes is spelled here, once.

Writers (the runner, the tracking lifecycle) and readers (tests, studies, reports) both go through
these names, so a table moved or renamed is moved in one place. Kept free of heavy imports: the
tracking layer imports it at start-up.
"""

from __future__ import annotations

COMPOSED_CONFIG = "config/composed.yaml"  # the resolved config of the job
OVERRIDES = "config/overrides.yaml"  # the command-line overrides of the job
ERROR_TEXT = "error.txt"  # full traceback of a failed job


def layer_prefix(layer: int | str) -> str:
    """Prefix of every metric key and artifact of one layer: "layer_3/" ("layer_<l>/" for "<l>")."""
    return f"layer_{layer}/"


def layer_metric(layer: int, name: str) -> str:
    """MLflow key of a layer metric, e.g. layer_metric(0, "bottomup/top_sig_frac") -> "layer_0/bottomup/top_sig_frac"."""
    return layer_prefix(layer) + name


def table_path(layer: int | str, name: str) -> str:
    """Artifact path of a layer's table: "layer_<l>/tables/<name>.parquet"."""
    return f"{layer_prefix(layer)}tables/{name}.parquet"


def figure_path(layer: int, name: str) -> str:
    """Artifact path of a layer's figure: "layer_<l>/figures/<name>.png"."""
    return f"{layer_prefix(layer)}figures/{name}.png"


def log_layer_result(tracker, layer: int, result) -> None:
    """Write one layer's LayerResult: metrics under "layer_<l>/", non-empty tables as Parquet,
    figures as PNG. `tracker` is a tracking.RunLogger."""
    tracker.log_metrics({layer_metric(layer, key): value for key, value in result.metrics.items()})
    for name, table in result.tables.items():
        if len(table):
            tracker.log_table(table, table_path(layer, name))
    for name, figure in result.figures.items():
        tracker.log_figure(figure, figure_path(layer, name))


def load_table(client, run_id: str, layer: int, name: str):
    """A layer's table read back from a run (pandas DataFrame); `client` is an MlflowClient."""
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(
        run_id=run_id, artifact_path=table_path(layer, name), tracking_uri=client.tracking_uri
    )
    return pd.read_parquet(local)


def layer_metrics(run, layer: int) -> dict[str, float]:
    """A layer's metrics of an MLflow Run, without the "layer_<l>/" prefix."""
    prefix = layer_prefix(layer)
    return {key.removeprefix(prefix): value for key, value in run.data.metrics.items() if key.startswith(prefix)}
