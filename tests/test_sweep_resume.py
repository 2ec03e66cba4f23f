"""Rerunning a sweep that broke off runs only what is missing (tracking.skip_finished): a job whose
config (all but `tracking` and how it runs) already has a FINISHED run is not run again; that run is
copied under the new sweep's parent (params, metrics, tags, artifacts), so the new parent holds every
job of the sweep and the old sweep keeps its own."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from intraneuron.tracking.resume import CONFIG_HASH_TAG, COPIED_FROM_TAG, HOW_KEYS, config_hash
from tests.test_tracking import _launch, _runs

PARENT = "mlflow.parentRunId"


def _sweeps(runs) -> tuple[list, dict]:
    parents = sorted((r for r in runs if PARENT not in r.data.tags), key=lambda r: r.info.start_time)
    children = {}
    for r in runs:
        if PARENT in r.data.tags:
            children.setdefault(r.data.tags[PARENT], []).append(r)
    return parents, children


def test_config_hash_ignores_how_a_job_runs_and_nothing_else():
    config = {"x": 1, "model": {"d_mlp": 8}, "tracking": {"tracking_uri": "sqlite:///a.db"},
              "extraction": {"batch_size": 16, "top_k": 100}, "analysis": {"n_jobs": -1, "alpha": 0.05}}  # fmt: skip
    same = json.loads(json.dumps(config))
    same["tracking"]["tracking_uri"] = "http://127.0.0.1:5000"
    same["extraction"]["batch_size"] = 4
    same["analysis"]["n_jobs"] = 2
    assert config_hash(same) == config_hash(config)
    assert "tracking" in HOW_KEYS and config == json.loads(json.dumps(config))  # not mutated
    for path, value in [(("x",), 2), (("model", "d_mlp"), 9), (("extraction", "top_k"), 50),
                        (("analysis", "alpha"), 0.01)]:  # fmt: skip
        other = json.loads(json.dumps(config))
        node = other
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        assert config_hash(other) != config_hash(config), path


def test_a_rerun_sweep_skips_finished_jobs_and_copies_them_under_its_parent(tmp_path: Path):
    first = _launch(tmp_path, "--multirun", "x=1,2,3")  # x=3 fails (fail_on: 3)
    assert first.returncode != 0
    client, runs = _runs(tmp_path)
    (old_parent,), children = _sweeps(runs)
    done = {int(r.data.params["x"]): r for r in children[old_parent.info.run_id]}
    assert {x: r.info.status for x, r in done.items()} == {1: "FINISHED", 2: "FINISHED", 3: "FAILED"}

    second = _launch(tmp_path, "--multirun", "x=1,2,3", "fail_on=99")  # fixed: x=3 can run now
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipped:" not in second.stdout + second.stderr  # fail_on is config: every job is new
    client, runs = _runs(tmp_path)
    parents, children = _sweeps(runs)
    second_parent = parents[1].info.run_id
    originals = {int(r.data.params["x"]): r for r in children[second_parent]}

    third = _launch(tmp_path, "--multirun", "x=1,2,3,4", "fail_on=99")  # the same sweep, grown by one job
    assert third.returncode == 0, third.stderr[-3000:]
    output = third.stdout + third.stderr
    assert output.count("skipped: this config already FINISHED") == 3, output[-3000:]
    client, runs = _runs(tmp_path)
    parents, children = _sweeps(runs)
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents[1:])
    newest = parents[-1].info.run_id
    jobs = {int(r.data.params["x"]): r for r in children[newest]}
    assert sorted(jobs) == [1, 2, 3, 4] and all(r.info.status == "FINISHED" for r in jobs.values())
    assert sorted(int(r.data.params["x"]) for r in children[second_parent]) == [1, 2, 3]  # kept whole
    for x in (1, 2, 3):  # copies of the second sweep's runs: same params, metrics, tables
        copy, original = jobs[x], originals[x]
        assert copy.data.tags[COPIED_FROM_TAG] == original.info.run_id
        assert copy.data.params == original.data.params and copy.data.metrics == original.data.metrics
        assert copy.data.tags[CONFIG_HASH_TAG] == original.data.tags[CONFIG_HASH_TAG]
        table = client.download_artifacts(copy.info.run_id, "tables/neurons.parquet", str(tmp_path / f"t{x}"))
        assert pd.read_parquet(table)["score"].tolist() == [x * n for n in range(8)]
    assert COPIED_FROM_TAG not in jobs[4].data.tags and 413 in jobs[4].data.metrics.values()
    assert len({r.data.tags[CONFIG_HASH_TAG] for r in jobs.values()}) == 4
    # each skipped job's output folder names the run that holds its results in this sweep
    infos = [json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/*/mlflow_run.json")]
    newest_infos = [i for i in infos if i["parent_run_id"] == newest]
    assert sorted(i["run_id"] for i in newest_infos) == sorted(r.info.run_id for r in jobs.values())

    forced = _launch(tmp_path, "--multirun", "x=1,2", "fail_on=99", "tracking.skip_finished=false")
    assert forced.returncode == 0 and "skipped:" not in forced.stdout + forced.stderr
    client, runs = _runs(tmp_path)
    parents, children = _sweeps(runs)
    assert all(COPIED_FROM_TAG not in r.data.tags for r in children[parents[-1].info.run_id])


def test_a_single_job_always_runs(tmp_path: Path):
    for _ in range(2):
        assert _launch(tmp_path, "x=1").returncode == 0
    client, runs = _runs(tmp_path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.tags[CONFIG_HASH_TAG] == runs[1].data.tags[CONFIG_HASH_TAG]


def test_a_run_that_ended_without_results_is_not_resumed(tmp_path: Path):
    from mlflow import MlflowClient

    from intraneuron.tracking.resume import INCOMPLETE_TAGS, finished_run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    (pending_tag,) = INCOMPLETE_TAGS
    pending = client.create_run(experiment_id, tags={CONFIG_HASH_TAG: "h", pending_tag: "shard 0 of 2 saved"})
    client.set_terminated(pending.info.run_id, "FINISHED")
    assert finished_run(client, experiment_id, "h") is None
    failed = client.create_run(experiment_id, tags={CONFIG_HASH_TAG: "h"})
    client.set_terminated(failed.info.run_id, "FAILED")
    assert finished_run(client, experiment_id, "h") is None
    done = client.create_run(experiment_id, tags={CONFIG_HASH_TAG: "h"})
    client.set_terminated(done.info.run_id, "FINISHED")
    assert finished_run(client, experiment_id, "h").info.run_id == done.info.run_id
    assert finished_run(client, experiment_id, "other") is None
