"""Shared fixtures: tiny random models with real tokenizers and small real-text token windows.

Nothing here downloads: models are built in-process, tokenizers and text come from installed packages.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import BUILDERS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """arch name -> directory of a saved tiny random model (built once per session, lazily)."""
    root = tmp_path_factory.mktemp("tiny-models")

    class Dirs(dict):
        def __missing__(self, arch):
            self[arch] = BUILDERS[arch](root / arch)
            return self[arch]

    return Dirs()


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model_dirs):
    from intraneuron.models.loading import load_model

    return load_model(str(tiny_model_dirs["gpt2"]))


@pytest.fixture(scope="session")
def austen_text() -> str:
    """The opening of Emma: real English for tokenisers (about 6k GPT-2 tokens)."""
    from intraneuron.corpus import austen

    return next(iter(austen()))[:30_000]


@pytest.fixture(scope="session")
def small_windows(tmp_path_factory, tiny_gpt2, austen_text):
    from intraneuron.corpus import build_windows

    return build_windows(
        [austen_text], tiny_gpt2.tokenizer, window_len=32, max_tokens=2048,
        cache_root=tmp_path_factory.mktemp("corpus-cache"), source_key="emma-opening",
    )


@pytest.fixture(scope="session")
def job_cache(tmp_path_factory):
    """A cache root shared by the in-process end-to-end tests (tiny models, token windows, profiles
    are built once per session); the Debian texts are still found under the project's .cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run_job(job_cache, tmp_path, monkeypatch):
    """Compose the real config with overrides and run one tracked job in this process, the way the
    CLI does (minus the process start): returns (JobSummary, MlflowClient of its store)."""
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from intraneuron.cli import run_job as tracked_job
    from intraneuron.paths import CONF_DIR

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("INTRANEURON_CACHE", str(job_cache))  # a test may point it elsewhere after this

    def run(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"tracking.tracking_uri={uri}"])
        return tracked_job(cfg), MlflowClient(uri)

    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A folder with a sqlite MLflow store at mlruns/mlflow.db, one per test module: creating its
    tables takes seconds, so once. (Modules with their own kind of store define their own.)"""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    (folder / "mlruns").mkdir()
    MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db").search_experiments()
    return folder
