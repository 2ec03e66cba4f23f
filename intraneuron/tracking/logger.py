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
- The corpus is a dataset input made of metadata alone (name, digest, source, schema, profile):
  MLflow's Dataset classes would hash or profile the data itself, and the token windows already
  carry a content hash.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from intraneuron.reports.artifacts import layer_prefix
from intraneuron.tracking.params import mlflow_params, mlflow_tags
from intraneuron.tracking.redact import redact
from intraneuron.tracking.ui import run_url

log = logging.getLogger(__name__)

CORPUS_CONTEXT = "extraction"  # what the corpus is used for, shown next to the dataset in the UI
DATASET_INSERT_ATTEMPTS = 3  # a duplicate insert means another run created the row: retry links to it
DIGEST_LENGTH = 16  # hex characters of the content hash kept as the dataset digest (MLflow allows 36)


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

    def log_bytes(self, data: bytes, artifact_path: str) -> None:
        """Store bytes as they are (an image already rendered, so that two copies are identical)."""
        folder, name = self._split(artifact_path)
        with tempfile.TemporaryDirectory(prefix="intraneuron-bytes-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            self.client.log_artifact(self.run_id, str(local), artifact_path=folder)

    def log_dict(self, d: Mapping[str, Any], artifact_path: str) -> None:
        """Store a dict as JSON or YAML (from the file extension)."""
        self.client.log_dict(self.run_id, dict(d), self.prefix + artifact_path)

    def log_text(self, text: str, artifact_path: str) -> None:
        """Store text (a config, a page) with passwords in URIs masked."""
        self.client.log_text(self.run_id, redact(text), self.prefix + artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        """Copy a local file or directory into the run, under `artifact_dir`."""
        folder = self.prefix + artifact_dir if artifact_dir else (self.prefix.rstrip("/") or None)
        self.client.log_artifact(self.run_id, str(local_path), artifact_path=folder)

    def log_corpus_input(
        self,
        name: str,
        digest: str,
        source: str | Path,
        n_tokens: int,
        window_len: int,
        *,
        context: str = CORPUS_CONTEXT,
    ) -> None:
        """Record the corpus as the run's dataset input (the UI's Datasets column and run page).

        `digest` is the token windows' content hash: MLflow keeps one dataset per (name, digest) in
        an experiment, so runs on the same windows share one entry and can be filtered by it. Its
        first DIGEST_LENGTH characters are the dataset's digest; the whole hash is in the profile.
        `source` is where the windows are (a local path or an http(s) URL). The layer prefix
        does not apply: a dataset belongs to the whole run.
        """
        if not digest:
            raise ValueError("log_corpus_input: digest must be a non-empty content hash")
        n_tokens, window_len = int(n_tokens), int(window_len)
        dataset = Dataset(
            name=str(name),
            digest=str(digest)[: min(DIGEST_LENGTH, MAX_DATASET_DIGEST_SIZE)],
            source_type=_source_type(source),
            source=_source_json(source),
            schema=_token_schema(window_len),
            profile=json.dumps({
                "num_tokens": n_tokens,
                "num_windows": n_tokens // window_len if window_len else 0,
                "window_len": window_len,
                "content_hash": str(digest),
            }),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] if context else []
        inputs = [DatasetInput(dataset, tags)]
        # Two jobs of a parallel sweep on the same windows both see "no such dataset" and both insert
        # it; the store's unique key turns the second insert into an IntegrityError and rolls it back.
        # Once the first job has committed, a retry finds its row and links to it.
        for attempt in range(DATASET_INSERT_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as err:
                if not _is_duplicate_insert(err) or attempt == DATASET_INSERT_ATTEMPTS - 1:
                    raise
                log.info("dataset %s was inserted concurrently by another run; linking to it", name)

    def progress_callback(self, key: str = "extraction/progress") -> Callable[[int, int], None]:
        """A callable `(done, total)` that logs `key` = done / total at step `done`, for
        `extract_profiles(..., on_progress=...)`. A failed write is a warning: losing a progress
        point must not end a long pass."""

        def report(done: int, total: int) -> None:
            fraction = done / total if total else 1.0
            try:
                self.log_metrics({key: fraction}, step=int(done))
            except Exception:
                log.warning("could not log %s%s to run %s", self.prefix, key, self.run_id, exc_info=True)

        return report

    def ui_url(self) -> str:
        """The run's page in MLflow's UI, on the model-training side (see `ui.py`)."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return run_url(self.client.tracking_uri, experiment_id, self.run_id)

    def _split(self, artifact_path: str) -> tuple[str | None, str]:
        full = self.prefix + artifact_path.lstrip("/")
        folder, _, name = full.rpartition("/")
        return (folder or None), name


def _is_duplicate_insert(err: MlflowException) -> bool:
    """Whether a store error is a unique-key violation (SQLite, PostgreSQL and MySQL wordings)."""
    text = str(err).lower()
    return any(
        marker in text
        for marker in ("unique constraint failed", "integrityerror", "duplicate key value", "duplicate entry")
    )


def _is_url(source: str | Path) -> bool:
    return not isinstance(source, Path) and urlparse(str(source)).scheme in ("http", "https")


def _source_type(source: str | Path) -> str:
    return "http" if _is_url(source) else "local"


def _source_json(source: str | Path) -> str:
    """The source as MLflow's HTTPDatasetSource / LocalArtifactDatasetSource serialise it, which
    its UI reads back to show the URL or the path."""
    if _is_url(source):
        return json.dumps({"url": str(source)})
    return json.dumps({"uri": str(source)})


def _token_schema(window_len: int) -> str:
    """The windows as MLflow's tensor schema, the way NumpyDataset logs it: uint32 token ids, one
    row of `window_len` per window (the UI shows it as an array dataset)."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    features = Schema([TensorSpec(np.dtype(np.uint32), (-1, window_len), "token_ids")])
    return json.dumps(TensorDatasetSchema(features=features, targets=None).to_dict())
