"""Where runs go: a tracking location that cannot be used fails at once, in one line, before MLflow
is asked anything; a good one is accepted and left as found; relative paths resolve against the
directory the command was launched from, also inside a Hydra job that moved into its output folder."""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from intraneuron.errors import ConfigError
from intraneuron.tracking import preflight
from intraneuron.tracking.hydra_job import launch_dir
from intraneuron.tracking.preflight import check_reachable
from intraneuron.tracking.store import TrackingConfig, open_experiment
from tests.test_tracking_preflight import no_retry_waits

REPO = Path(__file__).resolve().parents[1]
TOY_APP = REPO / "tests" / "toy_app" / "app.py"
WHERE_APP = REPO / "tests" / "toy_app" / "where.py"


def _rejected(tcfg: TrackingConfig, base_dir: Path, key: str = "tracking.tracking_uri") -> ConfigError:
    """The ConfigError that validation raises, checked to name `key` and to come without a retry's wait."""
    with no_retry_waits(), pytest.raises(ConfigError) as caught:
        tcfg.validate(base_dir)
    assert caught.value.key == key, str(caught.value)
    assert "\n" not in str(caught.value)
    return caught.value


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _free_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- importing


def test_importing_the_schema_loads_neither_mlflow_nor_hydra():
    code = (
        "import sys, intraneuron.tracking.store; "
        "print([m for m in sys.modules if m.split('.')[0] in ('mlflow', 'hydra', 'omegaconf')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_package_names_and_the_sweep_callback_target_resolve():
    import yaml
    from hydra.utils import get_class

    import intraneuron.tracking as tracking

    for name in tracking.__all__:
        assert getattr(tracking, name) is not None
    with pytest.raises(AttributeError):
        tracking.no_such_name  # noqa: B018
    wiring = yaml.safe_load((REPO / "conf" / "hydra" / "callbacks" / "mlflow_sweep.yaml").read_text())
    assert get_class(wiring["mlflow_sweep"]["_target_"]) is tracking.MlflowSweepCallback


# ---------------------------------------------------------------- sqlite


def test_sqlite_under_proc_is_rejected_in_one_line(tmp_path):
    error = _rejected(TrackingConfig("sqlite:////proc/x/m.db"), tmp_path)
    assert "/proc/x" in str(error)


def test_sqlite_under_a_regular_file_is_rejected(tmp_path):
    (tmp_path / "afile.txt").write_text("not a folder")
    error = _rejected(TrackingConfig(f"sqlite:///{tmp_path}/afile.txt/m.db"), tmp_path)
    assert "afile.txt is not a folder" in str(error)
    relative = _rejected(TrackingConfig("sqlite:///afile.txt/sub/m.db"), tmp_path)
    assert "afile.txt is not a folder" in str(relative)


def test_sqlite_in_a_folder_even_root_cannot_write_is_rejected(tmp_path):
    folder = Path("/sys/kernel")
    if not folder.is_dir():
        pytest.skip("no /sys/kernel on this system")
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        pass
    else:  # not the sysfs we know: leave it as found
        os.close(handle)
        os.unlink(probe)
        pytest.skip("/sys/kernel takes new files here")
    error = _rejected(TrackingConfig(f"sqlite:///{folder}/m.db"), tmp_path)
    assert f"cannot write in {folder}" in str(error)


def test_sqlite_on_a_read_only_file_system_is_rejected(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
    error = _rejected(TrackingConfig("sqlite:///runs/m.db"), tmp_path)
    assert "read-only file system" in str(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_sqlite_in_a_folder_without_write_permission_is_rejected(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _rejected(TrackingConfig("sqlite:///locked/m.db"), tmp_path)
    finally:
        locked.chmod(0o755)


def test_an_existing_database_path_must_be_a_sqlite_file(tmp_path):
    (tmp_path / "adir.db").mkdir()
    assert "not a regular file" in str(_rejected(TrackingConfig("sqlite:///adir.db"), tmp_path))
    (tmp_path / "notes.db").write_text("some notes")
    assert "not a SQLite database" in str(_rejected(TrackingConfig("sqlite:///notes.db"), tmp_path))
    (tmp_path / "empty.db").touch()  # sqlite initialises an empty file
    TrackingConfig("sqlite:///empty.db").validate(tmp_path)
    sqlite3.connect(tmp_path / "real.db").execute("create table t (x int)").connection.close()
    TrackingConfig("sqlite:///real.db").validate(tmp_path)


def test_a_good_sqlite_location_passes_and_creates_only_its_folder(tmp_path):
    with no_retry_waits():
        resolved = TrackingConfig("sqlite:///runs/db/mlflow.db", "e").validate(tmp_path)
    assert resolved.tracking_uri == f"sqlite:///{tmp_path.resolve()}/runs/db/mlflow.db"
    assert _tree(tmp_path) == {"runs", "runs/db"}  # no database, no artifact folder, no probe left


def test_validation_defaults_to_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch_dir() == tmp_path  # outside Hydra: the current directory
    resolved = TrackingConfig("sqlite:///mlruns/mlflow.db").validate()
    assert resolved.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()


# ---------------------------------------------------------------- artifact root


def test_an_artifact_root_that_cannot_be_created_is_rejected_by_name(tmp_path):
    (tmp_path / "afile.txt").write_text("not a folder")
    error = _rejected(
        TrackingConfig("sqlite:///m.db", artifact_root="afile.txt/art"), tmp_path, "tracking.artifact_root"
    )
    assert "afile.txt is not a folder" in str(error)
    _rejected(TrackingConfig("sqlite:///m.db", artifact_root="/proc/x/art"), tmp_path, "tracking.artifact_root")
    _rejected(
        TrackingConfig("sqlite:///m.db", artifact_root=f"file://{tmp_path}/afile.txt/art"),
        tmp_path, "tracking.artifact_root",
    )


def test_a_good_artifact_root_is_checked_but_not_created(tmp_path):
    TrackingConfig("sqlite:///db/m.db", artifact_root="art/deep").validate(tmp_path)
    assert _tree(tmp_path) == {"db"}
    # a remote store with a local artifact root: the root is still checked
    _rejected(
        TrackingConfig("postgresql://u@127.0.0.1/x", artifact_root="/proc/x/art"), tmp_path,
        "tracking.artifact_root",
    )


# ---------------------------------------------------------------- servers


def test_http_uri_without_a_server_is_rejected_in_one_line(tmp_path):
    port = _free_port()
    error = _rejected(TrackingConfig(f"http://127.0.0.1:{port}"), tmp_path)
    assert "a reachable MLflow server" in str(error) and "refused" in str(error)


def test_http_uri_with_a_healthy_server_passes(tmp_path):
    from tests.test_tracking_preflight import health_server

    with health_server(200) as url:
        check_reachable(TrackingConfig(url), tmp_path)
    assert _tree(tmp_path) == set()


def test_http_uri_with_a_silent_listener_is_refused(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:  # TCP accepted, never answered
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        error = _rejected(TrackingConfig(f"http://127.0.0.1:{port}"), tmp_path)
    assert f"no answer from http://127.0.0.1:{port}/health" in str(error)
    assert _tree(tmp_path) == set()


def test_a_server_that_does_not_answer_is_reported_as_timed_out(tmp_path, monkeypatch):
    timeouts: list[float] = []

    def silent(address, timeout=None, **kwargs):
        timeouts.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(preflight.socket, "create_connection", silent)
    error = _rejected(TrackingConfig("https://127.0.0.1"), tmp_path)
    assert "no answer from 127.0.0.1:443" in str(error)
    assert timeouts == [preflight.CONNECT_TIMEOUT_S] and preflight.CONNECT_TIMEOUT_S <= 3


@pytest.mark.parametrize("uri", ["http://127.0.0.1:notaport", "http:///nohost"])
def test_malformed_server_uris_are_rejected(uri, tmp_path):
    _rejected(TrackingConfig(uri), tmp_path)


def test_databricks_is_left_to_mlflow(tmp_path, monkeypatch):
    # database servers are checked too: tests/test_tracking_preflight.py
    def no_network(*args, **kwargs):
        raise AssertionError("no connection expected")

    monkeypatch.setattr(preflight.socket, "create_connection", no_network)
    check_reachable(TrackingConfig("databricks"), tmp_path)
    assert _tree(tmp_path) == set()


# ---------------------------------------------------------------- nothing reaches MLflow


def test_a_bad_location_fails_before_any_mlflow_client_exists(tmp_path, monkeypatch):
    import mlflow

    from intraneuron.tracking import tracked_run

    def no_client(*args, **kwargs):
        raise AssertionError("MlflowClient created for an unusable store")

    monkeypatch.setattr(mlflow, "MlflowClient", no_client)
    monkeypatch.chdir(tmp_path)
    bad = TrackingConfig(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        open_experiment(bad, tmp_path)
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        with tracked_run(bad, run_name="never"):
            raise AssertionError("the run body must not start")


# ---------------------------------------------------------------- real Hydra processes


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_launch_dir_inside_a_hydra_job_that_moved_into_its_output_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(WHERE_APP), "hydra.job.chdir=true", "hydra.run.dir=outputs/job"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["cwd"]) == tmp_path / "outputs" / "job"  # the job did move
    assert Path(seen["launch_dir"]) == tmp_path
    assert seen["tracking_uri"] == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    assert (tmp_path / "store").is_dir() and not (tmp_path / "outputs" / "job" / "store").exists()


def test_a_sweep_against_an_unusable_store_stops_at_once_in_one_line(tmp_path):
    (tmp_path / "afile.txt").write_text("not a folder")
    done = subprocess.run(
        [
            sys.executable, str(TOY_APP), "--multirun", "x=1,2",
            f"hydra.searchpath=[file://{REPO / 'conf'}]",
            "tracking.tracking_uri=sqlite:///afile.txt/mlflow.db",
        ],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ConfigError: tracking.tracking_uri="), done.stderr
    assert "Launching" not in done.stdout + done.stderr  # no job started
    assert _tree(tmp_path) == {"afile.txt"}  # no sweep folder, no store
