"""A job killed with SIGTERM (`kill`, a scheduler cancelling it) or stopped with Ctrl-C mid-extraction
ends its MLflow run KILLED with the reason, instead of leaving it RUNNING forever, exits as a shell
expects (128 + the signal) with one line and no traceback, and leaves no cache entry behind; the
rerun completes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

WAIT = 120.0  # seconds for the job to start its pass; the pass itself takes far longer


SLOW_JOB = ["model=tiny-gpt2", "corpus=gutenberg", "layer=2", "extraction.progress=false", "report=none",
            "extraction.pseudo_neurons=256",  # its pass as before the default became 2,048
            "tracking.system_metrics=false"]  # fmt: skip


def _job(folder: Path, *overrides: str) -> tuple[list[str], dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["INTRANEURON_CACHE"] = str(folder / "cache")  # the Debian texts are still found in the project
    uri = f"sqlite:///{folder}/mlflow.db"
    command = [sys.executable, "-m", "intraneuron", *SLOW_JOB, *overrides, f"tracking.tracking_uri={uri}"]
    return command, env, uri


def start_slow_job(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real job in its own process group whose extraction pass takes tens of seconds at least (the
    whole default corpus through the tiny model, one window per batch), and its store's URI."""
    command, env, uri = _job(folder, "extraction.batch_size=1")
    job = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    return job, uri


def rerun_completes(folder: Path) -> None:
    """The same job again (larger batches: how it runs, not what it computes) ends FINISHED, from a
    cache that trusted nothing the killed job left: complete entries with their manifests, one per
    corpus block (the corpus intervals' `analysis.interval_blocks`) and one for their merge."""
    from omegaconf import OmegaConf

    from intraneuron.paths import CONF_DIR

    blocks = OmegaConf.load(CONF_DIR / "analysis" / "two_fold.yaml").interval_blocks
    command, env, uri = _job(folder, "extraction.batch_size=32", "analysis.n_permutations=19",
                            "analysis.max_permutations=19", "analysis.n_mantel_permutations=19")
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    latest = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()], order_by=["attributes.start_time DESC"]
    )[0]
    assert latest.info.status == "FINISHED"
    entries = [p for p in (folder / "cache" / "profiles").iterdir() if not p.name.startswith(".")]
    assert len(entries) == blocks + 1 and all((e / "manifest.json").is_file() for e in entries), entries


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_mid_extraction_marks_the_run_killed(tmp_path: Path, signum):
    job, uri = start_slow_job(tmp_path)
    try:
        run = wait_for_extraction(job, MlflowClient(uri), tmp_path)
        os.kill(job.pid, signum)
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 128 + signum, output[-2000:]  # as a shell reports a job stopped by it
    cause = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    said = f"intraneuron: stopped by {cause}; its MLflow run {run.info.run_id} is marked KILLED\n"
    assert "Traceback" not in output and said in output, output[-2000:]
    ended = MlflowClient(uri).get_run(run.info.run_id)
    assert ended.info.status == "KILLED", output[-2000:]
    if signum == signal.SIGTERM:
        assert "SIGTERM" in ended.data.tags.get("mlflow.note.content", "") + ended.data.tags.get("error", "")
    profiles = tmp_path / "cache" / "profiles"  # at most corpus blocks the pass finished, each complete
    left = [p for p in profiles.iterdir() if not p.name.startswith(".")] if profiles.exists() else []
    assert all((p / "manifest.json").is_file() for p in left), left
    if signum == signal.SIGTERM:
        rerun_completes(tmp_path)


def test_ctrl_c_before_the_run_exists_claims_no_killed_run(tmp_path: Path):
    command, env, uri = _job(tmp_path)
    gate = tmp_path / "mlflow.db.init-lock"  # the store's first-connection lock, taken before any run
    with gate.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the job waits on it in open_experiment, its run not created
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
        try:
            wait_for_open_file(job, gate)
            os.kill(job.pid, signal.SIGINT)
            output, _ = job.communicate(timeout=60)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    assert job.returncode == 130, output[-2000:]
    assert output.endswith("intraneuron: stopped by Ctrl-C (SIGINT)\n"), output[-2000:]
    assert "KILLED" not in output and "Traceback" not in output, output[-2000:]
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_sigterm_to_a_multirun_ends_its_parent_run_and_running_jobs_killed(tmp_path: Path):
    # joblib with 2 processes (1 runs the jobs in-process): the launching process only waits on workers
    command, env, uri = _job(tmp_path, "layer=0,1", "extraction.batch_size=1", "hydra/launcher=parallel",
                             "hydra.launcher.n_jobs=2")  # fmt: skip
    log = tmp_path / "sweep.log"  # a file, not a pipe: the workers would hold a pipe open after the sweep
    with log.open("w") as out:
        sweep = subprocess.Popen([*command[:3], "--multirun", *command[3:]], cwd=tmp_path, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        client, parent, child = wait_for_sweep(sweep, uri, tmp_path)
        os.kill(sweep.pid, signal.SIGTERM)
        sweep.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)  # the workers too, whatever became of them
        sweep.wait()
    output = log.read_text()
    ended = client.get_run(parent.info.run_id)
    assert ended.info.status == "KILLED", output[-3000:]
    assert sweep.returncode == 143, output[-3000:]
    assert "intraneuron: stopped by SIGTERM\n" in output, output[-3000:]
    assert ended.data.tags["error"] == "the sweep was stopped by SIGTERM"
    assert f"MLflow sweep run {parent.info.run_id}: the sweep was stopped by SIGTERM and is marked KILLED" in output
    assert client.get_run(child.info.run_id).info.status == "KILLED"


def wait_for_sweep(sweep: subprocess.Popen, uri: str, folder: Path):
    """A client of the sweep's store, its parent run and its first job's run, once that job is RUNNING."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed: {(folder / 'sweep.log').read_text()[-2000:]}")
        # the parent's id file is written once the store is made: a client made earlier would race its creation
        if not list(folder.glob("multirun/*/*/mlflow_parent_run_id")):
            time.sleep(0.5)
            continue
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") and r.info.status == "RUNNING"]
        if parents and children:
            return client, parents[0], children[0]
        time.sleep(0.5)
    pytest.fail("the sweep did not start its first job in time")


def wait_for_open_file(job: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"the job ended before it reached {path.name}: {job.stdout.read()[-2000:]}")
        with contextlib.suppress(psutil.Error):
            if str(path.resolve()) in {f.path for f in psutil.Process(job.pid).open_files()}:
                return
        time.sleep(0.2)
    pytest.fail(f"the job did not open {path} in time")


def wait_for_extraction(job: subprocess.Popen, client: MlflowClient, folder: Path):
    """The job's RUNNING run, once its corpus windows exist (the pass has started)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"the job ended before it could be stopped or killed: {job.stdout.read()[-2000:]}")
        experiments = client.search_experiments() if (folder / "mlflow.db").exists() else []
        runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
        windows = list((folder / "cache" / "corpus").glob("*/tokens.npy"))
        if runs and windows and "corpus/n_tokens" in runs[0].data.metrics:
            time.sleep(1.0)  # into the pass
            return runs[0]
        time.sleep(0.5)
    pytest.fail("the job did not reach its extraction pass in time")
