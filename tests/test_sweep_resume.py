"""Rerunning a sweep that broke off runs only what is missing (tracking.skip_finished): a job whose
config (all but `tracking` and how it runs) already has a FINISHED run is not run again, and the new
sweep's parent adopts that run, so the new parent holds every job of the sweep."""

from __future__ import annotations

import json
from pathlib import Path

from intraneuron.tracking.run import CONFIG_HASH_TAG, HOW_KEYS, PREVIOUS_PARENT_TAG, config_hash
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


def test_a_rerun_sweep_skips_finished_jobs_and_its_parent_adopts_them(tmp_path: Path):
    first = _launch(tmp_path, "--multirun", "x=1,2,3")  # x=3 fails (fail_on: 3)
    assert first.returncode != 0
    client, runs = _runs(tmp_path)
    (old_parent,), children = _sweeps(runs)
    done = {int(r.data.params["x"]): r for r in children[old_parent.info.run_id]}
    assert {x: r.info.status for x, r in done.items()} == {1: "FINISHED", 2: "FINISHED", 3: "FAILED"}

    second = _launch(tmp_path, "--multirun", "x=1,2,3", "fail_on=99")  # fixed: x=3 can run now
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("skipped: this config already FINISHED") == 0  # fail_on is config: all new
    client, runs = _runs(tmp_path)
    assert len([r for r in runs if PARENT in r.data.tags]) == 6

    third = _launch(tmp_path, "--multirun", "x=1,2,3,4", "fail_on=99")  # a broken-off sweep, rerun bigger
    assert third.returncode == 0, third.stderr[-3000:]
    assert (third.stdout + third.stderr).count("skipped: this config already FINISHED") == 3, third.stdout[-3000:]
    client, runs = _runs(tmp_path)
    parents, children = _sweeps(runs)
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents[1:])
    newest = parents[-1].info.run_id
    adopted = {int(r.data.params["x"]): r for r in children[newest]}
    assert sorted(adopted) == [1, 2, 3, 4] and all(r.info.status == "FINISHED" for r in adopted.values())
    second_parent = parents[1].info.run_id
    for x in (1, 2, 3):  # the second sweep's runs, moved: not run again, not copied
        assert adopted[x].data.tags[PREVIOUS_PARENT_TAG] == second_parent
    assert PREVIOUS_PARENT_TAG not in adopted[4].data.tags
    assert children.get(second_parent, []) == []
    assert len([r for r in runs if PARENT in r.data.tags]) == 7  # 3 + 3 + the one new job
    hashes = [r.data.tags[CONFIG_HASH_TAG] for r in adopted.values()]
    assert len(set(hashes)) == 4
    # each skipped job's output folder names the run that holds its results
    infos = [json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/*/mlflow_run.json")]
    newest_infos = [i for i in infos if i["parent_run_id"] == newest]
    assert sorted(i["run_id"] for i in newest_infos) == sorted(r.info.run_id for r in adopted.values())

    forced = _launch(tmp_path, "--multirun", "x=1,2", "fail_on=99", "tracking.skip_finished=false")
    assert forced.returncode == 0 and "skipped:" not in forced.stdout + forced.stderr
    client, runs = _runs(tmp_path)
    assert len([r for r in runs if PARENT in r.data.tags]) == 9


def test_a_single_job_always_runs(tmp_path: Path):
    for _ in range(2):
        assert _launch(tmp_path, "x=1").returncode == 0
    client, runs = _runs(tmp_path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.tags[CONFIG_HASH_TAG] == runs[1].data.tags[CONFIG_HASH_TAG]
