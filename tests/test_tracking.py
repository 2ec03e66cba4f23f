"""MLflow tracking: params, metrics, tables and failures read back from a real sqlite store,
and real Hydra multiruns (tests/toy_app) with the basic and joblib launchers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from omegaconf import OmegaConf

from intraneuron.errors import ConfigError
from intraneuron.tracking import (
    MlflowSweepCallback,
    TaskFailed,
    TrackingConfig,
    flatten,
    git_commit,
    mlflow_params,
    tracked_run,
)
from intraneuron.tracking.logger import RunLogger
from intraneuron.tracking.params import TRUNCATION_MARKER
from intraneuron.tracking.run import transportable
from intraneuron.tracking.store import resolve

REPO = Path(__file__).resolve().parents[1]
TOY_APP = REPO / "tests" / "toy_app" / "app.py"


# ---------------------------------------------------------------- params


def test_flatten_nested_config_keeps_lists_and_empty_groups_whole():
    tree = {"model": {"name": "gpt2", "dims": {"d_mlp": 3072}}, "layers": [0, 5], "extra": {}, "seed": 0}
    assert flatten(tree) == {
        "model.name": "gpt2", "model.dims.d_mlp": 3072, "layers": [0, 5], "extra": {}, "seed": 0,
    }
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}


def test_mlflow_params_spell_values_as_yaml_and_truncate_long_ones():
    params = mlflow_params({"a": {"none": None, "yes": True, "f": 0.5, "l": [1, 2]}, "long": "x" * 7000})
    assert params["a.none"] == "null" and params["a.yes"] == "true"
    assert params["a.f"] == "0.5" and params["a.l"] == "[1, 2]"
    assert len(params["long"]) == 6000
    assert params["long"].endswith(TRUNCATION_MARKER)
    assert params["long"].startswith("x" * (6000 - len(TRUNCATION_MARKER)))
    assert mlflow_params({"v": "y" * 6000})["v"] == "y" * 6000  # at the limit: untouched


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("uri", ["mlruns", "file:///tmp/mlruns", "./mlruns", "sqlite:///:memory:"])
def test_file_store_and_in_memory_uris_are_rejected_by_name(uri, tmp_path):
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        resolve(TrackingConfig(tracking_uri=uri), tmp_path)


def test_unknown_tracking_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"tracking\.trackin_uri="):
        TrackingConfig.from_mapping({"trackin_uri": "sqlite:///x.db"})


def test_relative_sqlite_and_artifact_paths_become_absolute(tmp_path):
    resolved = resolve(TrackingConfig("sqlite:///runs/db/mlflow.db", "my exp"), tmp_path)
    assert resolved.tracking_uri == f"sqlite:///{tmp_path.resolve()}/runs/db/mlflow.db"
    assert resolved.artifact_location == f"{tmp_path.resolve()}/runs/db/artifacts/my_exp"
    custom = resolve(TrackingConfig("sqlite:///m.db", "e", artifact_root="art"), tmp_path)
    assert custom.artifact_location == f"{tmp_path.resolve()}/art/e"
    remote = resolve(TrackingConfig("http://127.0.0.1:5000", "e"), tmp_path)
    assert remote.tracking_uri == "http://127.0.0.1:5000" and remote.artifact_location is None


@pytest.mark.parametrize("name", ["..", ".", "runs/first", "../elsewhere", "a\\b"])
def test_an_experiment_name_that_would_leave_the_artifact_root_is_refused(name, tmp_path):
    for tcfg in (TrackingConfig("sqlite:///m.db", name), TrackingConfig("sqlite:///m.db", name, artifact_root="art")):
        with pytest.raises(ConfigError) as caught:
            resolve(tcfg, tmp_path)
        assert caught.value.key == "tracking.experiment" and caught.value.value == name
    # a server keeps the artifacts where it likes: the name is its own business (Databricks uses paths)
    assert resolve(TrackingConfig("http://127.0.0.1:5000", "team/first"), tmp_path).artifact_location is None


# ---------------------------------------------------------------- one run, in-process


@pytest.fixture
def tcfg(store, monkeypatch) -> TrackingConfig:
    monkeypatch.chdir(store)  # the relative sqlite path below resolves against the cwd
    return TrackingConfig(tracking_uri="sqlite:///mlruns/mlflow.db", experiment="unit")


def _client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store.resolve()}/mlruns/mlflow.db")


def _artifact_text(run_id: str, path: str, tracking_uri: str) -> str:
    return Path(download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri)).read_text()


def test_tracked_run_logs_params_tags_config_and_artifacts(tcfg, store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = {"model": {"name": "gpt2", "d_mlp": 3072}, "layer": 3, "note": "n" * 7000}
    table = pd.DataFrame({"neuron": np.arange(5), "score": np.linspace(0.0, 1.0, 5)})
    with tracked_run(
        tcfg, run_name="unit-run", params=config, tags={"analysis": "topdown", "layer": 3},
        config_dict=config, overrides=["layer=3", "model=gpt2"],
    ) as run:
        run.log_table(table, "tables/neurons.parquet")
        run.for_layer(3).log_table(table.head(2), "core.parquet")
        run.log_dict({"k": [1, 2]}, "extra/info.json")
        run.log_text("hello", "notes/readme.txt")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        run.log_figure(fig, "figures/line.png")
        plt.close(fig)
        run.set_tags({"cache_key": "abc"})

    client = _client(store)
    got = client.get_run(run.run_id)
    uri = client.tracking_uri
    assert got.info.status == "FINISHED" and got.info.run_name == "unit-run"
    assert "mlflow.parentRunId" not in got.data.tags  # outside Hydra: a top-level run
    assert got.data.params["model.name"] == "gpt2" and got.data.params["model.d_mlp"] == "3072"
    assert got.data.params["layer"] == "3"
    assert len(got.data.params["note"]) == 6000 and got.data.params["note"].endswith(TRUNCATION_MARKER)
    assert got.data.tags["analysis"] == "topdown" and got.data.tags["layer"] == "3"
    assert got.data.tags["cache_key"] == "abc"
    assert yaml.safe_load(_artifact_text(run.run_id, "config/composed.yaml", uri)) == config
    assert yaml.safe_load(_artifact_text(run.run_id, "config/overrides.yaml", uri)) == ["layer=3", "model=gpt2"]
    neurons = download_artifacts(run_id=run.run_id, artifact_path="tables/neurons.parquet", tracking_uri=uri)
    pd.testing.assert_frame_equal(pd.read_parquet(neurons), table)
    core = download_artifacts(run_id=run.run_id, artifact_path="layer_3/core.parquet", tracking_uri=uri)
    pd.testing.assert_frame_equal(pd.read_parquet(core), table.head(2))
    assert _artifact_text(run.run_id, "notes/readme.txt", uri) == "hello"
    assert {a.path for a in client.list_artifacts(run.run_id, "figures")} == {"figures/line.png"}
    # artifacts live under the db's folder, at an absolute location (not relative to a later cwd)
    artifact_uri = got.info.artifact_uri
    assert artifact_uri.startswith(str(store.resolve() / "mlruns" / "artifacts" / "unit"))


def test_metrics_beyond_1000_keys_are_batched_and_read_back_exactly(tcfg, store, monkeypatch):
    calls: list[int] = []
    original = MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    metrics = {f"neuron_{i}": i / 7 for i in range(2500)}
    with tracked_run(tcfg, run_name="many", params={}, tags={}, config_dict=None, overrides=None) as run:
        run.log_metrics(metrics)
        run.for_layer(2).log_metrics({"nan": float("nan"), "frac": np.float32(0.25)}, step=2)
    assert calls == [1000, 1000, 500, 2]
    stored = _client(store).get_run(run.run_id).data.metrics
    assert {k: stored[k] for k in metrics} == metrics
    assert math.isnan(stored["layer_2/nan"]) and stored["layer_2/frac"] == 0.25
    history = _client(store).get_metric_history(run.run_id, "layer_2/frac")
    assert [m.step for m in history] == [2]


def test_non_numeric_metric_is_rejected_before_anything_is_logged(tcfg, store):
    with tracked_run(tcfg, run_name="bad-metric", params={}, tags={}, config_dict=None, overrides=None) as run:
        with pytest.raises(TypeError, match="layer_1/label"):
            run.for_layer(1).log_metrics({"ok": 1.0, "label": "high"})
    assert _client(store).get_run(run.run_id).data.metrics == {}


def test_exception_marks_run_failed_logs_the_error_and_propagates(tcfg, store):
    holder: list[RunLogger] = []
    with pytest.raises(ValueError, match="planted failure"):
        with tracked_run(tcfg, run_name="boom", params={"a": 1}, tags={}, config_dict=None, overrides=None) as run:
            holder.append(run)
            raise ValueError("planted failure")
    client = _client(store)
    got = client.get_run(holder[0].run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "ValueError: planted failure"
    error_txt = _artifact_text(got.info.run_id, "error.txt", client.tracking_uri)
    assert "Traceback" in error_txt and "planted failure" in error_txt and "test_tracking.py" in error_txt


def test_keyboard_interrupt_marks_run_killed(tcfg, store):
    holder: list[RunLogger] = []
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(tcfg, run_name="ctrl-c", params={}, tags={}, config_dict=None, overrides=None) as run:
            holder.append(run)
            raise KeyboardInterrupt
    assert _client(store).get_run(holder[0].run_id).info.status == "KILLED"


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, why: str):  # pickle replays __init__(*args) with one argument
        super().__init__(f"{what} failed: {why}")


def test_unpicklable_exceptions_are_carried_as_task_failed():
    plain = ValueError("fine")
    assert transportable(plain) is plain
    config_error = ConfigError("x", 3, "anything else")
    assert transportable(config_error) is config_error  # ConfigError pickles itself
    carried = transportable(NeedsTwoArguments("job", "no disk"))
    assert isinstance(carried, TaskFailed)
    assert "NeedsTwoArguments: job failed: no disk" in str(pickle.loads(pickle.dumps(carried)))


def test_git_commit_outside_and_inside_a_repository(tmp_path):
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "does-not-exist") is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    assert git_commit(tmp_path) == head.stdout.strip()


# ---------------------------------------------------------------- real Hydra multiruns


def _launch(cwd: Path, *args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the toy app in `cwd`; `store` seeds store/mlflow.db with an existing (empty) database."""
    if store is not None:
        (cwd / "store").mkdir()
        shutil.copy(store / "mlruns" / "mlflow.db", cwd / "store" / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, str(TOY_APP), *args,
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        "tracking.tracking_uri=sqlite:///store/mlflow.db",
        "tracking.experiment=toy",
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _runs(cwd: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{cwd}/store/mlflow.db")
    experiment = client.get_experiment_by_name("toy")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def _check_sweep(cwd: Path, done: subprocess.CompletedProcess[str], xs: list[int], fail_on: int | None):
    client, runs = _runs(cwd)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = {int(r.data.params["x"]): r for r in runs if r is not parent}
    assert sorted(children) == xs
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    (marker,) = cwd.glob("multirun/*/*/mlflow_parent_run_id")
    assert marker.read_text() == parent.info.run_id
    assert parent.info.run_name == f"sweep-{marker.parent.name}"
    assert parent.data.params["sweep.overrides"].startswith(f"x={','.join(map(str, xs))}")
    assert parent.data.metrics["sweep.jobs_total"] == len(xs)
    assert parent.data.metrics["sweep.jobs_failed"] == (1 if fail_on in xs else 0)

    for job_num, (x, child) in enumerate(sorted(children.items())):
        tags, params = child.data.tags, child.data.params
        run_info = json.loads((Path(tags["hydra.output_dir"]) / "mlflow_run.json").read_text())
        assert run_info["run_id"] == child.info.run_id and run_info["parent_run_id"] == parent.info.run_id
        assert child.info.run_name == f"x={x}"  # only the swept override, not the shared ones
        assert tags["hydra.job_num"] == str(job_num) and tags["hydra.overrides"].startswith(f"x={x} ")
        assert params == {"x": str(x), "model.name": "toy", "model.d_mlp": "8", "model.note": "short"}
        composed = yaml.safe_load(_artifact_text(child.info.run_id, "config/composed.yaml", client.tracking_uri))
        assert composed["x"] == x and composed["tracking"]["experiment"] == "toy"
        if x == fail_on:
            assert child.info.status == "FAILED"
            assert tags["error"] == f"ConfigError: x={x} is not allowed: expected anything but fail_on={x}"
            assert "ConfigError" in _artifact_text(child.info.run_id, "error.txt", client.tracking_uri)
            assert child.data.metrics == {}
            continue
        assert child.info.status == "FINISHED"
        expected = {f"layer_{layer}/m{i}": x * 100 + layer * 10 + i for layer in range(2) for i in range(25)}
        # system/... samples appear only in a job that outlives the sampling interval
        assert {k: v for k, v in child.data.metrics.items() if not k.startswith("system/")} == expected
        path = download_artifacts(
            run_id=child.info.run_id, artifact_path="tables/neurons.parquet", tracking_uri=client.tracking_uri
        )
        expected_table = pd.DataFrame({"neuron": np.arange(8), "score": x * np.arange(8)})
        pd.testing.assert_frame_equal(pd.read_parquet(path), expected_table)

    if fail_on in xs:
        assert done.returncode == 1, done.stderr[-3000:]
        assert parent.info.status == "FAILED"
        assert "Error executing job with overrides: ['x=3'" in done.stderr
        assert f"1 of {len(xs)} jobs did not finish" in done.stderr
        assert "#2 x=3" in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert parent.info.status == "FINISHED"


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory, store) -> tuple[Path, subprocess.CompletedProcess[str]]:
    # chdir=true: jobs run inside their output folders, yet must reach the same relative sqlite store
    cwd = tmp_path_factory.mktemp("basic_sweep")
    return cwd, _launch(cwd, "--multirun", "x=1,2,3,4", "hydra.job.chdir=true", store=store)


def test_basic_launcher_sweep_records_every_job_and_the_failure(basic_sweep):
    cwd, done = basic_sweep
    _check_sweep(cwd, done, [1, 2, 3, 4], fail_on=3)


@pytest.mark.slow
def test_joblib_launcher_sweep_records_every_job_and_the_failure(tmp_path):
    # a fresh store: the callback must create its tables before the parallel jobs start
    done = _launch(tmp_path, "--multirun", "x=1,2,3,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    _check_sweep(tmp_path, done, [1, 2, 3, 4], fail_on=3)
    assert "Joblib.Parallel(n_jobs=2" in done.stderr + done.stdout


@pytest.mark.slow
def test_successful_sweep_closes_the_parent_finished(tmp_path, store):
    done = _launch(tmp_path, "--multirun", "x=1,2", store=store)
    _check_sweep(tmp_path, done, [1, 2], fail_on=None)


@pytest.mark.slow
def test_single_run_is_a_top_level_run(tmp_path, store):
    done = _launch(tmp_path, "x=2", store=store)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = _runs(tmp_path)
    (run,) = runs
    assert "mlflow.parentRunId" not in run.data.tags and "hydra.job_num" not in run.data.tags
    assert run.info.status == "FINISHED"
    (run_info,) = tmp_path.glob("outputs/*/*/mlflow_run.json")
    assert json.loads(run_info.read_text())["run_id"] == run.info.run_id
    assert run.info.run_name == "x=2 tracking.tracking_uri=sqlite:///store/mlflow.db tracking.experiment=toy"


# ---------------------------------------------------------------- the parent run's closing, in-process


def _sweep_config(sweep_dir: str):
    return OmegaConf.create({
        "hydra": {
            "sweep": {"dir": sweep_dir},
            "overrides": {"task": ["x=1,2", "model=toy"]},
            "launcher": {"_target_": "some.Launcher"},
            "sweeper": {"_target_": "some.Sweeper", "params": {"y": "a,b"}},
        }
    })


def _start_sweep(tcfg: TrackingConfig, sweep_dir: str) -> tuple[MlflowSweepCallback, str]:
    callback = MlflowSweepCallback(tcfg.tracking_uri, experiment="callback", tags={"purpose": "test"})
    callback.on_multirun_start(_sweep_config(sweep_dir))
    pickle.dumps(callback)  # Hydra ships its callbacks to joblib workers
    return callback, (Path(sweep_dir) / "mlflow_parent_run_id").read_text()


def _child(tcfg: TrackingConfig, parent: str, job_num: int, fail: bool = False) -> None:
    child_cfg = TrackingConfig(tcfg.tracking_uri, experiment="callback")
    tags = {"mlflow.parentRunId": parent, "hydra.job_num": job_num, "hydra.overrides": f"x={job_num + 1}"}
    with contextlib.suppress(RuntimeError):
        with tracked_run(child_cfg, run_name=f"x={job_num + 1}", tags=tags):
            if fail:
                raise RuntimeError("planted")


def test_sweep_parent_finishes_when_every_child_finished(tcfg, store):
    callback, parent = _start_sweep(tcfg, "multirun/ok")
    _child(tcfg, parent, 0)
    _child(tcfg, parent, 1)
    callback.on_multirun_end(_sweep_config("multirun/ok"))
    got = _client(store).get_run(parent)
    assert got.info.status == "FINISHED" and got.info.run_name == "sweep-ok"
    assert got.data.params == {"sweep.overrides": "x=1,2 model=toy", "sweep.params.y": "a,b"}
    assert got.data.tags["purpose"] == "test" and got.data.tags["hydra.launcher"] == "some.Launcher"
    assert got.data.metrics == {
        "sweep.jobs_total": 2, "sweep.jobs_finished": 2, "sweep.jobs_failed": 0, "sweep.jobs_killed": 0,
    }


def test_sweep_parent_fails_and_reports_failed_and_orphaned_children(tcfg, store, capsys):
    callback, parent = _start_sweep(tcfg, "multirun/bad")
    _child(tcfg, parent, 0)
    _child(tcfg, parent, 1, fail=True)
    client = _client(store)
    experiment_id = client.get_run(parent).info.experiment_id
    # a worker that died (OOM, segfault) leaves its run RUNNING
    orphan = client.create_run(experiment_id, run_name="x=3", tags={"mlflow.parentRunId": parent, "hydra.job_num": "2"})
    callback.on_multirun_end(_sweep_config("multirun/bad"))
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.metrics["sweep.jobs_failed"] == 2
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert "without closing its run" in client.get_run(orphan.info.run_id).data.tags["error"]
    report = capsys.readouterr().err
    assert f"MLflow sweep run {parent}: 2 of 3 jobs did not finish" in report
    assert "#1 x=2: FAILED RuntimeError: planted" in report and "#2 x=3: FAILED" in report


def test_sweep_parent_of_an_aborted_sweep_is_failed(tcfg, store, capsys):
    callback, parent = _start_sweep(tcfg, "multirun/aborted")
    _child(tcfg, parent, 0)
    callback._close(sweep_completed=False)  # what the atexit hook does when Hydra re-raised a job error
    assert _client(store).get_run(parent).info.status == "FAILED"
    assert "the sweep stopped before completing" in capsys.readouterr().err
    callback.on_multirun_end(_sweep_config("multirun/aborted"))  # a second close is a no-op
    assert _client(store).get_run(parent).info.status == "FAILED"
