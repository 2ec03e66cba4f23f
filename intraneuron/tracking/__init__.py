"""MLflow tracking: one run per job, one parent run per Hydra multirun, Parquet tables as artifacts.

Names are loaded on first use (PEP 562): `intraneuron.tracking.store`, which config validation
imports, must not pull mlflow in through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intraneuron.tracking.hydra_job import current_hydra_job
    from intraneuron.tracking.logger import RunLogger
    from intraneuron.tracking.params import flatten, mlflow_params, mlflow_tags
    from intraneuron.tracking.run import TaskFailed, git_commit, tracked_run, tracked_task
    from intraneuron.tracking.store import TrackingConfig, open_experiment
    from intraneuron.tracking.sweep_callback import MlflowSweepCallback
    from intraneuron.tracking.ui import experiment_url, run_url

__all__ = [
    "MlflowSweepCallback",
    "RunLogger",
    "TaskFailed",
    "TrackingConfig",
    "current_hydra_job",
    "experiment_url",
    "flatten",
    "git_commit",
    "mlflow_params",
    "mlflow_tags",
    "open_experiment",
    "run_url",
    "tracked_run",
    "tracked_task",
]
_SOURCES = {  # name -> the submodule that defines it
    "MlflowSweepCallback": "sweep_callback",
    "RunLogger": "logger",
    "TaskFailed": "run",
    "TrackingConfig": "store",
    "current_hydra_job": "hydra_job",
    "experiment_url": "ui",
    "flatten": "params",
    "git_commit": "run",
    "mlflow_params": "params",
    "mlflow_tags": "params",
    "open_experiment": "store",
    "run_url": "ui",
    "tracked_run": "run",
    "tracked_task": "run",
}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
