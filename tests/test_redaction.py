"""A password in the tracking URI is used to connect and published nowhere.

Real jobs of the tiny model are launched through the CLI with a URI that carries a password: to a
local `mlflow server` (http://user:<password>@127.0.0.1:<port>, a sweep in which one job fails), and
to a local PostgreSQL that requires its password (given as an override, then through
MLFLOW_TRACKING_URI). Afterwards the password is in no run name, param, tag, description or
artifact of any run, in no file or file name under the launch folder (Hydra's output folders and
`.hydra/*.yaml`, the job's log, `mlflow_run.json`, the server's store), and in nothing the command
printed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from intraneuron.reports.artifacts import COMPOSED_CONFIG
from intraneuron.tracking.redact import MASK, RedactingFormatter, redact
from intraneuron.tracking.server import LocalMlflowServer, free_port
from tests.servers import LocalPostgres
from tests.test_runner import BASE

PASSWORD = "s3cr:t@p/ss"  # special characters: percent-encoded in a URI
SECRETS = (PASSWORD, quote(PASSWORD, safe=""))


# ------------------------------------------------------------------------------------ the function


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql+psycopg://user:secret@host/db", "postgresql+psycopg://user:***@host/db"),
        ("http://user:secret@host:5000", "http://user:***@host:5000"),
        ("mysql://u:s3cr%3At%40p%2Fss@db.lab:3306/mlflow", "mysql://u:***@db.lab:3306/mlflow"),
        ("https://me:p%20w@tracker.lab/mlflow/", "https://me:***@tracker.lab/mlflow/"),
        # a sweep's jobs get their overrides with ':' escaped
        (r"tracking.tracking_uri=http\://user\:secret@127.0.0.1\:5000",
         r"tracking.tracking_uri=http\://user\:***@127.0.0.1\:5000"),
        # not percent-encoded as it should be: hidden anyway
        ("postgresql://u:pa@ss/w@host/db", "postgresql://u:***@host/db"),
    ],
)
def test_the_password_of_a_uri_is_masked(uri, masked):
    assert redact(uri) == masked
    assert redact(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///mlruns/mlflow.db",
        "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow",
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning",
        "databricks://profile:prefix",
        "mysql://u:@host/db",
        "http://127.0.0.1:5000 answered; write to me@lab.org",
        "layer=0 clustering=ward",
    ],
)
def test_text_without_a_password_is_unchanged(text):
    assert redact(text) == text


def test_every_uri_in_a_text_is_masked_and_the_rest_kept():
    text = ("['tracking.tracking_uri=http://a:one@h:1', 'layer=0']\n"
            '{"uri": "postgresql://b:two@h/db", "mail": "me@lab.org"}')  # fmt: skip
    assert redact(text) == ("['tracking.tracking_uri=http://a:***@h:1', 'layer=0']\n"
                            '{"uri": "postgresql://b:***@h/db", "mail": "me@lab.org"}')  # fmt: skip


def test_a_log_line_and_its_traceback_are_masked():
    try:
        raise ConnectionError("no answer from http://user:secret@127.0.0.1:1")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "store %s", ("mysql://u:pw@h/db",), sys.exc_info())
    line = RedactingFormatter("%(message)s").format(record)
    assert "secret" not in line and ":pw@" not in line
    assert "mysql://u:***@h/db" in line and "http://user:***@127.0.0.1:1" in line


# ------------------------------------------------------------------------------------ real jobs


def launch(cwd: Path, cache: Path, *overrides: str, env: dict[str, str] | None = None):
    """`python -m intraneuron` of the smoke job(s) in `cwd`, into the experiment named after `cwd`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    environment.update(INTRANEURON_CACHE=str(cache), **(env or {}))
    flags = [o for o in overrides if o.startswith("--")]
    command = [sys.executable, "-m", "intraneuron", *flags, *BASE, f"tracking.experiment={cwd.name}",
               *(o for o in overrides if not o.startswith("--"))]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


def leaks(text: str | bytes) -> bool:
    data = text if isinstance(text, bytes) else text.encode()
    return any(secret.encode() in data for secret in SECRETS)


def printed_or_filed(cwd: Path, done) -> list[str]:
    """Where the password is in the command's output and in the files (names, contents) under `cwd`."""
    found = [name for name, text in (("stdout", done.stdout), ("stderr", done.stderr)) if leaks(text)]
    for path in cwd.rglob("*"):
        name = str(path.relative_to(cwd))
        found += [f"file name {name}"] * leaks(name)
        found += [f"file {name}"] * (path.is_file() and leaks(path.read_bytes()))
    return found


def check_published_nothing(client: MlflowClient, cwd: Path, done, downloads: Path) -> list:
    """No password in the command's output, in any file (name or content) under `cwd`, or in any run
    of the experiment; every place it is found is listed. Returns the runs."""
    found = printed_or_filed(cwd, done)
    experiment = client.get_experiment_by_name(cwd.name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert runs
    for run in runs:
        where = f"run {run.info.run_id[:8]}"
        found += [f"{where} name"] * leaks(run.info.run_name)
        for kind, entries in (("param", run.data.params), ("tag", run.data.tags)):  # tags: the description too
            found += [f"{where} {kind} {key}" for key, value in entries.items() if leaks(f"{key}={value}")]
        folder = download_artifacts(run_id=run.info.run_id, dst_path=str(downloads / run.info.run_id),
                                    tracking_uri=client.tracking_uri)  # fmt: skip
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        assert files, f"{where} has no artifacts"
        found += [f"{where} artifact {p.relative_to(folder)}" for p in files if leaks(p.read_bytes())]
    assert not found
    return runs


def composed(client: MlflowClient, run) -> dict:
    path = download_artifacts(run_id=run.info.run_id, artifact_path=COMPOSED_CONFIG, tracking_uri=client.tracking_uri)
    return yaml.safe_load(Path(path).read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tiny model's files and token windows, built once for the module (outside the scanned folders)."""
    return tmp_path_factory.mktemp("cache")


def test_a_sweep_on_a_server_uri_with_a_password_publishes_it_nowhere(tmp_path, cache):
    """Two jobs, one failing (layer 5 of a 3-layer model): Hydra's folders are named after the
    overrides, so a password in them would be in a file name too."""
    cwd = tmp_path / "server_sweep"
    (cwd / "server").mkdir(parents=True)
    with LocalMlflowServer(f"sqlite:///{cwd / 'server' / 'mlflow.db'}", cwd / "server" / "artifacts",
                           cwd / "server" / "server.log") as server:  # fmt: skip
        uri = server.url.replace("http://", f"http://user:{SECRETS[1]}@")
        done = launch(cwd, cache, "--multirun", "layer=0,5", f"tracking.tracking_uri={uri}",
                      "hydra.sweep.dir=multirun", "hydra.sweep.subdir=${hydra.job.override_dirname}")  # fmt: skip
        client = MlflowClient(server.url)
        runs = check_published_nothing(client, cwd, done, tmp_path / "downloads")
        configs = {run.info.run_name: composed(client, run) for run in runs if run.info.run_name != "sweep-multirun"}

    assert done.returncode == 1  # the layer-5 job failed, and Hydra said with which overrides
    error_line = next(line for line in done.stderr.splitlines() if "Error executing job" in line)
    assert f"user\\\\:{MASK}@" in error_line and "layer=5" in error_line
    by_name = {run.info.run_name: run for run in runs}
    assert by_name["layer=0"].info.status == "FINISHED" and by_name["layer=5"].info.status == "FAILED"
    for name in ("layer=0", "layer=5"):
        run = by_name[name]
        assert f"user\\:{MASK}@127.0.0.1" in run.data.tags["hydra.overrides"]
        assert configs[name]["tracking"]["tracking_uri"] == f"http://user:{MASK}@127.0.0.1:{server.port}"
        job_dir = Path(run.data.tags["hydra.output_dir"])
        assert job_dir.parent == cwd / "multirun" and "tracking_uri" not in job_dir.name
        assert f"user\\:{MASK}@" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert (job_dir / "intraneuron.log").is_file() and (job_dir / "mlflow_run.json").is_file()
    assert f"user:{MASK}@" in (cwd / "multirun" / "multirun.yaml").read_text()


def test_a_refused_uri_with_a_password_is_reported_masked(tmp_path, cache):
    """Nothing listens on the port: the job stops before its run, with one line naming the key."""
    cwd = tmp_path / "refused"
    cwd.mkdir()
    done = launch(cwd, cache, f"tracking.tracking_uri=http://user:{SECRETS[1]}@127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert f"ConfigError: tracking.tracking_uri='http://user:{MASK}@127.0.0.1:" in done.stderr
    assert "Error executing job with overrides" in done.stderr
    assert list(cwd.rglob(".hydra/overrides.yaml"))  # Hydra wrote the job's files
    assert not printed_or_filed(cwd, done)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server that requires the password over TCP (a wrong one is refused)."""
    with LocalPostgres(password=PASSWORD) as uri:
        yield uri


@pytest.mark.slow  # like the other tests on a real PostgreSQL (test_scale_out.py)
@pytest.mark.parametrize("given", ["override", "environment"])
def test_a_job_on_a_database_uri_with_a_password_connects_and_publishes_it_nowhere(
    given, postgres, tmp_path, cache
):
    cwd = tmp_path / f"pg_{given}"
    cwd.mkdir()
    # the job's folder is named after its overrides, so a password in them would be in a file name
    # (MLflow puts the artifacts of a database store in ./mlruns)
    overrides = ["hydra.run.dir=outputs/${hydra.job.override_dirname}"]
    if given == "override":
        done = launch(cwd, cache, *overrides, f"tracking.tracking_uri={postgres}")
    else:
        done = launch(cwd, cache, *overrides, env={"MLFLOW_TRACKING_URI": postgres})
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(postgres)
    [run] = check_published_nothing(client, cwd, done, tmp_path / "downloads")

    assert run.info.status == "FINISHED"  # connected with the real password
    masked = postgres.replace(SECRETS[1], MASK)
    assert composed(client, run)["tracking"]["tracking_uri"] == masked
    job_dir = Path(run.data.tags["hydra.output_dir"])
    assert job_dir.parent == cwd / "outputs" and "tracking_uri" not in job_dir.name
    info = json.loads((job_dir / "mlflow_run.json").read_text())
    assert info["tracking_uri"] == masked and masked in info["ui_command"]
    assert masked in (job_dir / "intraneuron.log").read_text()  # where the results are
    if given == "override":
        assert masked in run.data.tags["hydra.overrides"]
        assert masked in (job_dir / ".hydra" / "config.yaml").read_text()
