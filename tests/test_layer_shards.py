"""Sharded layers: jobs over disjoint neuron ranges of one layer, merged back into the layer.

Fast: `merge_layer` of the two-fold and neuron-stats analyses on tables made in process, the
shard split of `neurons`, the coverage checks (overlap, gap) and the refusal of an analysis that
cannot merge. Slow (tiny random GPT-2 through the CLI, into one temporary store): one job of the
whole layer against a 2-shard sweep merged by the sweep callback (`sweep=layer_shards`) and a
3-shard sweep (uneven: 11 + 11 + 10 neurons) merged by `intraneuron merge`; the merged tables and
metrics equal the one job's. A sweep with a shard missing is refused, and merged with --allow-gaps.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from intraneuron.analyses.base import Analysis, Requirements, ShardMergeError
from intraneuron.analyses.neurons import NeuronsConfig
from intraneuron.errors import ConfigError
from intraneuron.merge import MergeGap, ShardRun, check_coverage, spans

# --- fast -----------------------------------------------------------------------------------


def test_shards_cut_the_selected_neurons_into_contiguous_near_equal_parts():
    parts = [NeuronsConfig(select="range", start=0, stop=32, shards=3, shard=i).indices(64) for i in range(3)]
    assert [len(p) for p in parts] == [11, 11, 10]
    assert np.concatenate(parts).tolist() == list(range(32))
    whole = [NeuronsConfig(shards=2, shard=i).indices(10).tolist() for i in range(2)]  # select=all
    assert whole == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert NeuronsConfig(select="range", start=4, stop=9).indices(64).tolist() == [4, 5, 6, 7, 8]  # unchanged


@pytest.mark.parametrize(("fields", "key"), [
    ({"shards": 0}, "neurons.shards"),
    ({"shards": 2, "shard": 2}, "neurons.shard"),
    ({"select": "sample", "shards": 2}, "neurons.shards"),
])  # fmt: skip
def test_bad_shard_settings_name_their_key(fields, key):
    with pytest.raises(ConfigError, match=key):
        NeuronsConfig(**fields).validate()


def test_more_shards_than_neurons_is_refused_once_the_width_is_known():
    with pytest.raises(ConfigError, match="neurons.shards"):
        NeuronsConfig(select="range", start=0, stop=3, shards=4, shard=3).check_fits(64)


def test_a_range_ending_beyond_the_layer_is_refused_not_clipped():
    with pytest.raises(ConfigError, match=r"^neurons\.stop=500 is not allowed: expected <= d_mlp=128"):
        NeuronsConfig(select="range", start=0, stop=500).check_fits(128)
    NeuronsConfig(select="range", start=0, stop=128).check_fits(128)  # the whole layer


def _two_fold_rows(neurons: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Per-neuron rows shaped like `two_fold.layer.analyse_layer`'s neurons table, random values."""
    from intraneuron.analyses.two_fold.neuron import ROW_KEYS

    n = len(neurons)
    rows = pd.DataFrame({
        "layer": 0, "neuron": neurons, "n_core": rng.integers(10, 30, n), "n_unembedded": 0,
        "label_coverage": np.nan, "core_preview": "a | b", "core_overlap": rng.random(n),
        "core_reliability": rng.random(n), "selectivity": rng.random(n),
    })  # fmt: skip
    for key in ROW_KEYS:
        rows[key] = rng.random(n)
    rows["skipped"] = np.where(rng.random(n) < 0.1, "selectivity 0.1 < 0.5", "")
    rows["topdown_skipped"] = ""
    rows["p_top_method"] = "permutation"
    return rows


def _two_fold(alpha: float = 0.05):
    from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis

    return TwoFoldAnalysis(alpha=alpha, n_jobs=1)


RUN = SimpleNamespace(groups={"clustering": SimpleNamespace(categories="clusterer")})


def _split(table: pd.DataFrame, bounds: list[int]) -> list[pd.DataFrame]:
    return [table[table["neuron"].between(a, b - 1)].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_two_fold_merge_of_shard_tables_equals_the_whole_layer():
    rng = np.random.default_rng(0)
    analysis = _two_fold()
    whole = {"neurons": _two_fold_rows(np.arange(40), rng), "pseudo_neurons": _two_fold_rows(np.arange(16), rng)}
    metrics = analysis._layer_metrics(whole, labelled=False)  # adds the geometry excess, as logged
    segments = pd.DataFrame({"layer": 0, "neuron": np.repeat(np.arange(40), 2), "segment": np.tile([0, 1], 40)})
    # uneven shards given out of order, each as a job logs it (geometry columns included)
    bounds = [0, 7, 25, 40]
    shards = [
        {"neurons": rows, "pseudo_neurons": whole["pseudo_neurons"].copy(), "segments": seg,
         "summary": pd.DataFrame({"metric": ["analysis_seconds"], "value": [1.5]})}
        for rows, seg in zip(_split(whole["neurons"], bounds), _split(segments, bounds), strict=True)
    ][::-1]  # fmt: skip
    merged = analysis.merge_layer(RUN, 0, shards)
    pd.testing.assert_frame_equal(merged.tables["neurons"], whole["neurons"])
    pd.testing.assert_frame_equal(merged.tables["pseudo_neurons"], whole["pseudo_neurons"])
    pd.testing.assert_frame_equal(merged.tables["segments"], segments)
    assert merged.metrics.pop("analysis_seconds") == 4.5
    assert list(merged.metrics) == list(metrics)
    np.testing.assert_array_equal(np.array(list(merged.metrics.values())), np.array(list(metrics.values())))


def test_geometry_excess_recomputed_on_its_own_output_is_unchanged():
    from intraneuron.analyses.two_fold.aggregate import geometry_excess

    rng = np.random.default_rng(1)
    rows, pseudo = _two_fold_rows(np.arange(20), rng), _two_fold_rows(np.arange(16), rng)
    once = geometry_excess(rows, pseudo)
    pd.testing.assert_frame_equal(geometry_excess(once, pseudo), once)


def test_two_fold_merge_refuses_overlapping_shards_and_differing_pseudo_neurons():
    rng = np.random.default_rng(2)
    pseudo = _two_fold_rows(np.arange(8), rng)
    a, b = _two_fold_rows(np.arange(0, 10), rng), _two_fold_rows(np.arange(8, 16), rng)
    with pytest.raises(ShardMergeError, match="both analysed neuron 8"):
        _two_fold().merge_layer(RUN, 0, [{"neurons": a, "pseudo_neurons": pseudo}, {"neurons": b, "pseudo_neurons": pseudo}])
    other = pseudo.assign(z_top=pseudo["z_top"] + 1)
    c = _two_fold_rows(np.arange(10, 16), rng)
    with pytest.raises(ShardMergeError, match="pseudo_neurons table of shard 1 differs"):
        _two_fold().merge_layer(RUN, 0, [{"neurons": a, "pseudo_neurons": pseudo}, {"neurons": c, "pseudo_neurons": other}])


def test_neuron_stats_merge_equals_the_whole_layer():
    from intraneuron.analyses.neuron_stats.analysis import (
        SUMMARISED,
        NeuronStatsAnalysis,
        layer_metrics,
    )

    rng = np.random.default_rng(3)
    table = pd.DataFrame({"layer": 0, "neuron": np.arange(30), **{c: rng.random(30) for c in SUMMARISED}})
    histogram = pd.DataFrame({"neuron": np.repeat(np.arange(30), 3), "bin_low": 0.0, "bin_high": 1.0, "count": 1})
    bounds = [0, 11, 30]
    shards = [{"neurons": t, "histogram": h} for t, h in zip(_split(table, bounds), _split(histogram, bounds), strict=True)]
    merged = NeuronStatsAnalysis().merge_layer(RUN, 0, shards)
    pd.testing.assert_frame_equal(merged.tables["neurons"], table)
    pd.testing.assert_frame_equal(merged.tables["histogram"], histogram)
    assert merged.tables["contexts"].empty
    assert merged.metrics == pytest.approx(layer_metrics(table), nan_ok=True)


class _NoMerge(Analysis):
    name = "no_merge"

    def requirements(self, run):
        return Requirements(stats=frozenset())

    def analyse_layer(self, job, layer, profile):
        raise NotImplementedError


def test_an_analysis_without_merge_layer_refuses_clearly():
    with pytest.raises(ShardMergeError, match="analysis no_merge cannot merge the shards of a layer"):
        _NoMerge().merge_layer(RUN, 0, [{}])
    from intraneuron.analyses.confidence.analysis import ConfidenceAnalysis

    assert ConfidenceAnalysis.merge_layer is Analysis.merge_layer  # keeps the refusal


def _shard(run_id: str, **neurons) -> ShardRun:
    return ShardRun(run_id, {}, [0], NeuronsConfig(**neurons))


def _tables(neurons) -> dict:
    return {"neurons": pd.DataFrame({"neuron": list(neurons)})}


def test_coverage_names_overlaps_gaps_and_missing_shards():
    a, b = _shard("a", select="range", start=0, stop=16), _shard("b", select="range", start=8, stop=24)
    with pytest.raises(ShardMergeError, match="runs a and b both analysed neurons 8-15"):
        check_coverage(0, [a, b], [_tables(range(16)), _tables(range(8, 24))], allow_gaps=False)
    c = _shard("c", select="range", start=20, stop=24)
    with pytest.raises(MergeGap, match="no shard analysed neurons 16-19"):
        check_coverage(0, [a, c], [_tables(range(16)), _tables(range(20, 24))], allow_gaps=False)
    assert check_coverage(0, [a, c], [_tables(range(16)), _tables(range(20, 24))], allow_gaps=True) == "0-15, 20-23"
    split = [_shard(str(i), shards=3, shard=i) for i in (0, 1)]  # the last shard is missing
    with pytest.raises(MergeGap, match="shards 2 of neurons.shards=3 have no FINISHED run"):
        check_coverage(0, split, [_tables(range(11)), _tables(range(11, 22))], allow_gaps=False)


def test_a_merged_run_is_named_by_the_keys_that_differ_between_groups():
    from intraneuron.merge import differing_keys, group_key

    a = {"layer": 0, "neurons": {"select": "range", "start": 0, "stop": 8, "shard": 0}, "clustering": {"k": 2}}
    b = {"layer": 1, "neurons": {"select": "range", "start": 8, "stop": 16, "shard": 1}, "clustering": {"k": 2}}
    assert group_key(a) == group_key(b)  # the same config: one group, whatever the layer and range
    c = {**a, "clustering": {"k": 3}}
    assert differing_keys([a, c]) == ["clustering.k"]


def test_spans():
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert spans([]) == "none"


# --- slow: the CLI on the tiny model --------------------------------------------------------

OPTIONS = ["layer=[0,1]", "clustering.k_choice=silhouette", "core_tokens.min_selectivity=0",
           "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", "report=none"]  # fmt: skip
TIMING = ("analysis_seconds",)


def _merge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "intraneuron", "merge", *args, "--tracking-uri", "sqlite:///store/mlflow.db"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store: a job of the whole range, a 2-shard sweep merged by the callback, a 3-shard sweep
    merged by the command, and a sweep missing a shard. -> (cwd, {name: parent or run id}, outputs)."""
    from tests.test_runner import launch, runs_of

    cwd = tmp_path_factory.mktemp("layer_shards")
    done = {"one": launch(cwd, *OPTIONS)}
    done["two"] = launch(cwd, "sweep=layer_shards", "neurons.shards=2", "neurons.shard=0,1",
                         "hydra.sweep.dir=multirun/two", *OPTIONS)  # fmt: skip
    done["three"] = launch(cwd, "sweep=layer_shards", "neurons.shards=3", "neurons.shard=0,1,2",
                           "hydra.callbacks.merge_shards.enabled=false", "hydra.sweep.dir=multirun/three",
                           *OPTIONS)  # fmt: skip
    done["three_merge"] = _merge(cwd, str(cwd / "multirun/three"))
    done["gap"] = launch(cwd, "sweep=layer_shards", "neurons.shards=3", "neurons.shard=0,2",
                         "hydra.sweep.dir=multirun/gap", *OPTIONS)  # fmt: skip
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    client, runs = runs_of(cwd)
    (one,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "hydra.sweep_dir" not in r.data.tags]
    ids = {"one": one.info.run_id}
    for name in ("two", "three", "gap"):
        ids[name] = (cwd / f"multirun/{name}/mlflow_parent_run_id").read_text().strip()
    return cwd, client, ids, done


def _assert_same_layers(client, one: str, merged: str) -> None:
    from intraneuron.reports.artifacts import layer_metrics, load_summary, load_table

    for layer in (0, 1):
        for name in ("neurons", "pseudo_neurons", "categories", "segments", "pairs"):
            pd.testing.assert_frame_equal(load_table(client, merged, layer, name), load_table(client, one, layer, name))
        ours, theirs = load_summary(client, merged, layer), load_summary(client, one, layer)
        assert list(ours) == list(theirs)
        for key in ours.keys() - set(TIMING):
            assert ours[key] == theirs[key] or (np.isnan(ours[key]) and np.isnan(theirs[key])), key
        headline = layer_metrics(client.get_run(one), layer)
        assert layer_metrics(client.get_run(merged), layer) == pytest.approx(headline, nan_ok=True)
        # 13 headlines, each logged with its companions (pseudo-neurons' value, excess; intervals: off here)
        assert len([k for k in headline if not k.endswith(("_pseudo", "_excess", "_ci_low", "_ci_high"))]) == 13


@pytest.mark.slow
def test_two_shards_merged_by_the_sweep_callback_equal_one_job_of_the_layer(store):
    cwd, client, ids, done = store
    parent = client.get_run(ids["two"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["intraneuron.merged"] == "true"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{ids['two']}'")
    assert sorted(parent.data.tags["intraneuron.merged_from"].split(",")) == sorted(c.info.run_id for c in children)
    assert done["two"].stdout.count("merge_shards: layer") == 2
    _assert_same_layers(client, ids["one"], ids["two"])


@pytest.mark.slow
def test_three_uneven_shards_merged_by_the_command_equal_one_job_of_the_layer(store):
    cwd, client, ids, done = store
    lines = done["three_merge"].stdout.splitlines()
    assert lines[0].startswith("layer 0: merged 3 shards (neurons 0-31)") and "neurons_analysed=32" in lines[0]
    assert lines[1].startswith("layer 1: merged 3 shards (neurons 0-31)")
    children = client.search_runs([client.get_run(ids["three"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{ids['three']}'")  # fmt: skip
    from intraneuron.reports.artifacts import load_table

    sizes = sorted(len(load_table(client, c.info.run_id, 0, "neurons")) for c in children)
    assert sizes == [10, 11, 11], [(c.info.run_name, c.info.status) for c in children]
    assert client.get_run(ids["three"]).data.tags["intraneuron.merged"] == "true"
    _assert_same_layers(client, ids["one"], ids["three"])


@pytest.mark.slow
def test_a_missing_shard_is_a_gap_that_is_not_merged_unless_allowed(store):
    cwd, client, ids, done = store
    assert "shards not merged" in done["gap"].stderr and "shards 1 of neurons.shards=3" in done["gap"].stderr
    assert "jobs did not finish" not in done["gap"].stderr  # every job did: only the merge failed
    parent = client.get_run(ids["gap"])
    assert "intraneuron.merged" not in parent.data.tags and "shards 1" in parent.data.tags["intraneuron.merge_error"]
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep.jobs_finished"] == 2
    refused = _merge(cwd, ids["gap"])
    assert refused.returncode == 1
    assert "intraneuron merge: layer 0: shards 1 of neurons.shards=3 have no FINISHED run" in refused.stderr
    assert "--allow-gaps" in refused.stderr
    allowed = _merge(cwd, ids["gap"], "--allow-gaps")
    assert allowed.returncode == 0, allowed.stderr
    assert "(neurons 0-10, 22-31)" in allowed.stdout and "neurons_analysed=21" in allowed.stdout
    merged = client.get_run(ids["gap"])  # merged as asked: no longer failed, the error gone
    assert merged.info.status == "FINISHED" and merged.data.tags["intraneuron.merged"] == "true"
    assert "intraneuron.merge_error" not in merged.data.tags
