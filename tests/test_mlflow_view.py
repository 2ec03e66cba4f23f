"""The experiment's saved view of the headline metrics (intraneuron/tracking/view.py): what the
experiment tag holds, when it is written, and in the format MLflow's UI reads.

Runs are logged through the real run lifecycle (`tracked_run`) into a sqlite store and the tag is
read back with MlflowClient. That the UI opens it is tested in a browser (test_mlflow_server.py).
"""

from __future__ import annotations

import base64
import json
import zlib

import pytest
from mlflow import MlflowClient

from intraneuron.registry import analysis_class, available
from intraneuron.reports.artifacts import HEADLINE_TAG, MAIN_HEADLINE_TAG
from intraneuron.tracking import TrackingConfig, open_experiment, tracked_run
from intraneuron.tracking.view import (
    VIEW_NAME,
    VIEW_TAG,
    envelope,
    save_view,
    stored_state,
    view_state,
)

DATASET, DURATION = "attributes.`Dataset`", "duration"


@pytest.fixture
def client(store) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")


@pytest.fixture
def tracking(store, monkeypatch):
    """A TrackingConfig of its own experiment, named by the test."""
    monkeypatch.chdir(store)

    def config(name: str) -> TrackingConfig:
        return TrackingConfig(tracking_uri="sqlite:///mlruns/mlflow.db", experiment=name, system_metrics=False)

    return config


def the_view(client: MlflowClient, experiment_id: str) -> tuple[dict, dict]:
    """(envelope, state) of the experiment's view tag."""
    stored = json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG])
    return stored, json.loads(stored["state"])


def log_job(tcfg: TrackingConfig, name: str, params: dict, headline: list[str], main: str | None,
            metrics: dict[str, float]) -> str:  # fmt: skip
    """One job the way the runner logs it: params, the headline tags, then the layer metrics."""
    tags = {HEADLINE_TAG: ",".join(headline)} | ({MAIN_HEADLINE_TAG: main} if main else {})
    with tracked_run(tcfg, run_name=name, params=params) as run:
        run.set_tags(tags)
        run.log_metrics(metrics)
    return run.run_id


def test_a_new_experiment_opens_on_the_default_columns_until_a_run_ends(tracking, client, store):
    _, experiment_id = open_experiment(tracking("view-new"), store)
    stored, state = the_view(client, experiment_id)
    assert stored["name"] == VIEW_NAME and stored["createdAt"] == stored["updatedAt"] > 0
    assert state == {"selectedColumns": [DATASET], "columnOrder": [DATASET, DURATION]}


def test_the_view_shows_each_analysis_headline_and_the_params_that_vary_sorted_by_the_main_one(tracking, client):
    tcfg = tracking("view-jobs")
    common = {"model.name": "tiny-gpt2", "layer": "0"}
    log_job(tcfg, "ward", {**common, "clustering": "ward"}, ["neurons", "frac", "effect"], "effect",
            {"L0/neurons": 32, "L0/frac": 0.25, "L0/effect": 0.5})
    first = client.get_run(log_job(tcfg, "kmeans", {**common, "clustering": "kmeans"},
                                   ["neurons", "frac", "effect"], "effect",
                                   {"L0/neurons": 32, "L0/frac": 0.5, "L0/effect": 0.1, "L1/effect": 0.3}))
    _, state = the_view(client, first.info.experiment_id)
    metrics = ["metrics.`L0/effect`", "metrics.`L0/neurons`", "metrics.`L0/frac`", "metrics.`L1/effect`"]
    assert state["selectedColumns"] == [DATASET, *metrics, "params.`clustering`"]  # model and layer are common
    assert state["columnOrder"] == [DATASET, DURATION, *metrics, "params.`clustering`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`L0/effect`", False)

    # another analysis joins the experiment; the newest run's main headline sorts the table
    log_job(tcfg, "stats", {**common, "analysis": "neuron_stats"}, ["skew", "kurtosis"], None,
            {"L0/skew": 1.0, "L0/kurtosis": 3.0})
    stored, state = the_view(client, first.info.experiment_id)
    assert state["orderByKey"] == "metrics.`L0/skew`"  # no main tag (older runs): the first headline
    assert {"metrics.`L0/skew`", "metrics.`L0/kurtosis`", "metrics.`L0/frac`"} <= set(state["selectedColumns"])
    assert [c for c in state["selectedColumns"] if c.startswith("params.")] == [
        "params.`analysis`", "params.`clustering`"]  # fmt: skip
    assert stored["updatedAt"] >= stored["createdAt"]


def test_a_sweep_parent_and_a_run_without_metrics_add_no_columns(tracking, client):
    tcfg = tracking("view-parent")
    with tracked_run(tcfg, run_name="sweep-parent", params={"sweep.overrides": "layer=0,1"}):
        pass
    run_id = log_job(tcfg, "job", {"layer": "0"}, ["frac"], "frac", {"L0/frac": 0.5})
    _, state = the_view(client, client.get_run(run_id).info.experiment_id)
    assert state["selectedColumns"] == [DATASET, "metrics.`L0/frac`"]


def test_an_unchanged_view_is_not_written_again_and_a_changed_one_keeps_its_creation_time(tracking, client, store):
    tcfg = tracking("view-times")
    run_id = log_job(tcfg, "job", {"layer": "0"}, ["frac"], "frac", {"L0/frac": 0.5})
    experiment_id = client.get_run(run_id).info.experiment_id
    before = client.get_experiment(experiment_id).tags[VIEW_TAG]
    save_view(client, experiment_id)
    assert client.get_experiment(experiment_id).tags[VIEW_TAG] == before
    client.set_tag(run_id, HEADLINE_TAG, "frac,other")  # nothing the view shows
    client.log_metric(run_id, "L0/other", 1.0)
    save_view(client, experiment_id)
    stored, state = the_view(client, experiment_id)
    assert "metrics.`L0/other`" in state["selectedColumns"]
    assert stored["createdAt"] == json.loads(before)["createdAt"] and stored["updatedAt"] >= stored["createdAt"]


def test_an_experiment_from_before_the_view_gets_it_when_opened(tracking, client, store):
    experiment_id = client.create_experiment("view-old", artifact_location=str(store / "old"))
    run_id = client.create_run(experiment_id, tags={HEADLINE_TAG: "frac"}).info.run_id
    client.log_metric(run_id, "L2/frac", 0.75)
    assert VIEW_TAG not in client.get_experiment(experiment_id).tags
    open_experiment(TrackingConfig(tracking("view-old").tracking_uri, "view-old", artifact_root=str(store)), store)
    _, state = the_view(client, experiment_id)
    assert state["orderByKey"] == "metrics.`L2/frac`"


def test_a_state_too_long_for_a_tag_is_compressed_as_the_ui_compresses_it():
    state = view_state([])
    state["selectedColumns"] += [f"metrics.`L{layer}/some_long_headline_name`" for layer in range(200)]
    plain = envelope(state, 1, 2, limit=100_000)
    assert json.loads(json.loads(plain)["state"]) == state
    packed = envelope(state, 1, 2, limit=2000)
    assert len(packed) <= 2000
    text = json.loads(packed)["state"]
    assert text.startswith("deflate;")  # the UI's marker, then base64 of a zlib stream (pako.inflate)
    assert json.loads(zlib.decompress(base64.b64decode(text.removeprefix("deflate;")))) == state
    assert stored_state(packed) == (state, 1) and stored_state("not json") == (None, None)


@pytest.mark.parametrize("target", sorted({t for t in available().values() if not t.startswith("(")}))  # no aliases
def test_every_analysis_main_headline_is_one_of_its_headlines(target):
    cls = analysis_class(target)
    assert (cls.main_headline or next(iter(cls.headline))) in cls.headline
