"""Jobs that start together on a brand-new sqlite store race on MLflow's schema creation (the first
connection creates the tables and runs the migrations); every one of them must get the experiment."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from mlflow import MlflowClient

from intraneuron.tracking import TrackingConfig, open_experiment

N_PROCESSES = 4


def _open(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        _, experiment_id = open_experiment(
            TrackingConfig(tracking_uri="sqlite:///mlruns/mlflow.db", experiment="race"), Path(folder)
        )
        results.put(("ok", experiment_id))
    except Exception as err:  # noqa: BLE001 - sent to the parent, which asserts there are none
        results.put(("error", f"{type(err).__name__}: {err}"))


def test_processes_opening_a_new_store_at_once_all_get_the_experiment(tmp_path: Path):
    context = multiprocessing.get_context("fork")
    for round_ in range(2):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        barrier, results = context.Barrier(N_PROCESSES), context.Queue()
        workers = [context.Process(target=_open, args=(str(folder), barrier, results)) for _ in range(N_PROCESSES)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        outcomes = [results.get(timeout=5) for _ in workers]
        assert [kind for kind, _ in outcomes] == ["ok"] * N_PROCESSES, outcomes
        assert len({experiment_id for _, experiment_id in outcomes}) == 1
        experiments = MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db").search_experiments()
        assert [e.name for e in experiments if e.name == "race"] == ["race"]
