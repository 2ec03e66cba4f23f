"""End to end: real Hydra multiruns through the CLI (tiny random GPT-2, 8k tokens of the default
corpus) with the basic and the joblib launcher, and single jobs run in process the way the CLI runs
them; everything is read back with MlflowClient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from intraneuron.paths import CONF_DIR
from intraneuron.reports.artifacts import load_summary, load_table

REPO = Path(__file__).resolve().parents[1]
# Small and quick: 32 neurons and 16 pseudo-neurons, few permutations. Layer 5 does not exist in the
# 3-layer model, so those jobs fail validation (after their MLflow run is opened) while the others go on.
SMALL = ["neurons=range", "neurons.stop=32", "extraction.pseudo_neurons=16", "extraction.progress=false",
         "analysis.interval_blocks=0"]  # corpus intervals: tests/test_corpus_intervals.py
BASE = ["experiment=smoke", *SMALL]
TINY = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=[0,1]",
        "core_tokens.n=30", "core_tokens.min_count=2",
        "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", *SMALL]  # fmt: skip


def launch(cwd: Path, *overrides: str, base: list[str] = BASE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["INTRANEURON_CACHE"] = str(cwd / "cache")  # the Debian texts are still found in the project
    flags = [o for o in overrides if o.startswith("--")]  # argparse wants them before overrides
    overrides = tuple(o for o in overrides if not o.startswith("--"))
    tracking = [] if any(o.startswith("tracking.tracking_uri=") for o in overrides) else [
        "tracking.tracking_uri=sqlite:///store/mlflow.db"]  # fmt: skip
    command = [sys.executable, "-m", "intraneuron", *flags, *base, *overrides, *tracking,
               "tracking.experiment=e2e"]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def runs_of(cwd: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{cwd}/store/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def profile_entries(cwd: Path) -> dict[str, float]:
    """Extraction cache entries -> modification time."""
    return {p.name: p.stat().st_mtime for p in (cwd / "cache" / "profiles").iterdir() if not p.name.startswith(".")}


def check_sweep(cwd: Path, done, layers: list[int], clusterers: list[str]) -> None:
    client, runs = runs_of(cwd)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert len(children) == len(layers) * len(clusterers)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FAILED"  # some jobs failed
    assert parent.data.metrics["sweep.jobs_total"] == len(children)
    summary = {f.path for f in client.list_artifacts(parent.info.run_id, "sweep_summary")}
    assert {"sweep_summary/summary.csv", "sweep_summary/summary.html"} <= summary
    # the sweep's last line names its parent run, how to compare its jobs and where to see them
    last = done.stdout.strip().splitlines()[-1]
    parent_id = parent.info.run_id
    assert last.startswith(f"sweep failed: MLflow parent run {parent_id} (")
    assert f"Compare: intraneuron compare {parent_id} --tracking-uri sqlite:///" in last
    assert f"#/experiments/{parent.info.experiment_id}/runs?" in last

    for child in children:
        params, tags = child.data.params, child.data.tags
        layer = int(params["layer"])
        assert params["model.name"] == "tiny-gpt2" and params["core_tokens.n"] == "30"
        assert params["clustering.categories"] in {"clusterer", "wordnet"}
        assert f"layer={layer}" in tags["hydra.overrides"]
        assert "progress" not in child.info.run_name  # named by what the sweep varies (a bool given to all is not)
        composed = yaml.safe_load(
            Path(download_artifacts(run_id=child.info.run_id, artifact_path="config/composed.yaml",
                                    tracking_uri=client.tracking_uri)).read_text()
        )  # fmt: skip
        assert composed["layer"] == layer and composed["model"]["name"] == "tiny-gpt2"
        if layer >= 3:
            assert child.info.status == "FAILED"
            assert tags["error"] == f"ConfigError: layer={layer} is not allowed: expected 0..2 (tiny-gpt2 has 3 layers)"
            assert not any(key.startswith("layer_") for key in child.data.metrics)
            continue
        assert child.info.status == "FINISHED", tags.get("error")
        assert tags["model"] == "tiny-gpt2" and tags["layer"] == str(layer)
        assert len(tags[f"cache_key.layer_{layer}"]) == 32
        metrics = child.data.metrics
        headline = [name for name in tags["intraneuron.headline"].split(",")]
        logged = {k for k in metrics if k.startswith(f"L{layer}/")}
        assert {f"L{layer}/{n}" for n in headline} <= logged  # and beside them only their companions:
        assert logged <= {f"L{layer}/{n}{part}{bound}" for n in headline for part in ("", "_pseudo", "_excess")
                          for bound in ("", "_ci_low", "_ci_high")}  # null value, excess, intervals  # fmt: skip
        assert not any(k.startswith("layer_") for k in metrics)  # the rest is in the summary table
        summary = load_summary(client, child.info.run_id, layer)
        assert summary["neurons/n"] == 32
        assert 0 <= metrics[f"L{layer}/top_segment_homogeneous_frac"] <= 1
        assert metrics[f"L{layer}/top_segment_homogeneous_frac"] == summary["bottomup/top_sig_frac_bh"]
        table = pd.read_parquet(download_artifacts(
            run_id=child.info.run_id, artifact_path=f"layer_{layer}/tables/neurons.parquet",
            tracking_uri=client.tracking_uri,
        ))  # fmt: skip
        assert table["neuron"].tolist() == list(range(32))
        assert (table["layer"] == layer).all() and table["n_core"].between(10, 30).all()
        analysed = table[table["skipped"] == ""]
        assert len(analysed) == metrics[f"L{layer}/neurons_analysed"]
        assert analysed["p_top"].between(0, 1).all()
        artifacts = {f.path for f in client.list_artifacts(child.info.run_id)}
        assert {f"L{layer}_homogeneity_by_segment.png", f"L{layer}_neuron_distributions.png"} <= artifacts

    assert done.returncode == 1
    assert "ConfigError: layer=5 is not allowed" in done.stderr


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("basic_sweep")
    # each job runs in its own output folder (chdir), the caches elsewhere (INTRANEURON_CACHE)
    done = launch(cwd, "--multirun", "layer=0,1,5", "clustering=ward,wordnet", "hydra.job.chdir=true")
    return cwd, done


def test_basic_launcher_sweep_lands_every_job_and_records_the_failures(basic_sweep):
    cwd, done = basic_sweep
    check_sweep(cwd, done, [0, 1, 5], ["ward", "wordnet"])


def test_jobs_find_the_texts_and_wordnet_wherever_the_cache_is_and_whatever_the_working_directory(basic_sweep):
    """The default corpus's Debian texts and WordNet are found under the project, wherever
    INTRANEURON_CACHE points and although Hydra moved each job into its output folder; the relative
    tracking URI is the launch directory's store, not one per job folder."""
    cwd, _ = basic_sweep
    _, runs = runs_of(cwd)
    wordnet = [r for r in runs if r.data.params.get("clustering.categories") == "wordnet"
               and r.info.status == "FINISHED"]  # fmt: skip
    assert len(wordnet) == 2
    client, _ = runs_of(cwd)
    for run in wordnet:
        summary = load_summary(client, run.info.run_id, int(run.data.params["layer"]))
        assert summary["categories/label_coverage_mean"] > 0
    assert (cwd / "cache" / "profiles").is_dir()  # INTRANEURON_CACHE, not the project's .cache
    job_dirs = [Path(r.data.tags["hydra.output_dir"]) for r in runs if "hydra.output_dir" in r.data.tags]
    assert job_dirs and all(cwd in d.parents for d in job_dirs)
    assert not [p for d in job_dirs for p in d.rglob("*.db")]  # nothing tracked relative to a job folder


def test_jobs_over_analysis_keys_extract_each_layer_once_and_a_rerun_extracts_nothing(
    run_job, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="intraneuron.extraction")
    for clustering in ("ward", "kmeans_silhouette"):  # k-means with the gap statistic costs 50x Ward
        summary, _ = run_job(*TINY, f"clustering={clustering}")
        assert sorted(summary.layers) == [0, 1]
    first = profile_entries(tmp_path)
    assert len(first) == 2  # layers 0 and 1; the clusterer does not change the extraction
    assert caplog.text.count("profile from cache") == 2  # the second job read both
    for clustering in ("ward", "average_cosine"):
        run_job(*TINY, f"clustering={clustering}")
    assert profile_entries(tmp_path) == first  # same entries, untouched
    assert caplog.text.count("profile from cache") == 6


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_at_a_time_and_lands_every_job(tmp_path):
    done = launch(tmp_path, "--multirun", "layer=0,1,5", "clustering=ward,kmeans_silhouette",
                  "hydra/launcher=parallel")  # fmt: skip
    assert "Joblib.Parallel(n_jobs=2" in done.stderr + done.stdout
    check_sweep(tmp_path, done, [0, 1, 5], ["ward", "kmeans_silhouette"])


# the two-fold presets; those of other analyses (`override /analysis`) run in their own tests
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if p.stem not in ("smoke", "quick") and "override /analysis" not in p.read_text())  # fmt: skip


@pytest.mark.slow
def test_every_experiment_preset_runs_on_the_tiny_model_in_one_multirun(tmp_path):
    done = launch(tmp_path, "--multirun", f"experiment={','.join(EXPERIMENTS)}", base=TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(EXPERIMENTS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["L0/neurons_analysed"] > 0
        assert run.data.metrics["L1/neurons_analysed"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_preset_runs_on_the_tiny_model(preset, tmp_path):
    done = launch(tmp_path, f"sweep={preset}", base=TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(runs) - 1 >= 2
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_missing_static_checkpoint_fails_before_the_extraction(run_job, tmp_path, monkeypatch):
    from intraneuron.errors import MissingAssetError

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingAssetError, match="no-such-checkpoint"):
        run_job(*TINY, "layer=0", "embedding=gpt2_xl_static",
                f"embedding.checkpoint={tmp_path}/no-such-checkpoint",
                f"embedding.tokenizer={tmp_path}/no-such-checkpoint")  # fmt: skip
    assert not (tmp_path / "cache" / "profiles").exists()  # nothing was extracted
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("intraneuron").experiment_id])
    assert run.info.status == "FAILED"
    assert "no-such-checkpoint" in run.data.tags["error"]


def test_a_neuron_range_beyond_the_layer_fails_after_loading_before_the_extraction(run_job, tmp_path, monkeypatch):
    # a packaged model has no config.json to read first: its width (128) is known once it is loaded
    from intraneuron.errors import ConfigError

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"^neurons\.stop=500 is not allowed: expected <= d_mlp=128"):
        run_job(*TINY, "layer=0", "neurons.stop=500")
    assert not (tmp_path / "cache" / "profiles").exists()  # nothing was extracted


def test_static_embeddings_of_another_checkpoint_map_the_analysed_vocabulary(run_job, tmp_path):
    # tiny-llama analysed, tiny-gpt2's input embeddings as the "static" checkpoint: laid out like
    # GPT-2's (transformer.wte.weight [50257, 32]) and read alone from its safetensors file.
    from intraneuron.models.tiny import tiny_gpt2

    checkpoint = tiny_gpt2(tmp_path / "static-checkpoint")
    summary, client = run_job(*TINY, "model=tiny-llama", "layer=1", "embedding=gpt2_xl_static",
                              f"embedding.checkpoint={checkpoint}", f"embedding.tokenizer={checkpoint}",
                              "core_tokens.min_selectivity=0")  # every neuron analysed fmt: skip
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["embedding.source"] == "static"
    assert load_summary(client, run.info.run_id, 1)["embedding/unembedded_frac"] == 0.0  # same vocabulary
    table = load_table(client, run.info.run_id, 1, "neurons")
    assert len(table) == 32 and (table["skipped"] == "").all()
