"""A local `mlflow server` over an existing store, for as long as a `with` block needs it.

For `intraneuron ui`, for tests that read a store over HTTP the way the UI and remote clients do,
and for screenshots of the UI. The server listens on 127.0.0.1 only, on a free port unless given
one, and runs in its own process group (it spawns its uvicorn worker): stopping it signals the
whole group and checks that no process of it is left. No mlflow import here: the server is
`python -m mlflow server` of this interpreter.

Settings that come up on a busy machine: one worker (`mlflow ui`'s default of four puts uvicorn's
supervisor in charge, which kills a worker that does not answer its health check within 5 s, as
one importing MLflow on two busy cores may not, and starts another: start-up never ends) and no job
runner process. Uvicorn waits at most GRACE seconds for open connections (a browser's) on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT = 60.0  # seconds for the server to answer /health
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL, and for the processes to be gone
GRACE = 3  # seconds uvicorn lets open requests finish after SIGTERM
HOST = "127.0.0.1"

# Requests go straight to 127.0.0.1, whatever proxy the environment names.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a reused id)
        return True
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalMlflowServer:
    """`mlflow server` on 127.0.0.1 over `backend_uri` (e.g. sqlite:////abs/mlflow.db).

    Runs whose artifact location is a local path are listed and served from that path; proxied
    uploads would go to `artifacts_dir` (pass the store's own artifact folder, so nothing is
    written elsewhere; None: MLflow's default, ./mlartifacts of `cwd`). The server's output goes to
    `log_path` (a temporary file, removed on stop, when None); its tail is in the error when it
    fails to start. `port`: where to listen (default: a free port).

        with LocalMlflowServer("sqlite:////data/mlflow.db", Path("/data/artifacts")) as server:
            urllib.request.urlopen(f"{server.url}/health")
    """

    def __init__(
        self,
        backend_uri: str,
        artifacts_dir: str | Path | None,
        log_path: str | Path | None = None,
        *,
        cwd: str | Path | None = None,
        port: int | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ):
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else None
        self._own_log = log_path is None
        self.log = Path(log_path) if log_path is not None else None
        if cwd is None:
            cwd = self.artifacts_dir.parent if self.artifacts_dir is not None else Path.cwd()
        self.cwd = Path(cwd)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.process: subprocess.Popen | None = None
        self._chosen_port = port
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the mlflow server is not started")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group's id."""
        if self.process is None:
            raise RuntimeError("the mlflow server is not started")
        return self.process.pid

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalMlflowServer:
        """Start the server and return once /health answers (stopping it again if it does not)."""
        if self.process is not None:
            raise RuntimeError("the mlflow server is already started")
        if self.log is None:
            handle, name = tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")
            os.close(handle)
            self.log = Path(name)
        self.port = self._chosen_port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # no job runner: the server and its one worker are the only processes
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        artifacts = [] if self.artifacts_dir is None else [
            "--default-artifact-root", str(self.artifacts_dir), "--artifacts-destination", str(self.artifacts_dir)]
        command = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
            "--serve-artifacts", *artifacts, "--host", HOST, "--port", str(self.port), "--workers", "1",
            "--uvicorn-opts", f"--timeout-graceful-shutdown {GRACE}",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return (
            self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with _HTTP.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mlflow server not healthy within {self.start_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL if any of it is left after a timeout. Returns once
        the server is reaped and no process of its group is left; raises if one still is."""
        if self.process is None:
            return
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if self._gone():
                    return
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    pass
                if self._wait_gone(self.stop_timeout):
                    return
            raise RuntimeError(f"mlflow server (process group {self.pid}) outlived SIGKILL")
        finally:
            if self._own_log and self.log is not None:
                self.log.unlink(missing_ok=True)

    def _gone(self) -> bool:
        return self.process.poll() is not None and not group_alive(self.pid)

    def _wait_gone(self, timeout: float) -> bool:
        # the workers are reaped by the server (or, if orphaned, by init)
        deadline = time.monotonic() + timeout
        while not self._gone():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
