"""The tracking location is checked in seconds, with one line naming `tracking.tracking_uri`, before
MLflow's own retry loops (minutes) or a missing driver's traceback, for jobs and for the read-back
commands alike; and a copied or moved project never writes its artifacts into the tree it came from."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def no_retry_waits() -> Iterator[None]:
    """Fails the block if it sleeps in this thread: the back-off of a retry loop (MLflow's REST and
    database clients, urllib3's), which is what turns a bad tracking location into minutes."""
    caller, sleep = threading.get_ident(), time.sleep

    def tripwire(seconds: float) -> None:
        if threading.get_ident() == caller:
            pytest.fail(f"waited {seconds} s in a retry loop instead of failing at once")
        sleep(seconds)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "sleep", tripwire)
        yield


@contextlib.contextmanager
def connection_attempts() -> Iterator[list[dict]]:
    """The keyword arguments of each connection that psycopg is asked for in the block."""
    import psycopg

    attempts: list[dict] = []
    connect = psycopg.connect

    def recorded(*args, **kwargs):
        attempts.append(kwargs)
        return connect(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, no_retry_waits():
        patch.setattr(psycopg, "connect", recorded)
        yield attempts


def test_a_database_that_refuses_is_reported_at_once(tmp_path):
    port = free_port()  # nothing listens there
    with connection_attempts() as attempts:
        error = _error(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow", tmp_path)
    assert "accepts a connection" in str(error) and str(port) in str(error)
    assert len(attempts) == 1  # one try, no retries


def test_a_database_that_never_answers_times_out_after_the_connect_timeout(tmp_path):
    with socket.socket() as silent:  # accepts TCP (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with connection_attempts() as attempts:
            error = _error(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow", tmp_path)
    assert "timeout" in str(error).lower()
    # one try, bounded by the driver's own timeout rather than by MLflow's retries
    assert [a.get("connect_timeout") for a in attempts] == [int(CONNECT_TIMEOUT_S)]


Answer = tuple[int, str, bytes]  # status, content type, body
MLFLOW_API = "/api/2.0/mlflow/"
NO_EXPERIMENTS: Answer = (200, "application/json", b'{"experiments": []}')  # what MLflow's API answers


@contextlib.contextmanager
def web_server(answer: Callable[[http.server.BaseHTTPRequestHandler], Answer]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering every GET with `answer(request)`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status, content_type, body = answer(self)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with _serving(Handler) as url:
        yield url


@contextlib.contextmanager
def plain_web_server(folder: Path) -> Iterator[str]:
    """Python's own static file server (http.server) for `folder`: a web server that is not MLflow."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with _serving(functools.partial(Quiet, directory=str(folder))) as url:
        yield url


@contextlib.contextmanager
def _serving(handler) -> Iterator[str]:
    """`handler` served on 127.0.0.1 at a free port, in a thread, until the block ends; yields the URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def health_server(status: int) -> Iterator[str]:
    """A stand-in for an `mlflow server` whose /health answers `status` and whose API answers like MLflow's."""

    def answer(request) -> Answer:
        if request.path == "/health":
            return status, "text/plain", b"OK"
        return NO_EXPERIMENTS if request.path.startswith(MLFLOW_API) else (404, "text/html", b"Not Found")

    with web_server(answer) as url:
        yield url


def test_a_server_whose_health_fails_is_refused(tmp_path):
    with health_server(503) as url:
        error = _error(url, tmp_path)
    assert "503" in str(error) and "/health" in str(error)


def test_a_web_server_that_is_not_mlflow_is_refused_and_mlflow_s_own_answers_pass(tmp_path):
    """MLflow's client fails against another web server with a long traceback: the answer of MLflow's
    API tells them apart. MLflow's JSON errors, and an auth layer's 401 / 403, are MLflow's to say."""
    with plain_web_server(tmp_path) as url:
        error = _error(url, tmp_path)
    assert f"{url}{MLFLOW_API}" in str(error) and "answered 404" in str(error) and "not MLflow's JSON" in str(error)
    refused = [
        (200, "text/html", b"<html>a page for every path</html>"),
        (200, "application/json", b"[1, 2]"),
        (404, "application/json", b'{"detail": "Not Found"}'),
    ]
    for answer in refused:
        with web_server(lambda request, answer=answer: answer) as url:
            assert "not MLflow's JSON" in str(_error(url, tmp_path)), answer
    accepted = [
        NO_EXPERIMENTS,
        (404, "application/json", b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "No API"}'),
        (401, "text/html", b"Unauthorized"),
        (403, "text/html", b"Forbidden"),
    ]
    for answer in accepted:
        with web_server(lambda request, answer=answer: answer) as url:
            check_reachable(TrackingConfig(url), tmp_path)


def test_a_user_and_password_in_the_uri_go_to_the_server_as_basic_auth_and_are_never_printed(tmp_path):
    expected = "Basic " + base64.b64encode(b"ana:s3cret").decode()

    def answer(request) -> Answer:  # a server that only answers its user, like MLflow's client sends it
        if request.headers.get("Authorization") != expected:
            return 404, "text/html", b"who are you?"
        return NO_EXPERIMENTS if request.path.startswith(MLFLOW_API) else (200, "text/plain", b"OK")

    with web_server(answer) as url:
        check_reachable(TrackingConfig(url.replace("http://", "http://ana:s3cret@")), tmp_path)
    with plain_web_server(tmp_path) as url:
        error = _error(url.replace("http://", "http://ana:s3cret@"), tmp_path)
    assert error.value == url.replace("http://", "http://ana:***@")
    assert "not MLflow's JSON" in str(error) and "s3cret" not in str(error)


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


def test_a_job_against_a_web_server_that_is_not_mlflow_prints_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    with plain_web_server(tmp_path) as url:
        done = subprocess.run(
            [sys.executable, "-m", "intraneuron", "model=tiny-gpt2", "corpus=tiny", f"tracking.tracking_uri={url}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("ConfigError: ")]  # Hydra frames it
    assert line.startswith(f"ConfigError: tracking.tracking_uri='{url}'") and "not MLflow's JSON" in line


# ---------------------------------------------------------------- the read-back commands

RUN_ID = "0123456789abcdef0123456789abcdef"
READ_BACK = [["show", RUN_ID], ["compare", RUN_ID], ["stale"], ["stale", "--mark"], ["merge", RUN_ID]]


def _command(argv: list[str], cwd: Path) -> str:
    """Run `intraneuron <argv>`: it must fail with one line on stderr, which is returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    # the timeout is no measurement: MLflow's client retrying a server that is down hangs for minutes
    done = subprocess.run([sys.executable, "-m", "intraneuron", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"intraneuron {argv[0]}: tracking.tracking_uri=")
    return lines[0]


@pytest.mark.parametrize("argv", READ_BACK, ids=" ".join)
def test_a_read_back_command_against_a_server_that_is_down_says_so_in_one_line(argv, tmp_path):
    port = free_port()  # nothing listens there
    line = _command([*argv, "--tracking-uri", f"http://ana:s3cret@127.0.0.1:{port}"], tmp_path)
    assert f"='http://ana:***@127.0.0.1:{port}'" in line and "s3cret" not in line
    assert f"connection to 127.0.0.1:{port} refused" in line and "`mlflow server` runs there" in line


@pytest.mark.parametrize("argv", READ_BACK, ids=" ".join)
def test_a_read_back_command_against_a_web_server_that_is_not_mlflow_says_so_in_one_line(argv, tmp_path):
    (tmp_path / "index.html").write_text("<html>a web site</html>")
    with plain_web_server(tmp_path) as url:
        line = _command([*argv, "--tracking-uri", url], tmp_path)
    assert f"='{url}'" in line and "not MLflow's JSON" in line


@pytest.mark.parametrize("argv", READ_BACK, ids=" ".join)
def test_a_read_back_command_on_a_file_that_is_not_a_database_says_so_in_one_line(argv, tmp_path):
    (tmp_path / "mlflow.db").write_text("some notes")
    line = _command([*argv, "--tracking-uri", "sqlite:///mlflow.db"], tmp_path)
    assert f"{tmp_path / 'mlflow.db'} is not a SQLite database" in line


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
