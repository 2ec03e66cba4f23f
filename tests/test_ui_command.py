"""`intraneuron ui`: MLflow's web UI over the project's default store, started as a user starts it
(a subprocess in the project folder), read over HTTP on 127.0.0.1 and stopped with Ctrl-C (SIGINT).

The store is a temporary sqlite `mlruns/mlflow.db` holding an experiment from before the saved
view. Every process of the server must be gone afterwards, checked by process id.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import psutil
import pytest
from mlflow import MlflowClient

from intraneuron.reports.artifacts import HEADLINE_TAG
from intraneuron.tracking.server import free_port, pid_alive
from intraneuron.tracking.view import VIEW_TAG

START_LIMIT = 600  # seconds: `mlflow server` on two busy cores has taken minutes
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1


def start_ui(cwd, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.Popen(
        [sys.executable, "-m", "intraneuron", "ui", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def printed_lines(process: subprocess.Popen) -> queue.Queue:
    """The process's stdout, line by line, read by a thread (None once it is closed)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.fixture
def project(tmp_path) -> tuple:
    """A project folder whose default store holds one experiment with one run, made before the
    saved view existed: (folder, experiment id)."""
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment_id = client.create_experiment("first-hour", artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    run_id = client.create_run(experiment_id, tags={HEADLINE_TAG: "frac"}).info.run_id
    client.log_metric(run_id, "L0/frac", 0.5)
    client.set_terminated(run_id)
    return tmp_path, experiment_id


def test_ui_serves_the_store_prints_the_saved_view_and_stops_whole_on_ctrl_c(project):
    cwd, experiment_id = project
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    expected = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
    process, server = start_ui(cwd, "--port", str(port)), []
    try:
        lines, links = printed_lines(process), {}
        while len(links) < 2:
            line = lines.get(timeout=START_LIMIT)
            assert line is not None, f"intraneuron ui ended with {process.wait()}: {process.stderr.read()}"
            if line.startswith("  experiment "):
                name, link = line.removeprefix("  experiment ").split(": ", 1)
                links[name] = link
        link = links["'first-hour'"]
        assert link.startswith(expected)
        # MLflow's own empty experiment is not the project's: no view is written into it
        assert links["'Default'"] == f"{base}/#/experiments/0/runs?workflowType=machine_learning"

        with _HTTP.open(f"{base}/health", timeout=30) as response:
            assert response.status == 200 and response.read() == b"OK"
        with _HTTP.open(link, timeout=30) as response:  # the UI's page; the view is in the fragment
            assert response.status == 200 and b"<!doctype html>" in response.read().lower()
        client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
        state = json.loads(json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG])["state"])
        assert state["orderByKey"] == "metrics.`L0/frac`"  # brought up to date by `ui`
        assert VIEW_TAG not in client.get_experiment("0").tags

        server = psutil.Process(process.pid).children(recursive=True)
        assert len(server) >= 2, "no mlflow server and worker under intraneuron ui"  # server, uvicorn
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
        assert "stopped by Ctrl-C (SIGINT); mlflow server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:  # a failed assertion: SIGTERM still stops the server with it
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    psutil.wait_procs(server, timeout=30)
    assert not [p.pid for p in server if pid_alive(p.pid)]
    with pytest.raises(urllib.error.URLError):
        _HTTP.open(f"{base}/health", timeout=5)


def test_a_bad_port_or_a_missing_store_is_one_line_before_anything_starts(project):
    cwd, _ = project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = {
            ("--port", "0"): "intraneuron ui: --port=0 is not allowed: expected a TCP port from 1 to 65535",
            ("--port", str(busy)): f"intraneuron ui: --port={busy} is not allowed: expected a free port on 127.0.0.1",
            ("--tracking-uri", "sqlite:///nowhere/mlflow.db"): f"intraneuron ui: no MLflow store at {cwd}/nowhere/mlflow.db",
        }  # fmt: skip
        for args, message in cases.items():
            process = start_ui(cwd, *args)
            out, err = process.communicate(timeout=300)
            assert process.returncode == 1, (args, out, err)
            assert err.startswith(message) and err.count("\n") == 1, err
            assert "starting mlflow server" not in out
