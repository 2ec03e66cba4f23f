"""Logging into one MLflow run by id: metrics in batches, params, tags, Parquet tables, figures, text.

Design choices (why):
- One run per Hydra job, with per-layer things under a layer prefix (``run.for_layer(l)``), not a
  nested run per layer. A multirun already nests jobs under the sweep's parent run; a third level
  makes the UI tree deep, and flat keys such as ``layer_3/frac_core`` can be compared across the
  sweep's runs as columns and charts.
- Everything goes through ``MlflowClient`` with an explicit run id, never the fluent active run:
  no global state that a later job in the same process (basic launcher, reused joblib worker)
  could nest under by mistake, and no ``MLFLOW_RUN_ID`` environment variable to hijack it.
- Non-finite metric values are logged, not skipped: NaN round-trips as NaN and says "undefined"
  (e.g. a correlation with a constant series) where a missing key would say "not computed".
  SQL stores clamp +-inf to +-1.797e308.
- Tables are Parquet artifacts, not ``mlflow.log_table``, which breaks after about 100 tables per run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from intraneuron.reports.artifacts import layer_prefix
from intraneuron.tracking.params import mlflow_params, mlflow_tags


class RunLogger:
    """Logs into one MLflow run by id. `for_layer(l)` gives a view that prefixes keys with the layer's prefix."""

    def __init__(self, client: MlflowClient, run_id: str, prefix: str = ""):
        self.client = client
        self.run_id = run_id
        self.prefix = prefix

    def for_layer(self, layer: int) -> RunLogger:
        """The same run, with metric keys, tags and artifact paths under the layer's prefix ("layer_3/")."""
        return RunLogger(self.client, self.run_id, self.prefix + layer_prefix(layer))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log many metrics in few requests (MlflowClient.log_batch, <= 1000 per request).

        Every value is converted before the first request, so a bad one logs nothing.
        """
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"metric {self.prefix}{key!s} must be a number, got {type(value).__name__}: {value!r}"
                ) from None
        now = get_current_time_millis()
        entries = [Metric(self.prefix + str(k), v, now, step or 0) for k, v in values.items()]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten, stringify and log params. MLflow params are immutable: re-logging a changed value raises."""
        entries = [Param(self.prefix + k, v) for k, v in mlflow_params(params).items()]
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are stringified and truncated to MLflow's limit."""
        entries = [RunTag(self.prefix + k, v) for k, v in mlflow_tags(tags).items()]
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_table(self, df: Any, artifact_path: str) -> None:
        """Store a DataFrame as a Parquet artifact."""
        if not artifact_path.endswith(".parquet"):
            raise ValueError(f"log_table artifact_path must end with .parquet, got {artifact_path!r}")
        folder, name = self._split(artifact_path)
        with tempfile.TemporaryDirectory(prefix="intraneuron-table-") as tmp:
            local = Path(tmp) / name
            df.to_parquet(local, engine="pyarrow")
            self.client.log_artifact(self.run_id, str(local), artifact_path=folder)

    def log_figure(self, fig: Any, artifact_path: str) -> None:
        """Store a matplotlib or plotly figure (format from the file extension)."""
        self.client.log_figure(self.run_id, fig, self.prefix + artifact_path)

    def log_dict(self, d: Mapping[str, Any], artifact_path: str) -> None:
        """Store a dict as JSON or YAML (from the file extension)."""
        self.client.log_dict(self.run_id, dict(d), self.prefix + artifact_path)

    def log_text(self, text: str, artifact_path: str) -> None:
        self.client.log_text(self.run_id, text, self.prefix + artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        """Copy a local file or directory into the run, under `artifact_dir`."""
        folder = self.prefix + artifact_dir if artifact_dir else (self.prefix.rstrip("/") or None)
        self.client.log_artifact(self.run_id, str(local_path), artifact_path=folder)

    def _split(self, artifact_path: str) -> tuple[str | None, str]:
        full = self.prefix + artifact_path.lstrip("/")
        folder, _, name = full.rpartition("/")
        return (folder or None), name
