"""What MLflow's UI shows of a job: the experiment's kind, a failed run's description, the corpus as a
dataset input, system metrics, the run id in the Hydra output folder, extraction progress, links.

Everything is written to a real sqlite store and read back with MlflowClient.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from intraneuron.errors import ConfigError
from intraneuron.tracking import TrackingConfig, open_experiment, tracked_run
from intraneuron.tracking.hydra_job import HydraJob
from intraneuron.tracking.logger import RunLogger
from intraneuron.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from intraneuron.tracking.ui import experiment_url, run_url, ui_base

NOTE = "mlflow.note.content"
CONTENT_HASH = "3f1c9a0be47d52c8a1e0f9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7"


@pytest.fixture
def client(store) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")


@pytest.fixture
def tcfg(store, monkeypatch) -> TrackingConfig:
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    return TrackingConfig(tracking_uri="sqlite:///mlruns/mlflow.db", experiment="ui", system_metrics=False)


def _run(tcfg: TrackingConfig, name: str, **kwargs):
    return tracked_run(tcfg, run_name=name, params={}, tags=kwargs.pop("tags", {}), **kwargs)


# ---------------------------------------------------------------- the experiment opens on its runs


def test_a_new_experiment_is_marked_as_classical_ml(tcfg, client, store):
    config = TrackingConfig(tcfg.tracking_uri, experiment="ui-new")
    _, experiment_id = open_experiment(config, store)
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_old_experiment_gets_the_kind_and_a_chosen_kind_is_kept(tcfg, client, store):
    untagged = client.create_experiment("ui-old", artifact_location=str(store / "old"))
    chosen = client.create_experiment(
        "ui-chosen", artifact_location=str(store / "chosen"), tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert open_experiment(TrackingConfig(tcfg.tracking_uri, experiment="ui-old"), store)[1] == untagged
    assert open_experiment(TrackingConfig(tcfg.tracking_uri, experiment="ui-chosen"), store)[1] == chosen
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_links_name_the_model_training_workflow_and_keep_credentials_out():
    assert ui_base("sqlite:////data/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base("https://alice:secret@mlflow.example.org:8443/base/") == "https://mlflow.example.org:8443/base"
    assert experiment_url("sqlite:////x.db", "7", view=False) == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert run_url("http://h:5000", "7", "abc") == "http://h:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


# ---------------------------------------------------------------- a failed run says why


def test_a_failed_run_has_its_error_as_description(tcfg, client):
    holder: list[RunLogger] = []
    with pytest.raises(ValueError, match="no neurons"):
        with _run(tcfg, "fails") as run:
            holder.append(run)
            raise ValueError("no neurons in layer 3")
    got = client.get_run(holder[0].run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags[NOTE] == got.data.tags["error"] == "ValueError: no neurons in layer 3"


def test_an_earlier_description_is_kept_below_the_error(tcfg, client):
    holder: list[RunLogger] = []
    with pytest.raises(KeyboardInterrupt):
        with _run(tcfg, "interrupted", tags={NOTE: "layer 0: frac=0.5"}) as run:
            holder.append(run)
            raise KeyboardInterrupt
    got = client.get_run(holder[0].run_id)
    assert got.info.status == "KILLED"
    assert got.data.tags[NOTE] == "KeyboardInterrupt\n\nlayer 0: frac=0.5"


# ---------------------------------------------------------------- the corpus as a dataset input


def test_the_corpus_is_a_dataset_input_shared_by_runs_on_the_same_windows(tcfg, client, tmp_path):
    windows = tmp_path / "corpus" / "tokens.npy"
    run_ids = []
    for name in ("first", "second"):
        with _run(tcfg, name) as run:
            run.for_layer(2).log_corpus_input("gutenberg", CONTENT_HASH, windows, n_tokens=8192, window_len=64)
        run_ids.append(run.run_id)

    inputs = [client.get_run(run_id).inputs.dataset_inputs for run_id in run_ids]
    assert [len(i) for i in inputs] == [1, 1]
    (first,), (second,) = inputs
    dataset = first.dataset
    assert dataset.name == "gutenberg" and dataset.digest == CONTENT_HASH[:16]
    assert dataset.source_type == "local" and json.loads(dataset.source) == {"uri": str(windows)}
    assert json.loads(dataset.profile) == {
        "num_tokens": 8192, "num_windows": 128, "window_len": 64, "content_hash": CONTENT_HASH,
    }
    features = json.loads(json.loads(dataset.schema)["mlflow_tensorspec"]["features"])
    assert features == [{"name": "token_ids", "type": "tensor", "tensor-spec": {"dtype": "uint32", "shape": [-1, 64]}}]
    assert {t.key: t.value for t in first.tags} == {"mlflow.data.context": "extraction"}
    assert second.dataset == dataset  # one dataset, two runs


def _log_the_corpus_at_once(db: str, run_id: str, digest: str, barrier, errors) -> None:
    client = MlflowClient(f"sqlite:///{db}")
    client.get_run(run_id)  # open the store before the barrier, so that the inserts start together
    barrier.wait()
    try:
        RunLogger(client, run_id).log_corpus_input("gutenberg", digest, "tokens.npy", 8192, 64)
    except Exception as err:  # noqa: BLE001 - sent to the parent, which asserts there are none
        errors.put(f"{type(err).__name__}: {err}")


def test_runs_of_a_parallel_sweep_log_the_same_corpus_at_the_same_moment(client, store):
    """Parallel jobs on the same windows race to insert one dataset row; every run must end linked to
    that row (the joblib launcher once failed a job with a UNIQUE constraint error here)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    db = str(store / "mlruns" / "mlflow.db")
    experiment_id = client.create_experiment("race", artifact_location=str(store / "race"))
    errors = context.Queue()
    n_rounds, n_runs = 4, 6
    for round_ in range(n_rounds):
        digest = f"{round_:02d}{CONTENT_HASH[2:]}"  # a new digest: no row exists when the runs race
        run_ids = [client.create_run(experiment_id, run_name=f"r{round_}.{i}").info.run_id for i in range(n_runs)]
        barrier = context.Barrier(n_runs)
        workers = [
            context.Process(target=_log_the_corpus_at_once, args=(db, run_id, digest, barrier, errors))
            for run_id in run_ids
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0] * n_runs
        linked = [client.get_run(run_id).inputs.dataset_inputs for run_id in run_ids]
        assert all(len(inputs) == 1 for inputs in linked), f"round {round_}: {linked}"
        assert {inputs[0].dataset.digest for inputs in linked} == {digest[:16]}
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert reported == []


def test_only_a_duplicate_insert_is_retried(tcfg, client):
    class FlakyClient:
        """Fails the first `failures` inserts with `message`, then logs for real."""

        def __init__(self, message: str, failures: int):
            self.message, self.failures, self.calls = message, failures, 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls <= self.failures:
                raise mlflow.exceptions.MlflowException(self.message)
            client.log_inputs(run_id, datasets=datasets)

    duplicate = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name"
    with _run(tcfg, "retried") as run:
        flaky = FlakyClient(duplicate, failures=1)
        RunLogger(flaky, run.run_id).log_corpus_input("gutenberg", CONTENT_HASH, "tokens.npy", 8192, 64)
    assert flaky.calls == 2 and len(client.get_run(run.run_id).inputs.dataset_inputs) == 1

    postgres = 'duplicate key value violates unique constraint "uq_dataset"'
    with _run(tcfg, "gives-up") as run:
        flaky = FlakyClient(postgres, failures=10)
        with pytest.raises(mlflow.exceptions.MlflowException, match="duplicate key"):
            RunLogger(flaky, run.run_id).log_corpus_input("gutenberg", CONTENT_HASH, "tokens.npy", 8192, 64)
    assert flaky.calls == 3

    with _run(tcfg, "other-error") as run:
        flaky = FlakyClient("RESOURCE_DOES_NOT_EXIST: run not found", failures=1)
        with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
            RunLogger(flaky, run.run_id).log_corpus_input("gutenberg", CONTENT_HASH, "tokens.npy", 8192, 64)
    assert flaky.calls == 1


def test_a_corpus_served_over_http_is_an_http_source(tcfg, client):
    with _run(tcfg, "http-corpus") as run:
        run.log_corpus_input("wikitext", CONTENT_HASH[::-1], "https://example.org/w.npy", 100, 10)
    (got,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert got.dataset.source_type == "http"
    assert json.loads(got.dataset.source) == {"url": "https://example.org/w.npy"}


# ---------------------------------------------------------------- system metrics


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


@pytest.mark.parametrize("fail", [False, True])
def test_system_metrics_are_sampled_and_stopped_whatever_the_status(tcfg, client, fail):
    sampled = TrackingConfig(tcfg.tracking_uri, tcfg.experiment, system_metrics_interval=0.05)
    holder: list[RunLogger] = []
    with pytest.raises(RuntimeError) if fail else _no_error():
        with _run(sampled, f"sampled-{fail}") as run:
            holder.append(run)
            assert len(_sampler_threads()) == 1
            assert mlflow.active_run() is None  # sampled by run id, no fluent run
            # sampled every 0.05 s; the bound only keeps a sampler that never logs from hanging the test
            deadline = time.monotonic() + 120
            while "system/cpu_utilization_percentage" not in client.get_run(run.run_id).data.metrics:
                if not _sampler_threads() or time.monotonic() > deadline:
                    pytest.fail("the sampler logged no system metric while the run was running")
                time.sleep(0.05)
            if fail:
                raise RuntimeError("planted")
    assert not _sampler_threads()
    got = client.get_run(holder[0].run_id)
    assert got.info.status == ("FAILED" if fail else "FINISHED")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(got.data.metrics)
    assert got.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_system_metrics_can_be_turned_off(tcfg, client):
    with _run(tcfg, "unsampled") as run:
        assert not _sampler_threads()
    assert not [k for k in client.get_run(run.run_id).data.metrics if k.startswith("system/")]


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), "often", True])
def test_a_bad_sampling_interval_is_refused_before_any_run(tcfg, client, interval):
    before = len(client.search_runs([client.get_experiment_by_name("ui").experiment_id]))
    with pytest.raises(ConfigError, match="tracking.system_metrics_interval"):
        with _run(TrackingConfig(tcfg.tracking_uri, "ui", system_metrics_interval=interval), "bad"):
            pass
    assert len(client.search_runs([client.get_experiment_by_name("ui").experiment_id])) == before


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- the run id in the Hydra output folder


def _job(output_dir: Path) -> HydraJob:
    return HydraJob(
        multirun=False, original_cwd=output_dir.parent, sweep_dir=None, job_num=None, name="cli",
        overrides=["layer=3"], swept_overrides=["layer=3"], output_dir=str(output_dir), choices={},
    )


def test_a_hydra_job_writes_its_run_id_to_its_output_folder(tcfg, client, tmp_path, monkeypatch):
    output_dir = tmp_path / "outputs" / "2025-01-01" / "12-00-00"
    monkeypatch.setattr("intraneuron.tracking.run.current_hydra_job", lambda: _job(output_dir))
    with _run(tcfg, "layer=3") as run:
        info = json.loads((output_dir / "mlflow_run.json").read_text())  # there while the job runs
        assert run.ui_url() == info["ui_url"]
    experiment_id = client.get_run(run.run_id).info.experiment_id
    assert info["run_id"] == run.run_id and info["run_name"] == "layer=3"
    assert info["experiment_id"] == experiment_id and info["experiment"] == "ui"
    assert info["tracking_uri"] == client.tracking_uri and info["parent_run_id"] is None
    assert info["ui_url"] == run_url(client.tracking_uri, experiment_id, run.run_id)
    assert info["experiment_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
                                      "?workflowType=machine_learning&viewStateShareKey=intraneuron-headline")
    assert info["ui_command"] == f"intraneuron ui --tracking-uri {client.tracking_uri}"
    assert client.get_run(run.run_id).data.tags["hydra.output_dir"] == str(output_dir)


def test_an_output_folder_that_cannot_be_written_costs_only_the_file(tcfg, client, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("intraneuron.tracking.run.current_hydra_job", lambda: _job(blocker / "out"))
    with _run(tcfg, "no-folder") as run:
        pass
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert "mlflow_run.json" in caplog.text


# ---------------------------------------------------------------- extraction progress


def test_the_progress_callback_logs_a_fraction_per_step(tcfg, client):
    with _run(tcfg, "progress") as run:
        report = run.progress_callback()
        for done in (0, 300, 1000):
            report(done, 1000)
    history = client.get_metric_history(run.run_id, "extraction/progress")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (300, 0.3), (1000, 1.0)]


def test_a_progress_point_that_cannot_be_logged_is_a_warning(client, caplog):
    report = RunLogger(client, "0" * 32).progress_callback()
    report(5, 10)  # no such run: the pass goes on
    assert "extraction/progress" in caplog.text


def test_extraction_reports_progress_without_changing_a_number(tiny_gpt2, small_windows, tmp_path, monkeypatch):
    from intraneuron.extraction import ExtractionConfig, engine, extract_profiles
    from intraneuron.extraction.cache import ProfileCache

    settings = ExtractionConfig(top_k=7, batch_size=5, hist_min=-1.0, hist_max=1.0, hist_bins=16, progress=False)
    plain = extract_profiles(tiny_gpt2, small_windows, [0], settings, cache=None)

    monkeypatch.setattr(engine, "PROGRESS_CALLBACK_SECONDS", 0.0)  # every batch
    calls: list[tuple[int, int]] = []
    cache = ProfileCache(tmp_path)
    reported = extract_profiles(
        tiny_gpt2, small_windows, [0], settings, cache, on_progress=lambda d, t: calls.append((d, t))
    )
    total = plain[0].n_tokens
    n_batches = -(-small_windows.n_windows // settings.batch_size)
    assert len(calls) == n_batches and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # strictly increasing
    assert plain[0].tensors.keys() == reported[0].tensors.keys()
    for key, value in plain[0].tensors.items():
        assert torch.equal(value, reported[0][key]), key

    monkeypatch.setattr(engine, "PROGRESS_CALLBACK_SECONDS", 3600.0)
    calls.clear()
    extract_profiles(tiny_gpt2, small_windows, [0], settings, cache, on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(total, total)]  # from the cache: done at once
    calls.clear()
    extract_profiles(tiny_gpt2, small_windows, [1], settings, None, on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(total, total)]  # a pass shorter than the interval: the final call only
