"""A job killed with SIGKILL (OOM killer, `kill -9`, a lost node) cannot close its MLflow run; the
run's host and PID tags let `intraneuron stale --mark` find it RUNNING with its process gone and
end it KILLED, while runs of live processes and of other hosts are left alone; the rerun completes."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from mlflow import MlflowClient

from intraneuron.commands import main as commands_main
from tests.test_faults import rerun_completes, start_slow_job, wait_for_extraction


def test_sigkilled_job_is_found_stale_and_marked_killed(tmp_path: Path, capsys):
    job, uri = start_slow_job(tmp_path)
    try:
        run = wait_for_extraction(job, MlflowClient(uri), tmp_path)
        os.killpg(job.pid, signal.SIGKILL)  # no handler runs: the run stays RUNNING
        job.communicate(timeout=60)  # reaped: its PID no longer answers os.kill(pid, 0)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    client = MlflowClient(uri)
    run_id = run.info.run_id
    assert run.data.tags["intraneuron.host"] == socket.gethostname()
    assert run.data.tags["intraneuron.pid"] == str(job.pid)
    assert client.get_run(run_id).info.status == "RUNNING"

    # a RUNNING run of a live process (this one), and one of another host
    experiment_id = run.info.experiment_id
    alive = client.create_run(experiment_id, run_name="alive", tags={
        "intraneuron.host": socket.gethostname(), "intraneuron.pid": str(os.getpid())}).info.run_id
    elsewhere = client.create_run(experiment_id, run_name="elsewhere", tags={
        "intraneuron.host": "some-other-host.invalid", "intraneuron.pid": str(job.pid)}).info.run_id

    capsys.readouterr()
    assert commands_main(["stale", "--tracking-uri", uri]) == 0  # lists only
    listed = capsys.readouterr().out
    assert f"gone     {run_id}" in listed and f"running  {alive}" in listed and f"unknown  {elsewhere}" in listed
    assert client.get_run(run_id).info.status == "RUNNING"

    assert commands_main(["stale", "--tracking-uri", uri, "--experiment", "intraneuron", "--mark"]) == 0
    out = capsys.readouterr().out
    assert "3 RUNNING runs" in out and "1 marked KILLED" in out, out
    ended = client.get_run(run_id)
    reason = f"process {job.pid} on {socket.gethostname()} is gone (killed without a chance to close the run)"
    assert ended.info.status == "KILLED"
    assert ended.data.tags["mlflow.note.content"] == reason
    assert ended.data.tags["error"] == reason
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"
    rerun_completes(tmp_path)  # nothing the killed pass left in the cache is trusted


def test_stale_names_an_unknown_experiment_in_one_line(tmp_path: Path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # create the store
    capsys.readouterr()
    assert commands_main(["stale", "--tracking-uri", uri, "--experiment", "nope"]) == 1
    assert capsys.readouterr().err.strip() == f"intraneuron stale: no experiment 'nope' in {uri}"
