"""The tracking location is checked in seconds, with one line naming `tracking.tracking_uri`, before
MLflow's own retry loops (minutes) or a missing driver's traceback; and a copied or moved project
never writes its artifacts into the tree it came from."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from intraneuron.errors import ConfigError
from intraneuron.tracking.preflight import CONNECT_TIMEOUT_S, check_reachable
from intraneuron.tracking.run import tracked_run
from intraneuron.tracking.server import free_port
from intraneuron.tracking.store import TrackingConfig, open_experiment


def _error(uri: str, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_reachable(TrackingConfig(tracking_uri=uri), tmp_path)
    assert caught.value.key == "tracking.tracking_uri"
    assert "\n" not in str(caught.value)
    return caught.value


def test_a_missing_database_driver_is_one_line_naming_the_installed_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    error = _error("postgresql+psycopg://mlflow:secret@127.0.0.1:5432/mlflow", tmp_path)
    assert "needs psycopg" in str(error) and "make setup" in str(error)
    assert "secret" not in str(error)  # the password is not printed
    error = _error("postgresql+nosuchdriver://127.0.0.1/mlflow", tmp_path)
    assert "nosuchdriver" in str(error)


def test_a_database_that_refuses_is_reported_at_once(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    error = _error(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow", tmp_path)
    assert "accepts a connection" in str(error) and str(port) in str(error)
    assert time.monotonic() - started < 10 * CONNECT_TIMEOUT_S  # a bound against minutes of retries


def test_a_database_that_never_answers_times_out_after_the_connect_timeout(tmp_path):
    with socket.socket() as silent:  # accepts TCP (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        error = _error(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow", tmp_path)
        elapsed = time.monotonic() - started
    assert "timeout" in str(error).lower()
    assert CONNECT_TIMEOUT_S - 0.5 <= elapsed < 10 * CONNECT_TIMEOUT_S


@contextlib.contextmanager
def health_server(status: int) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 whose /health answers `status`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_whose_health_fails_is_refused(tmp_path):
    with health_server(503) as url:
        error = _error(url, tmp_path)
    assert "503" in str(error) and "/health" in str(error)


def test_the_cli_prints_one_line_and_starts_no_run(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    done = subprocess.run(
        [sys.executable, "-m", "intraneuron", "model=tiny-gpt2", "corpus=tiny",
         f"tracking.tracking_uri=postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "ConfigError: tracking.tracking_uri=" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


# ---------------------------------------------------------------- a copied project


def _log_one_run(project: Path, experiment: str = "copied") -> str:
    tcfg = TrackingConfig(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", experiment=experiment,
                          system_metrics=False)  # fmt: skip
    with tracked_run(tcfg, run_name="one") as run:
        run.log_text("hello", "note.txt")
        return run.run_id


def _files(tree: Path) -> dict[str, float]:
    return {str(p.relative_to(tree)): p.stat().st_mtime for p in tree.rglob("*") if p.is_file()}


def test_a_copied_project_is_refused_before_writing_into_the_original(tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    _log_one_run(original)
    shutil.copytree(original, copy)
    before = _files(original)
    with pytest.raises(ConfigError) as caught:
        _log_one_run(copy)
    # named by the experiment and its name: tracking.artifact_root is unset, its value says nothing
    assert (caught.value.key, caught.value.value) == ("tracking.experiment", "copied")
    message = str(caught.value)
    assert message.startswith("tracking.experiment='copied' is not allowed") and "None" not in message
    assert "copy of" in message and f"tracking.artifact_root={original / 'mlruns' / 'artifacts'})" in message
    assert _files(original) == before  # nothing written there, not even a run row
    # a new experiment in the copy writes into the copy
    run_id = _log_one_run(copy, experiment="here")
    assert (copy / "mlruns" / "artifacts" / "here").is_dir()
    assert list((copy / "mlruns" / "artifacts" / "here").rglob("note.txt"))
    assert _files(original) == before
    # writing to the original's folder on purpose is allowed
    tcfg = TrackingConfig(tracking_uri=f"sqlite:///{copy / 'mlruns' / 'mlflow.db'}", experiment="copied",
                          artifact_root=str(original / "mlruns" / "artifacts"))  # fmt: skip
    open_experiment(tcfg, copy)
    assert run_id


def test_a_moved_project_is_refused(tmp_path):
    original, moved = tmp_path / "original", tmp_path / "moved"
    _log_one_run(original)
    shutil.move(original, moved)
    with pytest.raises(ConfigError, match="moved from"):
        _log_one_run(moved)
