"""The real config tree: every group option composes, validates and builds; every bad value fails
before a model is loaded, with a message that names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from intraneuron import runner
from intraneuron.build import clusterer_factory_of
from intraneuron.cli import CONF_DIR
from intraneuron.config import SCHEMAS, validate
from intraneuron.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Options that cannot be validated as they stand: they need a value from the user.
REQUIRED_OVERRIDES = {("corpus", "text_files"): ["corpus.options.paths=[README.md]"]}


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [(group, option) for group in SCHEMAS if group != "tracking" for option in options(group)]


def test_every_schema_group_has_options_and_the_default_validates():
    assert all(options(group) for group in SCHEMAS)
    run = validate(compose_config())
    assert run.model.name == "smollm2-135m" and run.layers == [0]
    assert run.embedding.source == "model" and run.clustering.categories == "clusterer"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_config(f"{group}={option}", *REQUIRED_OVERRIDES.get((group, option), []))
    run = validate(cfg)
    assert getattr(run, group) is not None


@pytest.mark.parametrize("option", options("clustering"))
def test_every_clusterer_is_instantiated_and_separates_planted_clusters(option):
    run = validate(compose_config(f"clustering={option}"))
    if run.clustering.categories != "clusterer":
        assert run.clustering.categories == "wordnet"
        return
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    X = np.repeat(centres, 20, axis=0) + rng.normal(scale=0.1, size=(60, 16))  # [60, 16]
    labels = clusterer_factory_of(run.clustering)(3).fit_predict(X)
    truth = np.repeat(np.arange(3), 20)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) > 0.9


@pytest.mark.parametrize("preset", options("experiment") + options("sweep"))
def test_every_preset_composes_and_validates(preset):
    group = "experiment" if preset in options("experiment") else "sweep"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={preset}"], return_hydra_config=True)
    if group == "sweep":
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    validate(cfg)


BAD_VALUES = [
    (["layer=abc"], "layer"),
    (["layer=[]"], "layer"),
    (["model=tiny-gpt2", "layer=3"], "layer"),
    (["model=tiny-gpt2", "layer=[0,7]"], "layer"),
    (["core_tokens.n=many"], "core_tokens.n"),
    (["core_tokens=fraction_of_max", "core_tokens.tau=1.5"], "core_tokens.tau"),
    (["core_tokens=fraction_of_max", "core_tokens.tau=0"], "core_tokens.tau"),
    (["core_tokens.rule=biggest"], "core_tokens.rule"),
    (["core_tokens=occurrence", "core_tokens.n=500"], "core_tokens.n"),
    (["+core_tokens.treshold=0.5"], "core_tokens.treshold"),
    (["neurons=range", "neurons.start=10", "neurons.stop=10"], "neurons.stop"),
    (["neurons=sample", "neurons.n=0"], "neurons.n"),
    (["neurons.select=some"], "neurons.select"),
    (["model.dtype=float8"], "model.dtype"),
    (["corpus.window_len=0"], "corpus.window_len"),
    (["clustering.k_range=[5,3]"], "clustering.k_range"),
    (["clustering.estimator._target_=sklearn.cluster.NoSuchThing"], "clustering.estimator._target_"),
    (["segmentation.n_segments=1"], "segmentation.n_segments"),
    (["analysis.alpha=2"], "analysis.alpha"),
    (["analysis.n_permutations=-5"], "analysis.n_permutations"),
    (["embedding=layer_input", "extraction.input_site=null"], "embedding.source"),
    (["tracking.tracking_uri=mlruns"], "tracking.tracking_uri"),
    (["corpus=text_files"], "corpus.options.paths"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_fail_before_any_model_is_loaded_naming_the_key(overrides, key, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(runner, "load_model_handle", no_model)
    with pytest.raises(ConfigError) as caught:
        runner.run(compose_config(*overrides), tracker=None)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}=")


def test_an_unknown_group_option_names_the_group_and_the_choices():
    with pytest.raises(MissingConfigException) as caught:
        compose_config("model=gpt5")
    message = str(caught.value)
    assert "model/gpt5" in message and "smollm2-135m" in message and "tiny-gpt2" in message


def test_the_cli_exits_non_zero_with_one_readable_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "intraneuron", "model=tiny-gpt2", "layer=9",
         f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/out"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "ConfigError: layer=9 is not allowed: expected 0..2 (tiny-gpt2 has 3 layers)" in done.stderr
