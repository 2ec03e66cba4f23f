"""Scale-out end to end: 4-job multiruns of the tiny model through the Ray launcher (a real local Ray
cluster) and the submitit launcher (local executor), tracked by an `mlflow server` on a real
PostgreSQL server; everything on 127.0.0.1, every server stopped by process id.

    pytest -m slow tests/test_scale_out.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from intraneuron.tracking.server import LocalMlflowServer, group_alive, pid_alive
from tests.servers import (
    LocalPostgres,
    LocalRayCluster,
    distinct_free_ports,
    worker_port_band,
)
from tests.test_runner import BASE

pytestmark = pytest.mark.slow

PARENT = "mlflow.parentRunId"
# 2 x 2 = 4 jobs; layer 2 exists in the 3-layer tiny model (k-means by silhouette: the quick one)
SWEEP = ["clustering=ward,kmeans_silhouette", "layer=0,2"]


def launch(cwd: Path, experiment: str, tracking_uri: str, *overrides: str, env: dict[str, str]):
    """`python -m intraneuron --multirun` of the 4-job sweep in `cwd`, its sweep folder absolute."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_", "RAY_"))
    }
    environment.update(env)
    command = [
        sys.executable, "-m", "intraneuron", "--multirun", *BASE, *SWEEP, *overrides,
        f"hydra.sweep.dir={cwd / 'multirun'}", f"tracking.tracking_uri={tracking_uri}",
        f"tracking.experiment={experiment}", "tracking.system_metrics=false",
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache root for the jobs of both sweeps (the tiny model's windows are built once)."""
    return tmp_path_factory.mktemp("scale_cache")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """An `mlflow server` on a PostgreSQL database, for the module."""
    root = tmp_path_factory.mktemp("tracker")
    with LocalPostgres() as db_uri:
        server = LocalMlflowServer(
            db_uri, root / "artifacts", root / "mlflow-server.log", start_timeout=300
        )
        try:
            server.start()
            yield server
        finally:
            server.stop()
        assert not pid_alive(server.pid) and not group_alive(server.pid)


def read_sweep(server: LocalMlflowServer, experiment: str):
    client = MlflowClient(server.url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server"
    runs = client.search_runs([found.experiment_id], max_results=100)
    parents = [r for r in runs if PARENT not in r.data.tags]
    children = [r for r in runs if PARENT in r.data.tags]
    return parents, children


def check_sweep(server: LocalMlflowServer, experiment: str, done, launcher_target: str) -> None:
    assert done.returncode == 0, done.stderr[-4000:]
    parents, children = read_sweep(server, experiment)
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hydra.launcher"] == launcher_target
    assert (
        parent.data.metrics["sweep.jobs_total"] == 4
        and parent.data.metrics["sweep.jobs_finished"] == 4
    )
    assert len(children) == 4
    assert {c.data.tags[PARENT] for c in children} == {parent.info.run_id}
    assert [c.info.status for c in children] == ["FINISHED"] * 4, [
        c.data.tags.get("error") for c in children
    ]
    assert sorted(int(c.data.tags["hydra.job_num"]) for c in children) == [0, 1, 2, 3]
    assert sorted((c.data.params["layer"], c.data.params["clustering.estimator._target_"]) for c in children) == [
        ("0", "sklearn.cluster.AgglomerativeClustering"), ("0", "sklearn.cluster.KMeans"),
        ("2", "sklearn.cluster.AgglomerativeClustering"), ("2", "sklearn.cluster.KMeans"),
    ]  # fmt: skip
    for child in children:
        layer = int(child.data.params["layer"])
        headline = child.data.tags["intraneuron.headline"].split(",")
        assert headline and all(f"L{layer}/{name}" in child.data.metrics for name in headline)
        assert 0 <= child.data.metrics[f"L{layer}/top_segment_homogeneous_frac"] <= 1


def check_job_folders(sweep_dir: Path) -> None:
    """Each job's output folder is inside the sweep folder, next to the parent run id."""
    assert (sweep_dir / "mlflow_parent_run_id").is_file()
    for num in range(4):
        assert (sweep_dir / str(num) / "mlflow_run.json").is_file(), sorted(
            p.name for p in sweep_dir.iterdir()
        )


def test_ray_launcher_sweep_on_a_local_cluster(tracker, cache, tmp_path):
    cwd = tmp_path
    with LocalRayCluster(num_cpus=2, env={"INTRANEURON_CACHE": str(cache)}) as cluster:
        done = launch(cwd, "ray", tracker.url, "hydra/launcher=ray",
                      env={**cluster.driver_env(), "INTRANEURON_CACHE": str(cache)})  # fmt: skip
        processes = cluster._processes()
    assert processes and not [
        p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not pid_alive(cluster.pid)
    check_sweep(tracker, "ray", done, "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher")
    assert (
        f"Connecting to existing Ray cluster at address: {cluster.address}"
        in done.stderr + done.stdout
    )
    check_job_folders(cwd / "multirun")


def test_submitit_local_launcher_sweep(tracker, cache, tmp_path):
    cwd = tmp_path
    done = launch(
        cwd, "submitit", tracker.url, "hydra/launcher=local", env={"INTRANEURON_CACHE": str(cache)}
    )
    check_sweep(
        tracker,
        "submitit",
        done,
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    )
    check_job_folders(cwd / "multirun")
    assert len(list((cwd / "multirun" / ".submitit").iterdir())) >= 4  # one submitit folder per job


def test_local_postgres_accepts_connections_and_stops_by_pid():
    import psycopg

    server = LocalPostgres("probe")
    with server as uri:
        assert uri.startswith("postgresql+psycopg://postgres@127.0.0.1:") and uri.endswith("/probe")
        with psycopg.connect(server.conninfo()) as connection:
            assert connection.execute("SELECT current_database()").fetchone() == ("probe",)
        backends = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        assert backends
    assert server.process.returncode is not None and not pid_alive(server.pid)
    assert not [pid for pid in backends if pid_alive(pid)]
    assert not server.root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.conninfo("postgres"))


def test_ray_ports_are_distinct_and_outside_the_workers_band():
    """A cluster once failed to start: its GCS port, 33333, fell in the band given to its workers."""
    ports = distinct_free_ports(10)
    assert len(set(ports)) == 10
    low, high = worker_port_band({33333, *ports})
    band = set(range(low, high + 1))
    assert len(band) == 100 and band.isdisjoint({33333, *ports})
    # every candidate band but one taken: that one is found
    crowded = {port for port in range(10000, 32768) if not 20000 <= port < 20100}
    assert worker_port_band(crowded) == (20000, 20099)


def test_local_ray_cluster_runs_a_task_and_stops_by_pid(tmp_path):
    # on a machine where Ray ran before: a token file that neither the cluster nor its driver may use
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a-token-of-another-cluster")
    home = {"HOME": str(tmp_path)}
    cluster = LocalRayCluster(num_cpus=1, env=home)
    with cluster:
        script = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 41 + 1).remote()))"
        done = subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, **home, **cluster.driver_env()},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        processes = cluster._processes()
        names = {p.name() for p in processes}
    assert done.returncode == 0 and done.stdout.strip().endswith("42"), done.stderr[-3000:]
    assert {"raylet", "gcs_server"} <= names
    assert not pid_alive(cluster.pid)
    assert not [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not cluster.temp_dir.exists()
