"""MLflow tracking: one run per job, one parent run per Hydra multirun, Parquet tables as artifacts."""

from intraneuron.tracking.params import flatten, mlflow_params, mlflow_tags
from intraneuron.tracking.run import (
    RunLogger,
    TaskFailed,
    TrackingConfig,
    current_hydra_job,
    git_commit,
    open_experiment,
    tracked_run,
    tracked_task,
)
from intraneuron.tracking.sweep_callback import MlflowSweepCallback

__all__ = [
    "MlflowSweepCallback",
    "RunLogger",
    "TaskFailed",
    "TrackingConfig",
    "current_hydra_job",
    "flatten",
    "git_commit",
    "mlflow_params",
    "mlflow_tags",
    "open_experiment",
    "tracked_run",
    "tracked_task",
]
