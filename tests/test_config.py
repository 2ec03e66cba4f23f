"""The real config tree: every group option composes, validates and builds; each analysis declares
its groups and validates only those. (Bad values, one by one: tests/test_validation.py.)"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from sklearn.metrics import adjusted_rand_score

from intraneuron.analyses.two_fold import TwoFoldAnalysis
from intraneuron.analyses.two_fold.clustering import ClusteringConfig
from intraneuron.config import RUN_GROUPS, validate
from intraneuron.errors import MissingAssetError
from intraneuron.paths import CONF_DIR
from intraneuron.registry import analysis_class, available

# Options that cannot be validated as they stand: they need a value from the user.
TRAINED_BY_A_SCRIPT = {"universal_seeds"}  # presets whose models experiments/universal_seeds/train.py makes
REQUIRED_OVERRIDES = {
    ("corpus", "text_files"): ["corpus.options.paths=[{tmp}/notes.txt]"],
    ("analysis", "universal"): ["models=tiny_gpt2_seeds"],  # it compares models
    ("models", "tiny_gpt2_seeds"): ["analysis=universal"],
    ("models", "stanford_gpt2_small_seeds"): ["analysis=universal"],
}
GROUPS = [*RUN_GROUPS, *TwoFoldAnalysis.groups, "analysis"]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options_and_the_default_validates():
    assert all(options(group) for group in GROUPS)
    run = validate(compose_config())
    assert run.model.name == "smollm2-135m" and run.layers == [0]
    assert run.analysis.name == "two_fold" and sorted(run.groups) == sorted(TwoFoldAnalysis.groups)
    assert run.groups["embedding"].source == "model_input"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    (tmp_path / "notes.txt").write_text("Some text to read.")
    required = [o.format(tmp=tmp_path) for o in REQUIRED_OVERRIDES.get((group, option), [])]
    run = validate(compose_config(f"{group}={option}", *required))
    if group in RUN_GROUPS:
        assert getattr(run, group) is not None
    elif group == "analysis":
        assert run.analysis.name == {"intraneuron": "two_fold"}.get(option, option)
    else:
        assert run.groups[group] is not None


def test_option_names_equal_the_values_they_set():
    for option in options("embedding"):
        source = OmegaConf.load(CONF_DIR / "embedding" / f"{option}.yaml").source
        assert source == option or (option, source) == ("gpt2_xl_static", "static")
    for option in options("segmentation"):
        scheme = OmegaConf.load(CONF_DIR / "segmentation" / f"{option}.yaml").scheme
        assert scheme == option


def test_an_analysis_validates_only_the_groups_it_declares():
    # a broken two-fold group does not stop neuron_stats, which does not read it
    cfg = compose_config("analysis=neuron_stats", "core_tokens.rule=biggest", "segmentation.n_segments=1")
    run = validate(cfg)
    assert run.analysis.name == "neuron_stats" and list(run.groups) == ["neurons"]


def test_the_registry_lists_every_analysis_option():
    found = available()
    assert found["two_fold"] == "intraneuron.analyses.two_fold.TwoFoldAnalysis"
    assert found["neuron_stats"] == "intraneuron.analyses.neuron_stats.NeuronStatsAnalysis"
    assert found["intraneuron"].startswith("(alias")


@pytest.mark.parametrize("option", options("clustering"))
def test_every_clusterer_is_instantiated_and_separates_planted_clusters(option):
    clustering = ClusteringConfig.from_option(option)
    clustering.validate()
    if clustering.categories != "clusterer":
        assert clustering.categories == "wordnet"
        return
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    X = np.repeat(centres, 20, axis=0) + rng.normal(scale=0.1, size=(60, 16))  # [60, 16]
    labels = clustering.factory()(3).fit_predict(X)
    assert adjusted_rand_score(np.repeat(np.arange(3), 20), labels) > 0.9


@pytest.mark.parametrize("preset", options("experiment") + options("sweep"))
def test_every_preset_composes_and_validates(preset):
    group = "experiment" if preset in options("experiment") else "sweep"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={preset}"], return_hydra_config=True)
    if group == "sweep":
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    sources = [cfg.model.source, *(m.source for m in cfg.models.others)]
    if preset in TRAINED_BY_A_SCRIPT and not all(Path(p).exists() for p in sources):
        with pytest.raises(MissingAssetError, match=r"^models?[.\w]*\.source: .*seed_models/seed\d does not exist"):
            validate(cfg)  # the models come from the study's training script: a clear error without them
        return
    validate(cfg)


def test_an_unknown_group_option_names_the_group_and_the_choices():
    with pytest.raises(MissingConfigException) as caught:
        compose_config("model=gpt5")
    message = str(caught.value)
    assert "model/gpt5" in message and "smollm2-135m" in message and "tiny-gpt2" in message


@pytest.mark.parametrize("analysis", sorted(available()))
def test_the_smoke_experiment_validates_with_every_analysis(analysis):
    several = ["models=tiny_gpt2_seeds"] if analysis == "universal" else []  # it compares models
    run = validate(compose_config("experiment=smoke", f"analysis={analysis}", *several))
    assert run.model.name == "tiny-gpt2"


def test_the_quick_experiment_is_the_default_job_on_a_prefix_and_a_sample():
    default, quick = validate(compose_config()), validate(compose_config("experiment=quick"))
    assert quick.model.name == default.model.name == "smollm2-135m" and quick.layers == default.layers
    assert quick.corpus.name == default.corpus.name and quick.corpus.max_tokens == 131072
    assert default.corpus.max_tokens is None
    assert quick.groups["neurons"].select == "sample" and quick.groups["neurons"].n == 256
    assert quick.extraction.pseudo_neurons == 512  # above the analysed null's minimum, under the default
    assert type(quick.analysis) is type(default.analysis) and quick.report == default.report


def test_long_extraction_passes_point_to_the_quick_experiment():
    from intraneuron.extraction.engine import long_pass_hint

    assert long_pass_hint(10.0, 1_000, 1_000_000) is None  # too early to tell
    assert long_pass_hint(60.0, 900_000, 1_000_000) is None  # under five minutes left
    hint = long_pass_hint(60.0, 100_000, 1_500_000)  # 1,667 tok/s: 14 minutes left
    assert hint.startswith("extraction: about 14 min left at 1,667 tok/s") and "experiment=quick" in hint
    assert (CONF_DIR / "experiment" / "quick.yaml").is_file()


def test_help_lists_every_analysis_with_its_description(tmp_path):
    """`--help` lists conf/analysis/ from the registry, each with the first paragraph of its
    class's docstring, and imports no analysis (nor torch) to do it."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "intraneuron", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    section = done.stdout.split("== Analyses (analysis=<name>) ==")[1].split("==")[0]
    listed = " ".join(section.split())  # the descriptions are wrapped
    for name, target in available().items():
        if target.startswith("(alias of "):
            assert f"{name} alias of {target.removeprefix('(alias of ').rstrip(')')}" in listed
            continue
        summary = " ".join(inspect.getdoc(analysis_class(target)).split("\n\n")[0].split())
        assert f"{name} {summary}" in listed, (name, section)
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()}
    assert not {m for m in imported if m.split(".")[0] == "torch" or m.startswith("intraneuron.analyses")}


@pytest.mark.parametrize(
    ("option", "other", "changed"),
    [("ward", "kmeans", "clustering.estimator"), ("kmeans", "kmeans_silhouette", "clustering.k_choice")],
)
def test_a_clustering_option_changes_one_thing(option, other, changed):
    """A sweep over clustering options compares what their names say: ward vs kmeans the clusterer
    alone (both choose K by the gap statistic), kmeans vs kmeans_silhouette the K rule alone."""
    a, b = (pd.json_normalize(OmegaConf.to_container(compose_config(f"clustering={name}"))).iloc[0].to_dict()
            for name in (option, other))  # fmt: skip
    differ = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    assert differ and all(key == changed or key.startswith(f"{changed}.") for key in differ), differ
