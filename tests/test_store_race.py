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


def test_two_multiruns_started_together_on_a_new_store_both_get_their_parent(tmp_path: Path):
    """Each sweep's parent run is opened by its callback while the other may be creating the schema."""
    import os
    import subprocess
    import sys

    from tests.test_tracking import REPO, TOY_APP

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    sweeps = {name: [sys.executable, str(TOY_APP), "--multirun", "x=1,2", "fail_on=99",
                     f"hydra.sweep.dir=multirun/{name}", f"hydra.searchpath=[file://{REPO / 'conf'}]",
                     "tracking.tracking_uri=sqlite:///store/mlflow.db", "tracking.experiment=toy"]
              for name in ("a", "b")}  # fmt: skip
    started = {name: subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
               for name, command in sweeps.items()}  # fmt: skip
    outputs = {name: job.communicate(timeout=300)[0] for name, job in started.items()}
    assert {name: job.returncode for name, job in started.items()} == {"a": 0, "b": 0}, outputs
    client = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    for name in sweeps:
        parent_id = (tmp_path / "multirun" / name / "mlflow_parent_run_id").read_text().strip()
        assert client.get_run(parent_id).info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert sorted(r.data.params["x"] for r in children) == ["1", "2"], outputs[name][-2000:]
