"""End to end through the real CLI: Hydra multiruns of the real pipeline (tiny random GPT-2, 8k
tokens of the default corpus) with the basic and the joblib launcher, read back with MlflowClient."""

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

from intraneuron.cli import CONF_DIR
from intraneuron.paths import vendor_dir

REPO = Path(__file__).resolve().parents[1]
# Small and quick: 32 neurons, few permutations. Layer 5 does not exist in the 3-layer model, so
# those jobs fail validation (after their MLflow run is opened) while the others go on.
SMALL = ["neurons=range", "neurons.stop=32", "extraction.progress=false"]
BASE = ["experiment=smoke", *SMALL]
TINY = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=[0,1]",
        "core_tokens.n=30", "core_tokens.min_count=2",
        "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", *SMALL]  # fmt: skip


def launch(cwd: Path, *overrides: str, base: list[str] = BASE) -> subprocess.CompletedProcess[str]:
    cache = cwd / "cache"
    cache.mkdir(exist_ok=True)
    if not (cache / "vendor").exists():
        (cache / "vendor").symlink_to(vendor_dir())  # the Debian texts, unpacked by the set-up
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["INTRANEURON_CACHE"] = str(cache)
    flags = [o for o in overrides if o.startswith("--")]  # argparse wants them before overrides
    overrides = tuple(o for o in overrides if not o.startswith("--"))
    command = [sys.executable, "-m", "intraneuron", *flags, *base, *overrides,
               "tracking.tracking_uri=sqlite:///store/mlflow.db", "tracking.experiment=e2e"]  # fmt: skip
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

    for child in children:
        params, tags = child.data.params, child.data.tags
        layer = int(params["layer"])
        assert params["model.name"] == "tiny-gpt2" and params["core_tokens.n"] == "30"
        assert params["clustering.estimator._target_"] in {
            "sklearn.cluster.AgglomerativeClustering", "sklearn.cluster.KMeans"
        }
        assert f"layer={layer}" in tags["hydra.overrides"]
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
        assert metrics[f"layer_{layer}/neurons/n"] == 32
        assert 0 <= metrics[f"layer_{layer}/bottomup/top_sig_frac"] <= 1
        table = pd.read_parquet(download_artifacts(
            run_id=child.info.run_id, artifact_path=f"layer_{layer}/tables/neurons.parquet",
            tracking_uri=client.tracking_uri,
        ))  # fmt: skip
        assert table["neuron"].tolist() == list(range(32))
        assert (table["layer"] == layer).all() and table["n_core"].between(10, 30).all()
        analysed = table[table["skipped"] == ""]
        assert len(analysed) == metrics[f"layer_{layer}/neurons/analysed"]
        assert analysed["p_top"].between(0, 1).all()

    assert done.returncode == 1
    assert "ConfigError: layer=5 is not allowed" in done.stderr


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("basic_sweep")
    done = launch(cwd, "--multirun", "layer=0,1,5", "clustering=ward,kmeans")
    return cwd, done


def test_basic_launcher_sweep_lands_every_job_and_records_the_failures(basic_sweep):
    cwd, done = basic_sweep
    check_sweep(cwd, done, [0, 1, 5], ["ward", "kmeans"])


def test_a_sweep_over_analysis_keys_extracts_each_layer_once_and_a_rerun_extracts_nothing(basic_sweep):
    cwd, _ = basic_sweep
    first = profile_entries(cwd)
    assert len(first) == 2  # layers 0 and 1; the clusterer does not change the extraction
    rerun = launch(cwd, "--multirun", "layer=0,1", "clustering=ward,average_cosine")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert profile_entries(cwd) == first  # same entries, untouched
    assert (rerun.stdout + rerun.stderr).count("profile from cache") == 4


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_at_a_time_and_lands_every_job(tmp_path):
    done = launch(tmp_path, "--multirun", "layer=0,1,5", "clustering=ward,kmeans",
                  "hydra/launcher=parallel")  # fmt: skip
    assert "Joblib.Parallel(n_jobs=2" in done.stderr + done.stdout
    check_sweep(tmp_path, done, [0, 1, 5], ["ward", "kmeans"])


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem != "smoke")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_on_the_tiny_model(preset, tmp_path):
    done = launch(tmp_path, f"experiment={preset}", base=TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["layer_0/neurons/analysed"] > 0
    assert runs[0].data.metrics["layer_1/neurons/analysed"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_preset_runs_on_the_tiny_model(preset, tmp_path):
    done = launch(tmp_path, f"sweep={preset}", base=TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(runs) - 1 >= 2
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_missing_static_checkpoint_fails_before_the_extraction(tmp_path):
    done = launch(tmp_path, "layer=0", "embedding=gpt2_xl_static",
                  f"embedding.checkpoint={tmp_path}/no-such-checkpoint",
                  f"embedding.tokenizer={tmp_path}/no-such-checkpoint", base=TINY)  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "MissingAssetError" in done.stderr
    assert not (tmp_path / "cache" / "profiles").exists()  # nothing was extracted
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "no-such-checkpoint" in runs[0].data.tags["error"]


def test_static_embeddings_of_another_checkpoint_map_the_analysed_vocabulary(tmp_path):
    # tiny-llama analysed, tiny-gpt2's input embeddings as the "static" checkpoint: laid out like
    # GPT-2's (transformer.wte.weight [50257, 32]) and read alone from its safetensors file.
    from intraneuron.models.tiny import tiny_gpt2

    checkpoint = tiny_gpt2(tmp_path / "static-checkpoint")
    done = launch(tmp_path, "model=tiny-llama", "layer=1", "embedding=gpt2_xl_static",
                  f"embedding.checkpoint={checkpoint}", f"embedding.tokenizer={checkpoint}",
                  base=TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client, (run,) = runs_of(tmp_path)
    assert run.data.params["embedding.source"] == "static"
    assert run.data.metrics["layer_1/embedding/unembedded_frac"] == 0.0  # same vocabulary
    table = pd.read_parquet(download_artifacts(
        run_id=run.info.run_id, artifact_path="layer_1/tables/neurons.parquet",
        tracking_uri=client.tracking_uri,
    ))  # fmt: skip
    assert len(table) == 32 and (table["skipped"] == "").all()
