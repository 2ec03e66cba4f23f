"""The parent MLflow run of a Hydra multirun: opened before any job starts, closed with the sweep's outcome.

Wiring (conf/hydra/callbacks/mlflow_sweep.yaml, in the primary config's defaults as
`- override hydra/callbacks: mlflow_sweep`): Hydra calls `on_multirun_start` in the launching process before
the launcher starts. The parent run id is written to `<sweep dir>/mlflow_parent_run_id`, where each
job's `tracked_run` reads it, whatever process or machine the job runs in.

A tracking location that cannot be used, a parent run that cannot be opened, or a sweep folder that
already holds another sweep's RUNNING or FINISHED parent run stops the sweep before any job is
launched (one line on stderr, exit status 1). When a job fails, Hydra's sweeper re-raises its exception after the batch
has run and never calls `on_multirun_end`; an atexit hook then closes the parent as FAILED and
prints which jobs failed. A sweep whose jobs all finished but whose shards could not be merged
(MERGE_ERROR_TAG) ends FAILED too. Ctrl-C or SIGTERM to the launching process (a scheduler
cancelling the sweep) unwinds it as in a job, and the atexit hook ends the parent KILLED, with the
jobs it left RUNNING.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from intraneuron.errors import ConfigError
from intraneuron.tracking.hydra_job import PARENT_RUN_ID_FILE, launch_dir
from intraneuron.tracking.logger import RunLogger
from intraneuron.tracking.params import mlflow_tags
from intraneuron.tracking.redact import redact
from intraneuron.tracking.run import PARENT_TAG, process_tags, record_failure, source_tags
from intraneuron.tracking.signals import release_stop_signals, trap_stop_signals
from intraneuron.tracking.store import TrackingConfig, open_experiment, resolve
from intraneuron.tracking.ui import browse
from intraneuron.tracking.view import save_view

_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_FAILED = RunStatus.to_string(RunStatus.FAILED)
_KILLED = RunStatus.to_string(RunStatus.KILLED)
_RUNNING = RunStatus.to_string(RunStatus.RUNNING)
_ORPHAN_ERROR = "the job ended without closing its run (its process crashed or was killed)"
# set on the parent by the merge_shards callback (intraneuron/merge.py), which runs before _close,
# when the sweep's shards could not be merged; cleared by a later merge that succeeds
MERGE_ERROR_TAG = "intraneuron.merge_error"


class MlflowSweepCallback(Callback):
    """Opens one parent run per multirun; jobs log nested child runs under it."""

    def __init__(
        self,
        tracking_uri: str = TrackingConfig.tracking_uri,
        experiment: str = TrackingConfig.experiment,
        artifact_root: str | None = None,
        tags: dict[str, Any] | None = None,
    ):
        # Only plain data here: Hydra pickles its callbacks into joblib worker processes.
        self.tracking = TrackingConfig(tracking_uri, experiment, artifact_root)
        self.tags = dict(tags or {})
        self.parent_run_id: str | None = None
        self._base_dir: Path | None = None
        self._stopped_by: str | None = None  # the signal that stopped the launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an Exception raised by a callback into a warning and launches every job anyway,
        # each without a parent (or against a store none of them can use): every failure here ends
        # the command instead, as SystemExit (not an Exception, so Hydra lets it through) with one line.
        try:
            self._open_parent(config)
        except (ConfigError, SweepFolderInUse) as error:
            raise SystemExit(redact(f"{type(error).__name__}: {error}")) from error
        except Exception as error:
            self._abandon_parent(error)
            raise SystemExit(redact(
                f"mlflow_sweep: could not open the sweep's parent MLflow run in {self.tracking.tracking_uri}, "
                f"so no job was launched ({type(error).__name__}: {_one_line(error)})"
            )) from error

    def _open_parent(self, config: DictConfig) -> None:
        self._base_dir = Path.cwd()  # the launching cwd: `${hydra:runtime.cwd}` does not resolve yet
        sweep_dir = (self._base_dir / str(config.hydra.sweep.dir)).resolve()
        # Creating the experiment here, once, also creates a new sqlite file's tables before
        # parallel jobs could race on the schema migration.
        client, experiment_id = open_experiment(self.tracking, self._base_dir)
        _check_sweep_folder(client, sweep_dir)
        tags = {
            **source_tags(),
            **process_tags(),
            "hydra.sweep_dir": str(sweep_dir),
            "hydra.launcher": OmegaConf.select(config, "hydra.launcher._target_", default=""),
            "hydra.sweeper": OmegaConf.select(config, "hydra.sweeper._target_", default=""),
            **self.tags,
        }
        # from the moment the parent exists, a stop signal must not end the process before it is closed
        atexit.register(self._close, False)
        trap_stop_signals(self._noticed)
        run = client.create_run(experiment_id, run_name=redact(f"sweep-{sweep_dir.name}"), tags=mlflow_tags(tags))
        self.parent_run_id = run.info.run_id
        parent = RunLogger(client, self.parent_run_id)
        sweeper_params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        sweep: dict[str, Any] = {"overrides": " ".join(str(o) for o in config.hydra.overrides.task)}
        if sweeper_params:
            sweep["params"] = OmegaConf.to_container(sweeper_params)
        parent.log_params({"sweep": sweep})
        parent.log_text(OmegaConf.to_yaml(config, resolve=False), "config/multirun.yaml")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_ID_FILE).write_text(self.parent_run_id)

    def _noticed(self, signal_name: str) -> None:
        self._stopped_by = signal_name

    def _abandon_parent(self, error: BaseException) -> None:
        """A parent run created before the failure ends FAILED with the reason; never raises."""
        if self.parent_run_id is None:
            return
        parent_id, self.parent_run_id = self.parent_run_id, None
        try:
            client = MlflowClient(resolve(self.tracking, self._base_dir or launch_dir()).tracking_uri)
        except Exception:
            return
        record_failure(client, parent_id, error)
        with contextlib.suppress(Exception):
            client.set_terminated(parent_id, status=_FAILED)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(True)

    def _close(self, sweep_completed: bool) -> None:
        """End the parent: FINISHED only if the sweep completed and no child failed or was killed;
        KILLED if a child was, or if a stop signal ended the launching process."""
        atexit.unregister(self._close)
        release_stop_signals()
        if self.parent_run_id is None:
            return
        parent_id, self.parent_run_id = self.parent_run_id, None
        client, experiment_id = open_experiment(self.tracking, self._base_dir or launch_dir())
        stopped = f"the sweep was stopped by {self._stopped_by}" if self._stopped_by else None
        if stopped:
            _say(client, parent_id, stopped)
        children = _children(client, experiment_id, parent_id)
        # a job left RUNNING: its process died without closing it (OOM, crash), or went with the sweep
        orphan_status, why = (_KILLED, f"{stopped} while the job ran") if stopped else (_FAILED, _ORPHAN_ERROR)
        for child in children:
            if child.info.status == _RUNNING:
                child.data.tags["error"] = why
                _say(client, child.info.run_id, why)
                client.set_terminated(child.info.run_id, status=orphan_status)
        statuses = [orphan_status if c.info.status == _RUNNING else c.info.status for c in children]
        counts = {s: statuses.count(s) for s in (_FINISHED, _FAILED, _KILLED)}
        RunLogger(client, parent_id).log_metrics({
            "sweep.jobs_total": len(children),
            **{f"sweep.jobs_{s.lower()}": n for s, n in counts.items()},
        })
        _summarise(client, parent_id)  # here, not in on_multirun_end: a failed sweep needs it most
        if counts[_KILLED] or stopped:
            status = _KILLED
        elif counts[_FAILED] or not sweep_completed:
            status = _FAILED
        elif client.get_run(parent_id).data.tags.get(MERGE_ERROR_TAG):
            status = _FAILED  # the merge callback has already said why, on stderr
        else:
            status = _FINISHED
        client.set_terminated(parent_id, status=status)
        save_view(client, experiment_id)  # with every job in: parallel jobs may have raced on it
        if status != _FINISHED and (counts[_FAILED] or counts[_KILLED] or not sweep_completed):
            _report(children, statuses, parent_id, sweep_completed, stopped)
        print(_end_line(client.tracking_uri, experiment_id, parent_id, status, counts), flush=True)


class SweepFolderInUse(RuntimeError):
    """The sweep folder already belongs to another sweep's parent run."""


def _check_sweep_folder(client: MlflowClient, sweep_dir: Path) -> None:
    """Refuse a sweep folder whose parent run file names a run that is RUNNING or FINISHED.

    Hydra's default sweep folder changes once a second, so two multiruns started within one second
    (or one with a fixed hydra.sweep.dir run twice) would share it: the second would overwrite the
    parent run id the first one's jobs still read, and the jobs of both would merge under one parent.
    A folder whose parent run FAILED, was KILLED or is not in this store may be reused.
    """
    marker = sweep_dir / PARENT_RUN_ID_FILE
    if not marker.is_file():
        return
    existing = marker.read_text().strip()
    if not existing:
        return
    try:
        status = client.get_run(existing).info.status
    except MlflowException:  # deleted, or a run of another store: nothing to merge with
        return
    if status in (_RUNNING, _FINISHED):
        raise SweepFolderInUse(
            f"hydra.sweep.dir={sweep_dir} already holds the sweep of MLflow parent run {existing} ({status}); "
            "this sweep's jobs would merge into it: give this multirun another hydra.sweep.dir "
            "(e.g. hydra.sweep.dir=multirun/<name>)"
        )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _summarise(client: MlflowClient, parent_id: str) -> None:
    """The sweep's comparison table and figures on the parent run; never fails the sweep."""
    import tempfile

    try:
        from intraneuron.reports.compare import summarise_sweep

        with tempfile.TemporaryDirectory() as out:
            summarise_sweep(client, parent_id, out)
    except Exception as error:
        sys.stderr.write(redact(f"MLflow sweep run {parent_id}: no sweep summary ({type(error).__name__}: {error})\n"))


def _say(client: MlflowClient, run_id: str, why: str) -> None:
    """`why` as the run's error tag and description, where the UI shows it first."""
    client.log_batch(run_id, tags=[RunTag("error", why), RunTag(MLFLOW_RUN_NOTE, why)])


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
            max_results=1000, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _end_line(tracking_uri: str, experiment_id: str, parent_id: str, status: str, counts: dict[str, int]) -> str:
    """The sweep's last line: its parent run, how its jobs ended, how to compare and browse them."""
    jobs = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no job"
    uri = redact(tracking_uri)
    return redact(
        f"sweep {status.lower()}: MLflow parent run {parent_id} ({jobs}). "
        f"Compare: intraneuron compare {parent_id} --tracking-uri {uri}. Browse: {browse(tracking_uri, experiment_id)}"
    )


def _report(
    children: list[Any], statuses: list[str], parent_id: str, sweep_completed: bool, stopped: str | None = None
) -> None:
    """One readable stderr summary of every failed job (Hydra itself only re-raises the first)."""
    bad = [(c, s) for c, s in zip(children, statuses, strict=True) if s != _FINISHED]
    bad.sort(key=lambda cs: int(cs[0].data.tags.get("hydra.job_num", "-1")))
    lines = [f"MLflow sweep run {parent_id}: {len(bad)} of {len(children)} jobs did not finish"]
    if not sweep_completed and not bad:
        lines[0] = f"MLflow sweep run {parent_id}: the sweep stopped before completing"
    if stopped:
        lines[0] = f"MLflow sweep run {parent_id}: {stopped} and is marked KILLED; {len(bad)} of {len(children)} jobs did not finish"
    for child, status in bad:
        tags = child.data.tags
        lines.append(
            f"  #{tags.get('hydra.job_num', '?')} {tags.get('hydra.overrides', child.info.run_name)}: "
            f"{status} {tags.get('error', '')}".rstrip()
        )
    sys.stderr.write("\n".join(lines) + "\n")
