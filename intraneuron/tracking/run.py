"""One MLflow run per job: open it, log into it, and close it with the status the job really had.

Design choices (why):
- One run per Hydra job, with per-layer things under a ``layer_{l}/`` prefix (``run.for_layer(l)``),
  not a nested run per layer. A multirun already nests jobs under the sweep's parent run; a third
  level makes the UI tree deep, and flat keys such as ``layer_3/frac_core`` can be compared
  across the sweep's runs as columns and charts.
- Everything goes through ``MlflowClient`` with an explicit run id, never the fluent active run:
  no global state that a later job in the same process (basic launcher, reused joblib worker)
  could nest under by mistake, and no ``MLFLOW_RUN_ID`` environment variable to hijack it.
- Non-finite metric values are logged, not skipped: NaN round-trips as NaN and says "undefined"
  (e.g. a correlation of a constant neuron) where a missing key would say "not computed".
  SQL stores clamp +-inf to +-1.797e308.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from intraneuron.errors import ConfigError
from intraneuron.tracking.params import mlflow_params, mlflow_tags, truncate

log = logging.getLogger(__name__)

PARENT_RUN_ID_FILE = "mlflow_parent_run_id"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG_LENGTH = 1000  # the full traceback goes to error.txt; the tag only has to read well in the UI
_SERVER_SCHEMES = "sqlite:///<path>, postgresql://, mysql://, http(s):// of an `mlflow server`, databricks"

R = TypeVar("R")


@dataclass
class TrackingConfig:
    """Where runs go. Relative sqlite paths are resolved against the directory the command ran in."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "intraneuron"
    artifact_root: str | None = None  # default: <dir of the sqlite db>/artifacts (absolute); server default otherwise

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], key: str = "tracking") -> TrackingConfig:
        """Build from a config node, rejecting unknown keys by name."""
        allowed = [f.name for f in fields(cls)]
        for name in node:
            if name not in allowed:
                raise ConfigError(f"{key}.{name}", node[name], f"one of the keys {', '.join(allowed)}")
        return cls(**{name: node[name] for name in node})


@dataclass(frozen=True)
class ResolvedTracking:
    """A TrackingConfig with every path made absolute."""

    tracking_uri: str
    experiment: str
    artifact_location: str | None


def resolve(tcfg: TrackingConfig, base_dir: Path) -> ResolvedTracking:
    """Check the URI and make sqlite and artifact paths absolute (jobs may run in another cwd)."""
    uri = str(tcfg.tracking_uri)
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a bare path, file:// or a Windows drive letter
        raise ConfigError(
            "tracking.tracking_uri", uri,
            f"a database or server URI ({_SERVER_SCHEMES}); MLflow 3 refuses the file store",
        )
    if not str(tcfg.experiment).strip():
        raise ConfigError("tracking.experiment", tcfg.experiment, "a non-empty experiment name")

    artifact_root: str | None = None
    if scheme == "sqlite":
        db_path = uri.removeprefix("sqlite:///")
        if db_path == uri or db_path in ("", ":memory:"):
            raise ConfigError(
                "tracking.tracking_uri", uri,
                "sqlite:///<file> (an in-memory database is invisible to the other jobs of a sweep)",
            )
        db_file = (base_dir / db_path).resolve()
        db_file.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db_file}"
        artifact_root = str(db_file.parent / "artifacts")
    if tcfg.artifact_root is not None:
        root = str(tcfg.artifact_root)
        has_scheme = len(urlparse(root).scheme) > 1
        artifact_root = root if has_scheme else str((base_dir / root).resolve())
    location = None
    if artifact_root is not None:
        location = f"{artifact_root.rstrip('/')}/{_safe_dir_name(str(tcfg.experiment))}"
    return ResolvedTracking(uri, str(tcfg.experiment), location)


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name)


def open_experiment(tcfg: TrackingConfig, base_dir: Path) -> tuple[MlflowClient, str]:
    """Connect and return (client, experiment id), creating the experiment with an absolute artifact location.

    The first connection to a new sqlite file creates its tables (several seconds): a sweep does
    it once in its callback, before parallel jobs could race on the migration.
    """
    resolved = resolve(tcfg, base_dir)
    client = MlflowClient(tracking_uri=resolved.tracking_uri)
    experiment = client.get_experiment_by_name(resolved.experiment)
    if experiment is None:
        try:
            return client, client.create_experiment(
                resolved.experiment, artifact_location=resolved.artifact_location
            )
        except MlflowException as exc:  # another process created it between our two calls
            experiment = client.get_experiment_by_name(resolved.experiment)
            if experiment is None:
                raise exc
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            "tracking.experiment", resolved.experiment,
            f"an experiment that is not deleted (restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}` or choose another name)",
        )
    return client, experiment.experiment_id


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit checked out at `path` (default: this package's source), or None outside git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and sha else None


def source_tags() -> dict[str, str]:
    """The tags MLflow's UI shows for where a run came from: script, user, git commit."""
    tags = {"mlflow.source.name": sys.argv[0] or "python"}
    user = os.environ.get("USER") or os.environ.get("USERNAME")
    if user:
        tags["mlflow.user"] = user
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


@dataclass(frozen=True)
class HydraJob:
    """What a run needs to know about the Hydra job it belongs to."""

    multirun: bool
    original_cwd: Path
    sweep_dir: Path | None  # absolute; only in a multirun
    job_num: int | None  # only in a multirun
    name: str
    overrides: list[str]
    swept_overrides: list[str]  # the overrides that differ between the jobs of a sweep (all, outside one)
    output_dir: str
    choices: dict[str, str]

    def parent_run_id(self) -> str | None:
        """The sweep's parent run id written by MlflowSweepCallback, if any."""
        if self.sweep_dir is None:
            return None
        marker = self.sweep_dir / PARENT_RUN_ID_FILE
        return marker.read_text().strip() if marker.is_file() else None

    def tags(self) -> dict[str, str]:
        tags = {"hydra.overrides": " ".join(self.overrides), "hydra.output_dir": self.output_dir}
        if self.job_num is not None:
            tags["hydra.job_num"] = str(self.job_num)
        tags.update({f"hydra.choice.{group}": str(option) for group, option in self.choices.items()})
        return tags


def current_hydra_job() -> HydraJob | None:
    """The running Hydra job, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    original_cwd = Path(hc.runtime.cwd)
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {
        str(group): str(option)
        for group, option in (hc.runtime.choices or {}).items()
        if not str(group).startswith("hydra/") and option is not None
    }
    sweep_dir = (original_cwd / str(hc.sweep.dir)).resolve() if multirun else None
    overrides = [str(o) for o in hc.overrides.task]
    shared = _sweep_wide_overrides(sweep_dir) if sweep_dir is not None else set()
    return HydraJob(
        multirun=multirun,
        original_cwd=original_cwd,
        sweep_dir=sweep_dir,
        job_num=int(hc.job.num) if multirun else None,
        name=str(hc.job.name),
        overrides=overrides,
        swept_overrides=[o for o in overrides if o.replace("\\", "") not in shared],
        output_dir=str(hc.runtime.output_dir),
        choices=choices,
    )


def _sweep_wide_overrides(sweep_dir: Path) -> set[str]:
    """Overrides given to the whole sweep verbatim (not swept), from the sweeper's multirun.yaml."""
    from omegaconf import OmegaConf

    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return set()
    task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=None)
    # Hydra escapes some characters in a job's overrides ("sqlite\\:///") but not in the saved sweep's
    return {str(o).replace("\\", "") for o in task} if task is not None else set()


class RunLogger:
    """Logs into one MLflow run by id. `for_layer(l)` gives a view that prefixes keys with "layer_{l}/"."""

    def __init__(self, client: MlflowClient, run_id: str, prefix: str = ""):
        self.client = client
        self.run_id = run_id
        self.prefix = prefix

    def for_layer(self, layer: int) -> RunLogger:
        """The same run, with metric keys, tags and artifact paths under "layer_{layer}/"."""
        return RunLogger(self.client, self.run_id, f"{self.prefix}layer_{int(layer)}/")

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log many metrics in few requests (MlflowClient.log_batch, <= 1000 per request)."""
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
        """Store a DataFrame as a Parquet artifact (scales to any number of tables, unlike mlflow.log_table)."""
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


def record_failure(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Tag `error` (short) and artifact error.txt (full traceback); never raises over the real error."""
    try:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        client.set_tag(run_id, "error", truncate(message, ERROR_TAG_LENGTH))
        client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
    except Exception:  # the store itself may be the failure; keep the job's own exception visible
        log.warning("could not record the failure of run %s in MLflow", run_id, exc_info=True)


def _end_run(client: MlflowClient, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status=status)
    except Exception:
        log.warning("could not mark run %s as %s in MLflow", run_id, status, exc_info=True)


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


@contextmanager
def tracked_run(
    tcfg: TrackingConfig,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
) -> Iterator[RunLogger]:
    """Open a run, yield its RunLogger, and end it FINISHED, FAILED (error logged) or KILLED (Ctrl-C).

    Inside a Hydra multirun the run is a child of the sweep's parent run (id read from
    `<sweep dir>/mlflow_parent_run_id`); elsewhere it is a top-level run. Exceptions propagate.
    """
    job = current_hydra_job()
    client, experiment_id = open_experiment(tcfg, job.original_cwd if job else Path.cwd())

    run_tags: dict[str, Any] = source_tags()
    if job is not None:
        run_tags.update(job.tags())
        parent = job.parent_run_id() if job.multirun else None
        if job.multirun and parent is None:
            log.warning(
                "multirun job without %s in %s: is the mlflow_sweep callback configured? "
                "Logging a top-level run.", PARENT_RUN_ID_FILE, job.sweep_dir,
            )
        if parent is not None:
            run_tags[PARENT_TAG] = parent
    run_tags.update(tags or {})

    run_id = client.create_run(experiment_id, run_name=run_name, tags=mlflow_tags(run_tags)).info.run_id
    logger = RunLogger(client, run_id)
    try:
        logger.log_params(params or {})
        if config_dict is not None:
            logger.log_text(_yaml(dict(config_dict)), "config/composed.yaml")
        if overrides is not None:
            logger.log_text(_yaml([str(o) for o in overrides]), "config/overrides.yaml")
        yield logger
    except KeyboardInterrupt as exc:
        record_failure(client, run_id, exc)
        _end_run(client, run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        record_failure(client, run_id, exc)
        _end_run(client, run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    _end_run(client, run_id, RunStatus.to_string(RunStatus.FINISHED))


class TaskFailed(RuntimeError):
    """Stands in for a job exception that cannot be pickled back from a worker process (joblib)."""


def transportable(exc: BaseException) -> BaseException:
    """`exc` itself if it survives a pickle round trip, else a TaskFailed carrying its message.

    Hydra's joblib launcher pickles the exception back to the main process inside JobReturn; one
    that cannot be rebuilt (e.g. an __init__ with extra required arguments) breaks the whole
    joblib.Parallel call instead of failing one job.
    """
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TaskFailed(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")


def tracked_task(
    *,
    param_keys: Sequence[str] = (),
    tracking_key: str = "tracking",
    run_name: Callable[[Any], str] | None = None,
) -> Callable[[Callable[[Any, RunLogger], R]], Callable[[Any], R]]:
    """Decorate a Hydra task `fn(cfg, run: RunLogger)` so that each job is one tracked MLflow run.

        @hydra.main(config_path="conf", config_name="config", version_base="1.3")
        @tracked_task(param_keys=["model", "data", "analysis"])
        def main(cfg, run): ...

    - `cfg[tracking_key]` is the TrackingConfig; `param_keys` are the config keys (groups or dotted
      leaves) logged as flattened params; the whole resolved config and the overrides go as artifacts.
    - Run name: `run_name(cfg)`, else the job's own overrides ("layer=3 model=gpt2"; in a sweep only
      those that vary between jobs), else the Hydra job name.
    - A job that raises is recorded FAILED and the exception propagates: Hydra stores it in the job's
      JobReturn, the launcher (basic or joblib) still runs the other jobs, and the command exits 1 with
      "Error executing job with overrides: [...]". An exception that cannot be pickled is re-raised
      as TaskFailed so that joblib can carry it back.
    """

    def decorate(fn: Callable[[Any, RunLogger], R]) -> Callable[[Any], R]:
        @functools.wraps(fn)
        def task(cfg: Any) -> R:
            from omegaconf import OmegaConf

            node = OmegaConf.select(cfg, tracking_key)
            if node is None:
                raise ConfigError(tracking_key, None, "a tracking config group (e.g. tracking: mlflow)")
            tcfg = TrackingConfig.from_mapping(OmegaConf.to_container(node, resolve=True), tracking_key)
            params = {key: _select(cfg, key) for key in param_keys}
            job = current_hydra_job()
            if run_name is not None:
                name = run_name(cfg)
            else:
                name = (" ".join(job.swept_overrides) or job.name) if job else fn.__name__
            try:
                with tracked_run(
                    tcfg,
                    run_name=name,
                    params=params,
                    tags={},
                    config_dict=OmegaConf.to_container(cfg, resolve=True),
                    overrides=job.overrides if job else None,
                ) as run:
                    return fn(cfg, run)
            except Exception as exc:
                carried = transportable(exc)
                if carried is exc:
                    raise
                raise carried from exc

        return task

    return decorate


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import Container, OmegaConf

    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing:
        raise ConfigError("param_keys", key, "keys that exist in the composed config")
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
