"""One MLflow run per job: open it, hand out its RunLogger, and close it with the status the job really had.

A run is created only after the store has been checked (`store.open_experiment`), so a bad tracking
location fails in one line and leaves no run stuck RUNNING.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from intraneuron.errors import ConfigError, unresolvable
from intraneuron.reports.artifacts import COMPOSED_CONFIG, ERROR_TEXT, OVERRIDES
from intraneuron.tracking.hydra_job import (
    PARENT_RUN_ID_FILE,
    RUN_INFO_FILE,
    HydraJob,
    current_hydra_job,
    launch_dir,
)
from intraneuron.tracking.logger import RunLogger
from intraneuron.tracking.params import mlflow_tags, truncate
from intraneuron.tracking.redact import redact
from intraneuron.tracking.signals import KILLED_RUN_ATTR, sigterm_as_interrupt

# Callers that predate the split import these from here.
from intraneuron.tracking.store import TrackingConfig, open_experiment, resolve  # noqa: F401
from intraneuron.tracking.ui import experiment_url, run_url, ui_base, ui_command
from intraneuron.tracking.view import save_view

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
HOST_TAG = "intraneuron.host"  # with PID_TAG: which process holds a RUNNING run (`intraneuron stale`)
PID_TAG = "intraneuron.pid"
ERROR_TAG_LENGTH = 1000  # the full traceback goes to ERROR_TEXT; the tag only has to read well in the UI

R = TypeVar("R")


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


def process_tags() -> dict[str, str]:
    """This host and process: a run left RUNNING by a process that is gone (SIGKILL, OOM killer,
    power loss) is found by `intraneuron stale` from these."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def record_failure(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Tag `error` (short), put it first in the run's description, and the ERROR_TEXT artifact (full
    traceback), passwords in URIs masked; never raises over the real error.

    The description (`mlflow.note.content`) is what the run page and the runs table's Description
    column (offered under "Columns") show, so a failed run says why without opening its artifacts.
    """
    try:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = truncate(redact(message), ERROR_TAG_LENGTH)
        previous = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
        note = f"{message}\n\n{previous}" if previous and not previous.startswith(message) else message
        client.log_batch(
            run_id,
            tags=[RunTag("error", message), RunTag(MLFLOW_RUN_NOTE, truncate(note, MAX_TAG_VAL_LENGTH))],
        )
        client.log_text(run_id, redact("".join(traceback.format_exception(exc))), ERROR_TEXT)
    except Exception:  # the store itself may be the failure; keep the job's own exception visible
        log.warning("could not record the failure of run %s in MLflow", run_id, exc_info=True)


def _end_run(client: MlflowClient, run_id: str, status: str) -> bool:
    try:
        client.set_terminated(run_id, status=status)
    except Exception:
        log.warning("could not mark run %s as %s in MLflow", run_id, status, exc_info=True)
        return False
    return True


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def start_system_metrics(tcfg: TrackingConfig, tracking_uri: str, run_id: str) -> Any | None:
    """MLflow's own sampler of CPU, memory, disk, network (and NVIDIA GPU with `nvidia-ml-py`) into
    `system/...` metrics of `run_id`, or None when turned off or when it cannot start.

    SystemMetricsMonitor takes the run id and the tracking URI explicitly, so it needs no active
    fluent run. It logs a sample every `tcfg.system_metrics_interval` seconds (the environment
    variable MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins when set) and stops by itself when the
    run is no longer RUNNING; `stop_system_metrics` stops it at once.
    """
    if not tcfg.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        quiet = logging.getLogger("mlflow.system_metrics")
        if quiet.level == logging.NOTSET:  # its start/stop/no-GPU notices would print in every job
            quiet.setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=float(tcfg.system_metrics_interval), tracking_uri=tracking_uri
        )
        monitor.start()
    except Exception:  # a missing sensor or library costs the metrics, not the job
        log.warning("system metrics of run %s are not recorded", run_id, exc_info=True)
        return None
    return monitor


def stop_system_metrics(monitor: Any | None) -> None:
    """Stop the sampler and flush the samples it has aggregated but not yet written; never raises.

    Samples taken since the last full interval are dropped by MLflow's loop, so a job shorter than
    one interval has no system metrics.
    """
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception:
        log.warning("could not stop the system metrics sampler", exc_info=True)


def write_run_info(
    job: HydraJob, client: MlflowClient, experiment_id: str, experiment: str, run_id: str, run_name: str,
    parent_run_id: str | None,
) -> Path | None:
    """`<hydra output dir>/mlflow_run.json`: the run a researcher looking at `outputs/<date>/<time>/`
    is after, with the store to open it in, its page and its experiment's saved view in the UI, and
    the command that serves a database store's UI. A file that cannot be written costs a warning only."""
    uri = redact(client.tracking_uri)
    server = urlparse(uri).scheme in ("http", "https")
    info = {
        "run_id": run_id,
        "run_name": run_name,
        "experiment_id": experiment_id,
        "experiment": experiment,
        "tracking_uri": ui_base(uri) if server else uri,  # a server's address without credentials
        "parent_run_id": parent_run_id,
        "ui_url": run_url(uri, experiment_id, run_id),
        "experiment_url": experiment_url(uri, experiment_id),
    }
    if not server:
        info["ui_command"] = ui_command(uri)
    path = Path(job.output_dir) / RUN_INFO_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")
    except OSError:
        log.warning("could not write %s", path, exc_info=True)
        return None
    return path


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
    """Open a run, yield its RunLogger, and end it FINISHED, FAILED (error logged) or KILLED (Ctrl-C
    or SIGTERM).

    Inside a Hydra multirun the run is a child of the sweep's parent run (id read from
    `<sweep dir>/mlflow_parent_run_id`); elsewhere it is a top-level run. Inside any Hydra job the
    run id is written to `<hydra.runtime.output_dir>/mlflow_run.json`. With `tcfg.system_metrics`
    the machine is sampled into `system/...` metrics until the run ends, whatever its status.
    Relative paths in `tcfg` resolve against the launch directory. Exceptions propagate.
    """
    job = current_hydra_job()
    client, experiment_id = open_experiment(tcfg, launch_dir())

    run_tags: dict[str, Any] = source_tags()
    parent = None
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
    for key, value in process_tags().items():
        run_tags.setdefault(key, value)

    run_name = redact(run_name)  # e.g. the overrides, a tracking URI among them
    run_id = client.create_run(experiment_id, run_name=run_name, tags=mlflow_tags(run_tags)).info.run_id
    logger = RunLogger(client, run_id)
    monitor = None
    status, failure = RunStatus.to_string(RunStatus.FINISHED), None
    with sigterm_as_interrupt():  # a scheduler's cancel or `kill` ends the run KILLED too
        try:
            if job is not None:
                write_run_info(job, client, experiment_id, str(tcfg.experiment), run_id, run_name, parent)
            monitor = start_system_metrics(tcfg, client.tracking_uri, run_id)
            logger.log_params(params or {})
            if config_dict is not None:
                logger.log_text(_yaml(dict(config_dict)), COMPOSED_CONFIG)
            if overrides is not None:
                logger.log_text(_yaml([str(o) for o in overrides]), OVERRIDES)
            yield logger
        except KeyboardInterrupt as exc:
            status, failure = RunStatus.to_string(RunStatus.KILLED), exc
            raise
        except BaseException as exc:
            status, failure = RunStatus.to_string(RunStatus.FAILED), exc
            raise
        finally:
            # the sampler's last samples go in while the run is still RUNNING
            stop_system_metrics(monitor)
            if failure is not None:
                record_failure(client, run_id, failure)
            if _end_run(client, run_id, status) and isinstance(failure, KeyboardInterrupt):
                setattr(failure, KILLED_RUN_ATTR, run_id)  # for the command's last line (`stopped`)
            if not isinstance(failure, KeyboardInterrupt):  # a stop is not held up by the store
                save_view(client, experiment_id)  # the run's headline metrics and params join the view


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
    skipped: Callable[[str], R] | None = None,
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
    - Every run is tagged with its CONFIG_HASH_TAG. With `skipped`, a multirun job whose config
      already FINISHED (see `resume_finished`) is not run: that run is copied under the sweep's
      parent and the task returns `skipped(copy's run id)`.
    """

    def decorate(fn: Callable[[Any, RunLogger], R]) -> Callable[[Any], R]:
        @functools.wraps(fn)
        def task(cfg: Any) -> R:
            from omegaconf import OmegaConf
            from omegaconf.errors import OmegaConfBaseException

            try:  # an interpolation that does not resolve is the user's mistake: one line, no run
                config_dict = OmegaConf.to_container(cfg, resolve=True)
            except OmegaConfBaseException as error:
                raise unresolvable(error) from None
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
            from intraneuron.tracking.resume import CONFIG_HASH_TAG, config_hash, resume_finished

            digest = config_hash(config_dict)
            if skipped is not None and (done := resume_finished(tcfg, digest)) is not None:
                return skipped(done)
            try:
                with tracked_run(
                    tcfg,
                    run_name=name,
                    params=params,
                    tags={CONFIG_HASH_TAG: digest},
                    config_dict=config_dict,
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
        raise ValueError(f"param_keys: {key!r} is not a key of the composed config")
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
