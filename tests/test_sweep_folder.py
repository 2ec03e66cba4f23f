"""The sweep callback refuses a sweep folder that already holds another sweep's live or finished parent
run (two multiruns in one folder would merge under one parent), and a parent run that cannot be
opened stops the multirun with its error instead of launching jobs without a parent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from intraneuron.tracking import MlflowSweepCallback

REPO = Path(__file__).resolve().parents[1]
TOY_APP = REPO / "tests" / "toy_app" / "app.py"
URI = "sqlite:///mlruns/mlflow.db"  # relative to the test's cwd (tmp_path)


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    return tmp_path


def _config(sweep_dir: str):
    return OmegaConf.create({
        "hydra": {
            "sweep": {"dir": sweep_dir},
            "overrides": {"task": ["x=1,2"]},
            "launcher": {"_target_": "some.Launcher"},
            "sweeper": {"_target_": "some.Sweeper", "params": {}},
        }
    })


def _callback() -> MlflowSweepCallback:
    return MlflowSweepCallback(URI, experiment="folders")


def _client(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")


def _parents(folder: Path) -> list:
    client = _client(folder)
    experiment = client.get_experiment_by_name("folders")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.parametrize("first_ends", [None, "finished"])
def test_a_second_sweep_in_the_folder_of_a_running_or_finished_one_is_refused(folder, first_ends):
    first = _callback()
    first.on_multirun_start(_config("multirun/same"))
    marker = folder / "multirun" / "same" / "mlflow_parent_run_id"
    first_id = marker.read_text()
    if first_ends == "finished":
        first.on_multirun_end(_config("multirun/same"))
    with pytest.raises(SystemExit) as stopped:
        _callback().on_multirun_start(_config("multirun/same"))
    message = str(stopped.value.code)
    assert "\n" not in message
    assert message.startswith("SweepFolderInUse: hydra.sweep.dir=")
    assert first_id in message and "another hydra.sweep.dir" in message
    assert marker.read_text() == first_id  # the first sweep's jobs still find their parent
    assert [r.info.run_id for r in _parents(folder)] == [first_id]  # no second parent opened
    first._close(True)


def test_the_folder_of_a_failed_sweep_may_be_reused(folder):
    first = _callback()
    first.on_multirun_start(_config("multirun/again"))
    first._close(False)  # the sweep stopped: its parent is FAILED
    second = _callback()
    second.on_multirun_start(_config("multirun/again"))
    assert (folder / "multirun" / "again" / "mlflow_parent_run_id").read_text() == second.parent_run_id
    second._close(True)


def test_a_parent_run_that_cannot_be_opened_stops_the_sweep(folder, monkeypatch):
    def unreachable(self, *args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    # the store answers the experiment check, then goes away while the parent is being filled in
    monkeypatch.setattr(MlflowClient, "log_text", unreachable)
    callback = _callback()
    with pytest.raises(SystemExit) as stopped:
        callback.on_multirun_start(_config("multirun/broken"))
    message = str(stopped.value.code)
    assert message.startswith("mlflow_sweep: could not open the sweep's parent MLflow run")
    assert "MlflowException: API request failed: connection refused" in message and "\n" not in message
    assert not (folder / "multirun" / "broken" / "mlflow_parent_run_id").exists()
    (parent,) = _parents(folder)
    assert parent.info.status == "FAILED"  # not left RUNNING
    assert "connection refused" in parent.data.tags["error"]
    assert callback.parent_run_id is None


# ---------------------------------------------------------------- real Hydra multiruns


def _launch(cwd: Path, *args: str, script: Path = TOY_APP) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(script), "--multirun", *args, f"hydra.searchpath=[file://{REPO / 'conf'}]",
               f"tracking.tracking_uri={URI}", "tracking.experiment=folders"]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hydra_stops_a_second_multirun_into_the_same_sweep_dir(folder):
    first = _launch(folder, "x=1", "hydra.sweep.dir=multirun/fixed")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Launching" in first.stdout + first.stderr
    (parent,) = [r for r in _parents(folder) if "mlflow.parentRunId" not in r.data.tags]
    second = _launch(folder, "x=2", "hydra.sweep.dir=multirun/fixed")
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("SweepFolderInUse: hydra.sweep.dir=") and parent.info.run_id in lines[-1]
    assert "Launching" not in second.stdout + second.stderr  # no job ran
    assert len(_parents(folder)) == 2  # the first sweep's parent and its one child


def test_hydra_exits_nonzero_when_the_parent_run_cannot_be_opened(folder):
    # the store answers the experiment check, then refuses the parent run
    wrapper = folder / "broken_store.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "from mlflow import MlflowClient\n"
        "from mlflow.exceptions import MlflowException\n"
        "def refuse(self, *args, **kwargs):\n"
        "    raise MlflowException('API request failed: connection refused')\n"
        "MlflowClient.create_run = refuse\n"
        f"sys.argv[0] = {str(TOY_APP)!r}\n"
        f"runpy.run_path({str(TOY_APP)!r}, run_name='__main__')\n"
    )
    done = _launch(folder, "x=1,2", script=wrapper)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("mlflow_sweep: could not open the sweep's parent MLflow run"), done.stderr
    assert "connection refused" in lines[-1]
    assert "Launching" not in done.stdout + done.stderr  # no job ran without a parent
    assert _parents(folder) == []
