"""Where runs go: the one `tracking` schema, its checks, and the connection to the experiment.

Importing this module stays cheap (no mlflow, no hydra at module level): config validation imports
the schema before anything heavy is loaded. What can be reached and written is checked by
`preflight.check_reachable`, in seconds, before MLflow's own retry loops start.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from intraneuron.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

KEY = "tracking"  # the config group; error messages name its keys in full
_SERVER_SCHEMES = "sqlite:///<path>, postgresql://, mysql://, http(s):// of an `mlflow server`, databricks"
_PROFILE_URIS = ("databricks", "databricks-uc")  # schemeless, yet not paths: MLflow reads a profile

# MLflow UIs without the GenAI / model-training switch file an experiment by this tag (a value of
# their ExperimentKind enum) and, when it is missing, guess the kind and may open the traces page
# instead of the runs table. UIs with the switch (MLflow 3.17's among them) follow the switch;
# the links in `ui.py` set it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass
class TrackingConfig:
    """Where runs go. Relative paths are resolved against the directory the command was launched from.

    A plain (not frozen) dataclass: OmegaConf merges config nodes onto it as a structured schema.
    """

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "intraneuron"
    artifact_root: str | None = None  # default: <dir of the sqlite db>/artifacts (absolute); server default otherwise
    system_metrics: bool = True  # sample CPU, memory, disk, network (and NVIDIA GPU) into system/... metrics
    system_metrics_interval: float = 10.0  # seconds between samples
    # a job of a multirun whose config (minus how it runs) already has a FINISHED run in the
    # experiment is not run again: the sweep's parent adopts that run (resuming a broken sweep)
    skip_finished: bool = True

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], key: str = KEY) -> TrackingConfig:
        """Build from a config node, rejecting unknown keys by name."""
        allowed = [f.name for f in fields(cls)]
        for name in node:
            if name not in allowed:
                raise ConfigError(f"{key}.{name}", node[name], f"one of the keys {', '.join(allowed)}")
        return cls(**{name: node[name] for name in node})

    def validate(self, base_dir: str | Path | None = None) -> ResolvedTracking:
        """Check the values and that the store can be reached and written; ConfigError names the key.

        `base_dir` defaults to the launch directory (see `hydra_job.launch_dir`), never a Hydra job's
        output folder: a relative `mlruns/` must be the same store for every job of a sweep.
        """
        if base_dir is None:
            from intraneuron.tracking.hydra_job import launch_dir

            base_dir = launch_dir()
        from intraneuron.tracking.preflight import check_reachable

        resolved = resolve(self, Path(base_dir))
        check_reachable(self, base_dir)
        return resolved


@dataclass(frozen=True)
class ResolvedTracking:
    """A TrackingConfig with every path made absolute."""

    tracking_uri: str
    experiment: str
    artifact_location: str | None
    sqlite_file: Path | None = None  # the database file of a sqlite URI
    artifact_dir: Path | None = None  # the local folder artifacts are written under, if local


def resolve(tcfg: TrackingConfig, base_dir: Path) -> ResolvedTracking:
    """Check the URI's form and make sqlite and artifact paths absolute (jobs may run in another cwd).

    Touches nothing on disk or network; `check_reachable` does.
    """
    uri = str(tcfg.tracking_uri)
    scheme = urlparse(uri).scheme
    is_path = scheme in ("", "file") or len(scheme) == 1  # a bare path, file:// or a Windows drive letter
    if is_path and uri not in _PROFILE_URIS:
        raise ConfigError(
            f"{KEY}.tracking_uri", uri,
            f"a database or server URI ({_SERVER_SCHEMES}); MLflow 3 refuses the file store",
        )
    if not str(tcfg.experiment).strip():
        raise ConfigError(f"{KEY}.experiment", tcfg.experiment, "a non-empty experiment name")
    _check_sampling(tcfg)

    base_dir = Path(base_dir)
    db_file: Path | None = None
    artifact_dir: Path | None = None
    artifact_root: str | None = None
    if scheme == "sqlite":
        db_path = uri.removeprefix("sqlite:///")
        if db_path == uri or db_path in ("", ":memory:"):
            raise ConfigError(
                f"{KEY}.tracking_uri", uri,
                "sqlite:///<file> (an in-memory database is invisible to the other jobs of a sweep)",
            )
        db_file = (base_dir / db_path).resolve()
        uri = f"sqlite:///{db_file}"
        artifact_dir = db_file.parent / "artifacts"
        artifact_root = str(artifact_dir)
    if tcfg.artifact_root is not None:
        root = str(tcfg.artifact_root)
        parsed = urlparse(root)
        if len(parsed.scheme) > 1:
            artifact_root = root
            artifact_dir = Path(parsed.path) if parsed.scheme == "file" else None
        else:
            artifact_dir = (base_dir / root).resolve()
            artifact_root = str(artifact_dir)
    location = None
    if artifact_root is not None:
        _check_folder_name(str(tcfg.experiment), artifact_root)
        location = f"{artifact_root.rstrip('/')}/{_safe_dir_name(str(tcfg.experiment))}"
    return ResolvedTracking(uri, str(tcfg.experiment), location, db_file, artifact_dir)


def _check_sampling(tcfg: TrackingConfig) -> None:
    if not isinstance(tcfg.system_metrics, bool):
        raise ConfigError(f"{KEY}.system_metrics", tcfg.system_metrics, "true or false")
    interval = tcfg.system_metrics_interval
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval < float("inf"):
        raise ConfigError(f"{KEY}.system_metrics_interval", interval, "a number of seconds > 0")
    if not isinstance(tcfg.skip_finished, bool):
        raise ConfigError(f"{KEY}.skip_finished", tcfg.skip_finished, "true or false")


def _check_folder_name(experiment: str, artifact_root: str) -> None:
    """The experiment names its artifact folder under the root: `..` would put the artifacts beside
    the database (or anywhere up the tree), `.` into the root itself, among every experiment's."""
    if experiment in (".", "..") or any(sep in experiment for sep in ("/", "\\")):
        raise ConfigError(f"{KEY}.experiment", experiment,
                          f"a name without '/' or '\\', other than '.' and '..' (it names a folder in {artifact_root})")


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name)


def open_experiment(tcfg: TrackingConfig, base_dir: Path) -> tuple[MlflowClient, str]:
    """Connect and return (client, experiment id), creating the experiment with an absolute artifact location.

    The location is checked first (`check_reachable`), so a bad one fails before any MLflow call
    and leaves no run behind. The first connection to a new sqlite file creates its tables and
    runs MLflow's migrations (several seconds); processes that start together on a new file (two
    multiruns, parallel jobs) would run them at once and fail, so for sqlite the connection and the
    experiment are made under a lock file next to the database. The experiment is marked as
    classical ML (EXPERIMENT_KIND_TAG) unless it already carries a kind, which is the user's to choose,
    and gets its saved view of the headline metrics (`view.py`) unless it has one.
    """
    from intraneuron.tracking.preflight import check_reachable

    resolved = resolve(tcfg, base_dir)
    check_reachable(tcfg, base_dir)
    if resolved.sqlite_file is None:
        return _open_experiment(resolved)
    with _file_lock(resolved.sqlite_file.with_name(resolved.sqlite_file.name + ".init-lock")):
        client, experiment_id = _open_experiment(resolved)
    if tcfg.artifact_root is None:
        check_not_relocated(resolved, client.get_experiment(experiment_id).artifact_location)
    return client, experiment_id


def check_not_relocated(resolved: ResolvedTracking, location: str) -> None:
    """Refuse a sqlite store that was copied or moved away from its default artifact folder.

    MLflow stores an experiment's artifact location as an absolute path when the experiment is
    created, so a project copied elsewhere would go on writing every run's artifacts into the
    original tree (and a moved one into a folder that is gone). The default location sits beside
    the database (<db folder>/artifacts/<experiment>); an experiment whose location is another
    folder that holds a database of the same name, or whose folder no longer exists, was made by
    this store in another place.
    """
    if resolved.artifact_location is None or resolved.sqlite_file is None:
        return
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # a remote artifact store is shared by design
    recorded = Path(parsed.path).resolve()
    expected = Path(resolved.artifact_location).resolve()
    if recorded == expected:
        return
    original_store = recorded.parent.parent / resolved.sqlite_file.name
    copied = original_store.is_file() and original_store.resolve() != resolved.sqlite_file
    moved = not recorded.parent.parent.exists()
    if not (copied or moved):
        return  # an artifact root chosen on purpose earlier: the user's to keep
    how = f"a copy of {original_store}" if copied else f"moved from {recorded.parent.parent}"
    # named by the experiment: tracking.artifact_root is unset here, and the folder MLflow recorded
    # for the experiment when it was made is what sends its artifacts away
    raise ConfigError(
        f"{KEY}.experiment", resolved.experiment,
        f"an experiment whose artifacts stay in this project: the store {resolved.sqlite_file} is {how}, "
        f"and this experiment still writes its artifacts to {recorded}. Start a new experiment here "
        f"(tracking.experiment=<new name>) or keep writing there on purpose "
        f"(tracking.artifact_root={recorded.parent})",
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (created if missing; left in place, it is empty)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_experiment(resolved: ResolvedTracking) -> tuple[MlflowClient, str]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from intraneuron.tracking.view import VIEW_TAG, new_view, save_view

    client = MlflowClient(tracking_uri=resolved.tracking_uri)
    experiment = client.get_experiment_by_name(resolved.experiment)
    if experiment is None:
        try:
            return client, client.create_experiment(
                resolved.experiment,
                artifact_location=resolved.artifact_location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: new_view()},
            )
        except MlflowException as exc:  # another process created it between our two calls
            experiment = client.get_experiment_by_name(resolved.experiment)
            if experiment is None:
                raise exc
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"{KEY}.experiment", resolved.experiment,
            f"an experiment that is not deleted (restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}` or choose another name)",
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before this tag, or by someone else
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if VIEW_TAG not in experiment.tags:  # printed links name the view before any run has ended
        save_view(client, experiment.experiment_id, current="")
    return client, experiment.experiment_id
