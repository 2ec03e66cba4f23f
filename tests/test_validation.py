"""Bad values fail before the model loads, in one line naming a key that exists, leaving no RUNNING run.

The battery composes the real config (`model=tiny-gpt2`) with one mistake per case and runs the
tracked job in process (`cli.run_job`, an MLflow run around `runner.run`) with the model loaders
replaced by a tripwire; a few cases go through the real command line. A static walk then checks
that every key a `ConfigError` can name in the source exists in the config tree.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import intraneuron
from intraneuron import paths
from intraneuron.errors import ConfigError, MissingAssetError
from tests.test_tracking_preflight import no_retry_waits

PACKAGE_DIR = Path(intraneuron.__file__).resolve().parent
UNSET_VARIABLE = "INTRANEURON_TEST_UNSET_VARIABLE"

# Keys of ConfigErrors that name an argument, not a config key (code mistakes raise ValueError).
API_ARGUMENTS: dict[str, str] = {
    "--out": "the --out of `intraneuron show` and `intraneuron compare`",
    "--port": "the --port of `intraneuron ui`",
}


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...]
    key: str  # what the error names (ConfigError.key, or the start of a MissingAssetError's message)
    error: type = ConfigError
    run: str | None = "FAILED"  # what the store holds afterwards: one FAILED run, or no run at all

    @property
    def about_tracking(self) -> bool:
        return any(o.lstrip("+").startswith("tracking.tracking_uri=") for o in self.overrides)


def case(id_, *overrides, key, error=ConfigError, run="FAILED") -> Case:
    return Case(id_, overrides, key, error, run)


# Placeholders: {files} = a folder of prepared text files, {db} = the test store, {port} = a free
# local port with nothing listening, {models} = a folder of local model folders holding config.json
# alone (gpt2: tiny-gpt2's shape, d_mlp 128; unknown: a model_type transformers does not know).
CASES = [
    # the top of the tree: only config groups and the entry config's own keys
    case("top-level-unknown-key", "+bogus_top=1", key="bogus_top"),
    # layer
    case("layer-beyond-depth", "layer=3", key="layer"),
    case("layer-list-beyond-depth", "layer=[0,5]", key="layer"),
    case("layer-negative", "layer=-1", key="layer"),
    case("layer-repeated", "layer=[0,0]", key="layer"),
    case("layer-empty-list", "layer=[]", key="layer"),
    case("layer-not-an-int", "layer=abc", key="layer"),
    case("layer-bool", "layer=true", key="layer"),
    case("layer-unresolvable", "layer=${nope}", key="layer", run=None),
    # model
    case("model-dtype", "model.dtype=float8", key="model.dtype"),
    case("model-device", "model.device=gpu", key="model.device"),
    case("model-source-missing-dir", "model.source=/nonexistent/intraneuron-model", key="model.source",
         error=MissingAssetError),
    case("model-source-missing-gguf", "model.source=missing-model.gguf", key="model.source",
         error=MissingAssetError),
    case("model-n-layers-type", "model.n_layers=abc", key="model.n_layers"),
    case("model-n-layers-zero", "model.n_layers=0", key="model.n_layers"),
    case("model-trust-remote-code-type", "model.trust_remote_code=maybe", key="model.trust_remote_code"),
    case("model-unknown-key", "+model.revison=main", key="model.revison"),
    case("model-unknown-model-type", "model.source={models}/unknown", key="model.source"),
    # corpus
    case("corpus-window-len-zero", "corpus.window_len=0", key="corpus.window_len"),
    case("corpus-prepend-bos-type", "corpus.prepend_bos=maybe", key="corpus.prepend_bos"),
    case("corpus-window-len-bos", "corpus.window_len=1", "corpus.prepend_bos=true", key="corpus.window_len"),
    case("corpus-window-len-type", "corpus.window_len=abc", key="corpus.window_len"),
    case("corpus-max-tokens-below-window", "corpus.max_tokens=10", key="corpus.max_tokens"),
    case("corpus-source-unknown", "corpus.source=nope", key="corpus.source"),
    case("corpus-options-of-no-source", "+corpus.options.paths=[a.txt]", key="corpus.options"),
    case("corpus-options-of-another-source", "corpus=text_files", "corpus.source=austen",
         "corpus.options.paths=[{files}/good.txt]", key="corpus.options"),
    case("corpus-options-type", "corpus.options=abc", key="corpus.options"),
    case("corpus-text-files-unset", "corpus=text_files", key="corpus.options.paths"),
    case("corpus-text-files-missing", "corpus=text_files", "corpus.options.paths=[{files}/missing.txt]",
         key="corpus.options.paths", error=MissingAssetError),
    case("corpus-text-files-no-match", "corpus=text_files", "corpus.options.paths=[{files}/*.md]",
         key="corpus.options.paths", error=MissingAssetError),
    case("corpus-text-files-empty", "corpus=text_files", "corpus.options.paths=[{files}/empty.txt]",
         key="corpus.options.paths"),
    case("corpus-text-files-not-utf8", "corpus=text_files",
         "corpus.options.paths=[{files}/good.txt,{files}/latin1.txt]", key="corpus.options.paths"),
    case("corpus-text-files-suffix", "corpus=text_files", "corpus.options.paths=[{files}/table.csv]",
         key="corpus.options.paths"),
    case("corpus-jsonl-without-field", "corpus=text_files", "corpus.options.paths=[{files}/records.jsonl]",
         key="corpus.options.text_field"),
    case("corpus-jsonl-not-json", "corpus=text_files", "corpus.options.paths=[{files}/broken.jsonl]",
         key="corpus.options.paths"),
    # extraction
    case("extraction-top-k-zero", "extraction.top_k=0", key="extraction.top_k"),
    case("extraction-pseudo-neurons-negative", "extraction.pseudo_neurons=-1", key="extraction.pseudo_neurons"),
    case("extraction-skip-first-negative", "extraction.skip_first_positions=-1", key="extraction.skip_first_positions"),
    case("extraction-top-k-type", "extraction.top_k=many", key="extraction.top_k"),
    case("extraction-hist-range-empty", "extraction.hist_min=5", "extraction.hist_max=5", key="extraction.hist_min"),
    case("extraction-hist-min-nan", "extraction.hist_min=nan", key="extraction.hist_min"),
    case("extraction-hist-bins-zero", "extraction.hist_bins=0", key="extraction.hist_bins"),
    case("extraction-site", "extraction.site=mlp.out", key="extraction.site"),
    case("extraction-input-site", "extraction.input_site=resid_post", key="extraction.input_site"),
    case("extraction-batch-size-zero", "extraction.batch_size=0", key="extraction.batch_size"),
    case("extraction-fold-block-zero", "extraction.fold_block_windows=0", key="extraction.fold_block_windows"),
    case("extraction-fold-block-negative", "extraction.fold_block_windows=-64", key="extraction.fold_block_windows"),
    case("extraction-fold-block-fraction", "extraction.fold_block_windows=1.5", key="extraction.fold_block_windows"),
    case("extraction-fold-block-bool", "extraction.fold_block_windows=true", key="extraction.fold_block_windows"),
    case("extraction-skip-whole-window", "extraction.skip_first_positions=128", key="extraction.skip_first_positions"),
    case("extraction-skip-short-window", "corpus.window_len=16", "extraction.skip_first_positions=20",
         key="extraction.skip_first_positions"),
    case("extraction-skip-negative", "extraction.skip_first_positions=-1", key="extraction.skip_first_positions"),
    case("extraction-device", "extraction.device=cuda:x", key="extraction.device"),
    case("extraction-device-unresolvable", f"extraction.device=${{oc.env:{UNSET_VARIABLE}}}",
         key="extraction.device", run=None),
    case("extraction-unknown-key", "+extraction.topk=10", key="extraction.topk"),
    # neurons
    case("neurons-select", "neurons.select=some", key="neurons.select"),
    case("neurons-range-start", "neurons=range", "neurons.start=-1", key="neurons.start"),
    case("neurons-range-empty", "neurons=range", "neurons.start=5", "neurons.stop=5", key="neurons.stop"),
    case("neurons-sample-empty", "neurons=sample", "neurons.n=0", key="neurons.n"),
    case("neurons-unknown-key", "+neurons.count=3", key="neurons.count"),
    case("neurons-range-stop-beyond-width", "neurons=range", "neurons.stop=500", "model.source={models}/gpt2",
         key="neurons.stop"),
    # core_tokens
    case("core-rule", "core_tokens.rule=top_k", key="core_tokens.rule"),
    case("core-tau-above-one", "core_tokens=fraction_of_max", "core_tokens.tau=1.5", key="core_tokens.tau"),
    case("core-tau-zero", "core_tokens.tau=0", key="core_tokens.tau"),
    case("core-tau-type", "core_tokens.tau=half", key="core_tokens.tau"),
    case("core-q-one", "core_tokens.q=1.0", key="core_tokens.q"),
    case("core-n-one", "core_tokens.n=1", key="core_tokens.n"),
    case("core-unit", "core_tokens.unit=word", key="core_tokens.unit"),
    case("core-min-count", "core_tokens.min_count=0", key="core_tokens.min_count"),
    case("core-min-core-tokens", "core_tokens.min_core_tokens=2", key="core_tokens.min_core_tokens"),
    case("core-max-tokens", "core_tokens.max_tokens=1", key="core_tokens.max_tokens"),
    case("core-occurrence-n-above-top-k", "core_tokens=occurrence", "extraction.top_k=50", key="core_tokens.n"),
    case("core-occurrence-cap-above-top-k", "core_tokens=occurrence", "core_tokens.rule=fraction_of_max",
         "core_tokens.max_tokens=200", key="core_tokens.max_tokens"),
    case("core-unknown-key", "+core_tokens.treshold=0.5", key="core_tokens.treshold"),
    case("core-min-selectivity", "core_tokens.min_selectivity=-0.5", key="core_tokens.min_selectivity"),
    case("core-repeats", "core_tokens=occurrence", "core_tokens.repeats=drop", key="core_tokens.repeats"),
    case("core-cross-fit-type", "core_tokens.cross_fit=sometimes", key="core_tokens.cross_fit"),
    case("core-merge-variants-type", "core_tokens.merge_variants=sometimes", key="core_tokens.merge_variants"),
    case("core-pool", "core_tokens.pool=subwords", key="core_tokens.pool"),
    # embedding
    case("embedding-source", "embedding.source=glove", key="embedding.source"),
    case("embedding-multi-token", "embedding=gpt2_xl_static", "embedding.multi_token=sum", key="embedding.multi_token"),
    case("embedding-layer-input-without-site", "embedding=layer_input", "extraction.input_site=null",
         key="embedding.source"),
    case("embedding-unknown-key", "+embedding.checkpoint_path=x", key="embedding.checkpoint_path"),
    case("embedding-project-foreign-space", "embedding=gpt2_xl_static", "embedding.project_read_in=true",
         key="embedding.project_read_in"),
    # clustering
    case("clustering-k-range-low", "clustering.k_range=[1,8]", key="clustering.k_range"),
    case("clustering-k-range-reversed", "clustering.k_range=[8,2]", key="clustering.k_range"),
    case("clustering-k-range-length", "clustering.k_range=[2,3,4]", key="clustering.k_range"),
    case("clustering-k-range-element", "clustering.k_range=[2,null]", key="clustering.k_range"),
    case("clustering-n-categories", "clustering.n_categories=1", key="clustering.n_categories"),
    case("clustering-k-choice", "clustering.k_choice=elbow", key="clustering.k_choice"),
    case("clustering-n-references", "clustering.n_references=0", key="clustering.n_references"),
    case("clustering-reference", "clustering.reference=uniform", key="clustering.reference"),
    case("analysis-mantel-distance", "analysis.mantel_distance=euclidean", key="analysis.mantel_distance"),
    case("clustering-categories", "clustering.categories=lda", key="clustering.categories"),
    case("clustering-target-unknown", "clustering.estimator._target_=sklearn.cluster.Nope",
         key="clustering.estimator._target_"),
    case("clustering-target-no-fit-predict", "clustering.estimator._target_=sklearn.preprocessing.StandardScaler",
         key="clustering.estimator._target_"),
    case("clustering-target-builtins-open", "clustering.estimator._target_=builtins.open",
         key="clustering.estimator._target_"),
    case("clustering-estimator-null", "clustering.estimator=null", key="clustering.estimator"),
    case("clustering-estimator-unknown-kw", "+clustering.estimator.bogus_kw=3", key="clustering.estimator.bogus_kw"),
    case("clustering-estimator-k-set", "+clustering.estimator.n_clusters=3", key="clustering.estimator.n_clusters"),
    case("clustering-linkage", "clustering.estimator.linkage=bogus", key="clustering.estimator.linkage"),
    case("clustering-nested-target", "+clustering.estimator.memory._target_=builtins.open",
         key="clustering.estimator.memory._target_"),
    case("clustering-nested-target-in-list", "+clustering.estimator.memory=[1,{_target_:os.system}]",
         key="clustering.estimator.memory.1._target_"),
    case("clustering-hdbscan-min-size", "clustering=hdbscan", "clustering.estimator.min_cluster_size=0",
         key="clustering.estimator.min_cluster_size"),
    case("clustering-spectral-random-state", "clustering=spectral", "clustering.estimator.random_state=abc",
         key="clustering.estimator.random_state"),
    case("clustering-wordnet-with-estimator", "clustering=wordnet", "+clustering.estimator._target_=builtins.open",
         key="clustering.estimator"),
    # segmentation
    case("segmentation-scheme", "segmentation.scheme=quantile", key="segmentation.scheme"),
    case("segmentation-n-segments", "segmentation.n_segments=1", key="segmentation.n_segments"),
    case("segmentation-top-fraction-one", "segmentation.top_fraction=1.0", key="segmentation.top_fraction"),
    case("segmentation-top-fraction-zero", "segmentation=top_fraction", "segmentation.top_fraction=0",
         key="segmentation.top_fraction"),
    case("segmentation-unknown-key", "+segmentation.n_segment=3", key="segmentation.n_segment"),
    # analysis
    case("analysis-alpha", "analysis.alpha=1.5", key="analysis.alpha"),
    case("analysis-alpha-null", "analysis.alpha=null", key="analysis.alpha"),
    case("analysis-alias-alpha", "analysis=intraneuron", "analysis.alpha=0", key="analysis.alpha"),
    case("analysis-n-permutations", "analysis.n_permutations=0", key="analysis.n_permutations"),
    case("analysis-max-permutations-below-first-stage", "analysis.n_permutations=1000",
         "analysis.max_permutations=500", key="analysis.max_permutations"),
    case("analysis-n-permutations-type", "analysis.n_permutations=many", key="analysis.n_permutations"),
    case("analysis-n-mantel-negative", "analysis.n_mantel_permutations=-1", key="analysis.n_mantel_permutations"),
    case("analysis-homogeneity", "analysis.homogeneity=median", key="analysis.homogeneity"),
    case("analysis-min-pseudo-neurons", "analysis.min_pseudo_neurons=10", key="analysis.min_pseudo_neurons"),
    case("analysis-selectivity-match-below-min", "analysis.selectivity_match=100", key="analysis.selectivity_match"),
    case("analysis-selectivity-match-negative", "analysis.selectivity_match=-1", key="analysis.selectivity_match"),
    case("analysis-interval-blocks-one", "analysis.interval_blocks=1", key="analysis.interval_blocks"),
    case("analysis-interval-blocks-negative", "analysis.interval_blocks=-2", key="analysis.interval_blocks"),
    case("analysis-interval-blocks-type", "analysis.interval_blocks=ten", key="analysis.interval_blocks"),
    case("analysis-interval-blocks-with-corpus-shards", "extraction.corpus_shards=2",
         key="analysis.interval_blocks"),
    case("analysis-interval-neurons-one", "analysis.interval_neurons=1", key="analysis.interval_neurons"),
    case("analysis-interval-neurons-fraction", "analysis.interval_neurons=0.5", key="analysis.interval_neurons"),
    case("analysis-n-jobs-zero", "analysis.n_jobs=0", key="analysis.n_jobs"),
    case("analysis-n-jobs-null", "analysis.n_jobs=null", key="analysis.n_jobs"),
    case("analysis-unknown-key", "+analysis.permutations=10", key="analysis.permutations"),
    case("analysis-target-builtins-open", "analysis._target_=builtins.open", key="analysis._target_"),
    case("analysis-target-unknown-module", "analysis._target_=nope.Nope", key="analysis._target_"),
    case("analysis-target-abstract", "analysis._target_=intraneuron.analyses.base.Analysis", key="analysis._target_"),
    case("analysis-n-contexts-above-top-k", "analysis=neuron_stats", "analysis.n_contexts=500", key="analysis.n_contexts"),
    case("analysis-n-contexts-negative", "analysis=neuron_stats", "analysis.n_contexts=-1", key="analysis.n_contexts"),
    case("analysis-context-tokens-null", "analysis=neuron_stats", "analysis.context_tokens=null",
         key="analysis.context_tokens"),
    # universal analysis and the models group
    case("universal-without-other-models", "analysis=universal", key="models.others"),
    case("universal-baseline", "analysis=universal", "analysis.baseline=shuffle", "+models.others=[{name: b}]",
         key="analysis.baseline"),
    case("universal-threshold", "analysis=universal", "analysis.threshold=5", key="analysis.threshold"),
    case("universal-relative-threshold", "analysis=universal", "analysis.relative_threshold=1.0",
         key="analysis.relative_threshold"),
    case("universal-site", "analysis=universal", "analysis.site=hook_resid_pre", key="analysis.site"),
    case("universal-top-k", "analysis=universal", "analysis.top_k=0", key="analysis.top_k"),
    case("universal-drop-tokens", "analysis=universal", "analysis.drop_tokens=[spaces]", key="analysis.drop_tokens"),
    case("universal-memory", "analysis=universal", "analysis.memory_gb=0", key="analysis.memory_gb"),
    case("universal-other-layers-empty", "analysis=universal", "analysis.other_layers=[]",
         key="analysis.other_layers"),
    case("models-other-dtype", "analysis=universal", "+models.others=[{name: b, dtype: float7}]",
         key="models.others.0.dtype"),
    case("models-other-missing-dir", "analysis=universal",
         "+models.others=[{name: b, source: /nonexistent/intraneuron-model}]",
         key="models.others.0.source", error=MissingAssetError),
    case("models-duplicate-names", "analysis=universal", "+models.others=[{name: b}, {name: b}]",
         key="models.others"),
    case("models-unknown-key", "analysis=universal", "+models.others=[{name: b, colour: red}]",
         key="models.others.0.colour"),
    case("models-for-one-model-analysis", "+models.others=[{name: b}]", key="models.others"),
    # confidence analysis
    case("confidence-k", "analysis=confidence", "analysis.k=0", key="analysis.k"),
    case("confidence-selection", "analysis=confidence", "analysis.selection=loudest", key="analysis.selection"),
    case("confidence-candidates", "analysis=confidence", "analysis.candidates=0", key="analysis.candidates"),
    case("confidence-windows", "analysis=confidence", "analysis.n_windows=0", key="analysis.n_windows"),
    case("confidence-skip-first", "analysis=confidence", "analysis.skip_first=-1", key="analysis.skip_first"),
    case("confidence-skip-beyond-window", "analysis=confidence", "analysis.skip_first=500",
         key="analysis.skip_first"),
    case("confidence-frequency", "analysis=confidence", "analysis.frequency=wikipedia", key="analysis.frequency"),
    case("confidence-known-neurons", "analysis=confidence", "analysis.known_neurons=[-1]",
         key="analysis.known_neurons"),
    case("confidence-counts-file-missing", "analysis=confidence", "analysis.frequency=counts_file",
         "analysis.counts_file=/nonexistent/counts.json", key="analysis.counts_file"),
    case("confidence-counts-file-unset", "analysis=confidence", "analysis.frequency=counts_file",
         key="analysis.counts_file"),
    case("confidence-bootstrap", "analysis=confidence", "analysis.bootstrap=20", key="analysis.bootstrap"),
    case("confidence-noise-draws", "analysis=confidence", "analysis.noise_draws=-1", key="analysis.noise_draws"),
    # report
    case("report-top-by-unknown", "report.top_by=nonsense", key="report.top_by"),
    case("report-top-by-of-another-analysis", "analysis=neuron_stats", "report.top_by=epsilon2",
         key="report.top_by"),
    case("report-contexts-beyond-top-k", "report.contexts=500", key="report.contexts"),
    case("report-top-negative", "report.top=-1", key="report.top"),
    case("report-random-negative", "report.random=-2", key="report.random"),
    case("report-neuron-negative", "report.neurons=[-3]", key="report.neurons"),
    case("report-neurons-not-ints", "report.neurons=[a]", key="report.neurons"),
    case("report-neuron-beyond-width", "report.neurons=[200]", "model.source={models}/gpt2", key="report.neurons"),
    case("report-unknown-key", "+report.colour=red", key="report.colour"),
    case("report-lowest-contexts-negative", "report.lowest_contexts=-1", key="report.lowest_contexts"),
    case("report-logit-tokens-negative", "report.logit_tokens=-5", key="report.logit_tokens"),
    # tracking: the store is checked before a run is created, so none is
    case("tracking-file-store", "tracking.tracking_uri=mlruns", key="tracking.tracking_uri", run=None),
    case("tracking-sqlite-in-proc", "tracking.tracking_uri=sqlite:////proc/x/m.db", key="tracking.tracking_uri",
         run=None),
    case("tracking-sqlite-in-memory", "tracking.tracking_uri=sqlite://", key="tracking.tracking_uri", run=None),
    case("tracking-server-not-listening", "tracking.tracking_uri=http://127.0.0.1:{port}",
         key="tracking.tracking_uri", run=None),
    case("tracking-server-port-type", "tracking.tracking_uri=http://127.0.0.1:abc", key="tracking.tracking_uri",
         run=None),
    case("tracking-experiment-empty", "tracking.tracking_uri={db}", "tracking.experiment=''",
         key="tracking.experiment", run=None),
    case("tracking-experiment-parent-folder", "tracking.tracking_uri={db}", "tracking.experiment=..",
         key="tracking.experiment", run=None),
    case("tracking-experiment-path", "tracking.tracking_uri={db}", "tracking.experiment=runs/first",
         key="tracking.experiment", run=None),
    case("tracking-artifact-root-unwritable", "tracking.tracking_uri={db}", "tracking.artifact_root=/proc/x",
         key="tracking.artifact_root", run=None),
    case("tracking-unknown-key", "tracking.tracking_uri={db}", "+tracking.experiment_name=x",
         key="tracking.experiment_name", run=None),
    # a `_target_` anywhere else would let the command line reach any callable
    case("target-in-model", "+model._target_=builtins.open", key="model._target_"),
    case("target-in-corpus-options", "+corpus.options._target_=builtins.open", key="corpus.options._target_"),
    case("target-in-a-list", "+neurons.extra=[{_target_:builtins.open}]", key="neurons.extra.0._target_"),
    case("target-in-tracking", "tracking.tracking_uri={db}", "+tracking._target_=builtins.open",
         key="tracking._target_", run=None),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)

# The key each case's error named, filled by the battery, read by the key-existence test.
PRODUCED: dict[str, str] = {}


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def key_paths(cfg) -> set[str]:
    """Every dotted path of the tree (list items by index), without resolving interpolations."""
    found: set[str] = set()

    def walk(node, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for name, value in items:
            path = f"{prefix}.{name}" if prefix else str(name)
            found.add(path)
            walk(value, path)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_key(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return error.key
    return str(error).split(":", 1)[0]


def plus_paths(overrides) -> list[str]:
    return [o[1:].split("=", 1)[0] for o in overrides if o.startswith("+")]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    (folder / "good.txt").write_text("It is a truth universally acknowledged.\n", encoding="utf-8")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("Ma\u00eetre Corbeau, sur un arbre perch\u00e9\n".encode("latin-1"))
    (folder / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (folder / "records.jsonl").write_text('{"body": "no text field here"}\n', encoding="utf-8")
    (folder / "broken.jsonl").write_text('{"text": "unterminated\n', encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    folder = tmp_path_factory.mktemp("models")
    GPT2Config(n_embd=32, n_layer=3, n_head=4).save_pretrained(folder / "gpt2")
    (folder / "unknown").mkdir()
    (folder / "unknown" / "config.json").write_text('{"model_type": "made_up_arch"}', encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the whole battery (its tables are created once, here); each case logs to
    an experiment of its own."""
    import mlflow  # noqa: F401  imported here, so that no case's timing pays for it
    from mlflow import MlflowClient

    import intraneuron.tracking.run  # noqa: F401

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def no_model(monkeypatch):
    """Any case that reaches the model fails the test."""
    from intraneuron.models import config as model_config
    from intraneuron.models import loading

    def tripwire(*args, **kwargs):
        raise AssertionError("the model was loaded: validation let the bad value through")

    monkeypatch.setattr(model_config.ModelConfig, "load", tripwire)
    monkeypatch.setattr(loading, "load_model", tripwire)


def fill(overrides, *, files: Path, models: Path, db: str, port: int) -> list[str]:
    return [o.replace("{files}", str(files)).replace("{models}", str(models)).replace("{db}", db)
            .replace("{port}", str(port)) for o in overrides]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=CASE_IDS,
)
def test_bad_value_fails_before_the_model_in_one_line_naming_the_key(
    case, files, models, store, no_model, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from intraneuron.cli import run_job

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(UNSET_VARIABLE, raising=False)
    launch = tmp_path / "launch"  # relative tracking paths resolve here: nothing may be left in it
    launch.mkdir()
    monkeypatch.chdir(launch)

    experiment = re.sub(r"[^\w.-]", "_", case.id)
    overrides = fill(case.overrides, files=files, models=models, db=store, port=free_port())
    if not case.about_tracking:
        overrides += [f"tracking.tracking_uri={store}", f"tracking.experiment={experiment}"]
    cfg = compose_config("model=tiny-gpt2", *overrides)

    # a bad tracking location is reported at once, not after the back-off of MLflow's retries
    about_tracking = case.about_tracking or case.key.startswith("tracking.")
    with no_retry_waits() if about_tracking else contextlib.nullcontext():
        with pytest.raises((ConfigError, MissingAssetError)) as caught:
            run_job(cfg)

    error = caught.value
    message = str(error)
    assert isinstance(error, case.error), f"{type(error).__name__}: {message}"
    assert error_key(error) == case.key, message
    if isinstance(error, MissingAssetError):
        assert message.startswith(f"{case.key}: "), message
    else:
        assert message.startswith(f"{case.key}="), message
    assert "\n" not in message and "\r" not in message, message
    PRODUCED[case.id] = error_key(error)
    # the key is in the tree the user composed (a `+key` is there too: it names what was typed)
    assert error_key(error) in key_paths(cfg) | set(cfg), error_key(error)

    assert list(launch.iterdir()) == [], "the failed job left files in the launch directory"

    client = MlflowClient(store)  # a tracking case that reached this store would log to the default experiment
    found = client.get_experiment_by_name("intraneuron" if case.about_tracking else experiment)
    runs = client.search_runs([found.experiment_id]) if found is not None else []
    statuses = [run.info.status for run in runs]
    assert "RUNNING" not in statuses
    if case.run is None:
        assert statuses == []
    else:
        assert statuses == [case.run]
        assert runs[0].data.tags["error"].startswith(type(error).__name__ + ": " + case.key)


# The command line itself: exit status, no traceback, the error on one line of stderr.
# Two are enough through a real process (each costs a Python start and Hydra): the in-process
# battery above checks every case, and the basic-launcher multirun checks a layer error too.
CLI_CASES = {
    "clustering-nested-target": ("ConfigError", "+clustering.estimator.memory._target_=builtins.open"),
    "model-source-missing-dir": ("MissingAssetError", "model.source=/nonexistent/intraneuron-model"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_command_line_exits_non_zero_with_the_error_on_one_line(name, tmp_path):
    from mlflow import MlflowClient

    kind, override = CLI_CASES[name]
    key = override.lstrip("+").split("=", 1)[0]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env.update(INTRANEURON_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "intraneuron", "model=tiny-gpt2", override],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "[ERROR]" not in done.stderr, done.stderr  # no log record repeating the mistake
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{kind}: ")]
    separator = ": " if kind == "MissingAssetError" else "="
    assert len(lines) == 1 and lines[0].startswith(f"{kind}: {key}{separator}"), done.stderr
    assert not (tmp_path / "cache" / "models").exists(), "the model was built"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # the default store, under the cwd
    experiment = client.get_experiment_by_name("intraneuron")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FAILED"]


# ---- every key an error can name exists --------------------------------------------------------

GROUPS_WITH_OPTIONS = ("model", "models", "corpus", "extraction", "neurons", "core_tokens", "embedding",
                       "clustering", "segmentation", "analysis", "tracking", "report", "experiment")  # fmt: skip
REQUIRED_OVERRIDES = {("corpus", "text_files"): ["corpus.options.paths=[README.md]"]}


@pytest.fixture(scope="module")
def every_key() -> set[str]:
    """The union of the key paths of the default config and of every option of every group."""
    keys = key_paths(compose_config())
    for group in GROUPS_WITH_OPTIONS:
        for option in sorted(p.stem for p in (paths.CONF_DIR / group).glob("*.yaml")):
            keys |= key_paths(compose_config(f"{group}={option}", *REQUIRED_OVERRIDES.get((group, option), [])))
    return keys


def test_every_key_the_battery_named_exists(every_key):
    report = []
    for c in CASES:
        key = PRODUCED.get(c.id, c.key)
        added = [p for p in plus_paths(c.overrides) if key == p or key.startswith(p + ".")]
        if added:  # it names the key the user added, whose group exists (at the top: the key itself)
            ok = "." not in added[0] or added[0].split(".")[0] in every_key
        else:
            ok = key in every_key
        report.append((c.id, key, "+" if added else "", ok))
    print(f"\n{len(report)} keys named by the battery:")
    for id_, key, added, ok in report:
        print(f"  {'ok ' if ok else 'BAD'} {added:1} {key:45} {id_}")
    assert all(ok for *_, ok in report), [r for r in report if not r[-1]]
    covered_groups = {key.split(".")[0] for _, key, _, _ in report}
    assert covered_groups >= {"layer", "model", "corpus", "extraction", "neurons", "core_tokens", "embedding",
                              "clustering", "segmentation", "analysis", "tracking", "report"}  # fmt: skip


def _constants(tree: ast.Module) -> dict[str, object]:
    """A module's top-level names bound to literals (KEY = "tracking", CONFIG_KEYS = {...})."""
    found = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            name, value = stmt.target.id, stmt.value
        else:
            continue
        try:
            found[name] = ast.literal_eval(value)
        except ValueError:
            pass
    return found


def _static_key(node: ast.expr, local: dict, shared: dict) -> tuple[str, str] | None:
    """("key", text) for a literal key, ("prefix", text) for the static start of an f-string, None
    for a key known only at run time."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return "key", node.value
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and isinstance(node.slice, ast.Constant):
        table = local.get(node.value.id, shared.get(node.value.id))
        if isinstance(table, dict) and isinstance(table.get(node.slice.value), str):
            return "key", table[node.slice.value]
        return None
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                text += str(part.value)
                continue
            value = part.value
            if isinstance(value, ast.Name) and isinstance(local.get(value.id), str) and part.format_spec is None:
                text += local[value.id]
                continue
            return ("prefix", text) if text else None
        return "key", text
    return None


def _calls(name: str):
    """(file, line, first argument, module constants) of every `name(...)` call under the package."""
    modules = {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    shared: dict = {}
    for tree in modules.values():
        shared.update(_constants(tree))
    for path, tree in modules.items():
        local = _constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) != name:
                continue
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "key"), None)
            if first is not None:
                yield f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}", first, local, shared


def test_every_key_a_config_error_names_in_the_source_exists(every_key):
    checked, dynamic, bad = [], [], []
    for where, first, local, shared in _calls("ConfigError"):
        found = _static_key(first, local, shared)
        if found is None:
            dynamic.append((where, ast.unparse(first)))
            continue
        kind, text = found
        if kind == "key":
            ok = text in every_key or text in API_ARGUMENTS
        else:  # the static start of an f-string: "clustering.estimator." must be an existing node
            ok = text.rstrip(".") in every_key
        (checked if ok else bad).append((where, kind, text))
    for where, first, local, shared in _calls("MissingAssetError"):
        found = _static_key(first, local, shared)
        match = re.match(r"([a-z_]+(?:\.[a-z_]+)+): ", found[1]) if found else None
        if match:  # a message that starts with the key it is about
            (checked if match.group(1) in every_key else bad).append((where, "asset", match.group(1)))

    print(f"\n{len(checked)} keys named in the source, all found in the config tree:")
    for where, kind, text in sorted(checked, key=lambda r: r[2]):
        note = f"   (argument: {API_ARGUMENTS[text]})" if text in API_ARGUMENTS else ""
        note += "   (MissingAssetError)" if kind == "asset" else ""
        print(f"  {text + ('...' if kind == 'prefix' else ''):45} {where}{note}")
    print(f"{len(dynamic)} keys known only at run time (the battery covers them):")
    for where, expression in dynamic:
        print(f"  {{{expression}}}".ljust(47) + f" {where}")
    assert not bad, f"keys that are not in the config tree: {bad}"
    assert len(checked) >= 80, "the walk found too few raise sites: has the package moved?"
