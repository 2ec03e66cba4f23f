"""Structured config schemas and the checks every run passes before any model is loaded.

Each config group (`conf/<group>/*.yaml`) has one schema here. `validate(cfg)` merges each group onto
its schema, which rejects unknown keys and values of the wrong type, then checks ranges and
cross-group constraints (a layer beyond the model's depth, a core-token threshold outside its range,
an empty neuron set, ...). Every failure is a ConfigError naming the key, the value and what is
allowed. Nothing here loads weights or reads the corpus: only a local model's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from intraneuron.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "smollm2-135m"  # packaged name, tiny-* test model, directory, .gguf file or hub id
    n_layers: int | None = None  # checked against `layer` before loading; None: read config.json
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class CorpusConfig:
    name: str = "gutenberg"
    source: str = "gutenberg_novels"
    options: dict[str, Any] = field(default_factory=dict)
    window_len: int = 128
    max_tokens: int | None = None
    prepend_bos: bool = False


@dataclass
class ExtractionConfig:
    top_k: int = 100
    site: str = "mlp.hook_post"
    input_site: str | None = "hook_resid_pre"
    track_type_max: bool = True
    hist_min: float = -10.0
    hist_max: float = 10.0
    hist_bins: int = 200
    skip_first_positions: int = 0
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True


@dataclass
class NeuronsConfig:
    select: str = "all"  # all | range | sample
    start: int = 0  # range: [start, stop)
    stop: int | None = None  # range: None = the layer's last neuron
    n: int = 256  # sample: how many
    seed: int = 0  # sample: which


@dataclass
class CoreTokensConfig:
    unit: str = "type"  # type | occurrence
    rule: str = "top_n"
    n: int = 100
    tau: float = 0.5
    q: float = 0.99
    max_tokens: int | None = None
    min_count: int = 5
    min_core_tokens: int = 10
    drop_whitespace_punct: bool = False
    drop_byte_fragments: bool = False


@dataclass
class EmbeddingConfig:
    source: str = "model"  # static | model | layer_input
    checkpoint: str | None = None  # static
    tokenizer: str | None = None  # static
    tensor_name: str | None = None  # static
    multi_token: str = "mean"  # static
    revision: str | None = None  # static
    local_files_only: bool = False  # static
    site: str | None = None  # layer_input: the extraction's input site


@dataclass
class ClusteringConfig:
    categories: str = "clusterer"  # clusterer: cluster the vectors | wordnet: lexical supersenses
    estimator: Any = None  # clusterer: a `_target_` config of any class with fit_predict
    normalize: bool = True  # L2-normalise the vectors before clustering
    n_categories: int | None = None  # None: K chosen by cosine silhouette over k_range
    k_range: list[int] = field(default_factory=lambda: [2, 8])


@dataclass
class SegmentationConfig:
    scheme: str = "equal_count"
    n_segments: int = 10
    top_fraction: float = 0.9


@dataclass
class AnalysisConfig:
    name: str = "intraneuron"
    homogeneity: str = "pairwise"  # pairwise | centroid
    n_permutations: int = 1000
    n_mantel_permutations: int = 999
    alpha: float = 0.05
    seed: int = 0
    n_jobs: int = 1


@dataclass
class TrackingSchema:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "intraneuron"
    artifact_root: str | None = None


SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "corpus": CorpusConfig,
    "extraction": ExtractionConfig,
    "neurons": NeuronsConfig,
    "core_tokens": CoreTokensConfig,
    "embedding": EmbeddingConfig,
    "clustering": ClusteringConfig,
    "segmentation": SegmentationConfig,
    "analysis": AnalysisConfig,
    "tracking": TrackingSchema,
}
NEURON_SELECTIONS = ("all", "range", "sample")
CORE_TOKEN_UNITS = ("type", "occurrence")
CATEGORY_SOURCES = ("clusterer", "wordnet")
_EXTRACTION_SITES = ("mlp.hook_post", "mlp.hook_pre")
_INPUT_SITES = ("hook_resid_pre", None)


@dataclass
class RunConfig:
    """The validated, typed run: what `runner.run` consumes."""

    layers: list[int]
    model: ModelConfig
    corpus: CorpusConfig
    extraction: ExtractionConfig
    neurons: NeuronsConfig
    core_tokens: CoreTokensConfig
    embedding: EmbeddingConfig
    clustering: ClusteringConfig
    segmentation: SegmentationConfig
    analysis: AnalysisConfig
    tracking: TrackingSchema


def validate(cfg: DictConfig) -> RunConfig:
    """Type- and range-check the composed config; raise ConfigError on the first bad value."""
    cfg = _resolved(cfg)
    groups = {name: _typed(cfg, name, schema) for name, schema in SCHEMAS.items()}
    run = RunConfig(layers=_layers(cfg), **groups)
    _check_model(run)
    _check_corpus(run.corpus)
    _check_extraction(run)
    _check_neurons(run.neurons)
    _check_core_tokens(run)
    _check_embedding(run)
    _check_clustering(run.clustering)
    _check_analysis(run)
    _check_tracking(run.tracking)
    return run


def _resolved(cfg: DictConfig) -> DictConfig:
    """The config with every interpolation (`${model.device}`) resolved against the whole tree."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        first_line = str(error).split("\n")[0]
        raise ConfigError(key, "(unresolvable)", f"a resolvable value ({first_line})") from None


def _typed(cfg: DictConfig, name: str, schema: type) -> Any:
    node = OmegaConf.select(cfg, name)
    if node is None:
        raise ConfigError(name, None, f"a `{name}` config group (see conf/{name}/)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        key = f"{name}.{error.key}" if error.key else name
        allowed = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        raise ConfigError(key, "(unknown key)", f"a key of {name}: {allowed}") from None
    except ValidationError as error:
        key = f"{name}.{error.key}" if error.key else name
        field_ = schema.__dataclass_fields__.get(str(error.key))
        kind = f"a value of type {field_.type}" if field_ is not None else "a valid value"
        reason = getattr(error, "msg", str(error)).split("\n")[0]
        raise ConfigError(key, getattr(error, "value", None), f"{kind} ({reason})") from None
    except MissingMandatoryValue as error:  # `???` left unset
        raise ConfigError(f"{name}.{error.full_key}", "???", "a value (it is mandatory)") from None


def _layers(cfg: DictConfig) -> list[int]:
    value = OmegaConf.select(cfg, "layer")
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError("layer", _plain(value), "an integer >= 0 or a non-empty list of them")
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError("layer", _plain(value), "distinct integers >= 0")
    return sorted(values)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def model_depth(model: ModelConfig) -> int | None:
    """Number of layers, known without loading weights: the config's n_layers or a config.json."""
    if model.n_layers is not None:
        return model.n_layers
    location = Path(model.source).expanduser()
    if (location / "config.json").is_file():
        from transformers import AutoConfig

        from intraneuron.models.adapters import adapter_for

        config = AutoConfig.from_pretrained(str(location), trust_remote_code=model.trust_remote_code)
        return adapter_for(config).n_layers(config)
    return None  # a hub id or .gguf: checked right after loading, still before extraction


def _check_model(run: RunConfig) -> None:
    from intraneuron.models.loading import parse_device, parse_dtype

    parse_dtype(run.model.dtype)
    parse_device(run.model.device)
    depth = model_depth(run.model)
    if depth is not None:
        check_layers(run.layers, depth, run.model.name)


def check_layers(layers: list[int], depth: int, model_name: str) -> None:
    for layer in layers:
        if layer >= depth:
            raise ConfigError("layer", layer, f"0..{depth - 1} ({model_name} has {depth} layers)")


def _check_corpus(corpus: CorpusConfig) -> None:
    from intraneuron.corpus.sources import SOURCES

    if corpus.source not in SOURCES:
        raise ConfigError("corpus.source", corpus.source, list(SOURCES))
    if corpus.window_len < 1 + corpus.prepend_bos:
        raise ConfigError("corpus.window_len", corpus.window_len, f"an integer >= {1 + corpus.prepend_bos}")
    if corpus.max_tokens is not None and corpus.max_tokens < corpus.window_len:
        raise ConfigError(
            "corpus.max_tokens", corpus.max_tokens, f"null or >= corpus.window_len={corpus.window_len}"
        )


def _check_extraction(run: RunConfig) -> None:
    extraction = run.extraction
    if extraction.site not in _EXTRACTION_SITES:
        raise ConfigError("extraction.site", extraction.site, _EXTRACTION_SITES)
    if extraction.input_site not in _INPUT_SITES:
        raise ConfigError("extraction.input_site", extraction.input_site, _INPUT_SITES)
    extraction_settings(run).validate()
    if extraction.skip_first_positions >= run.corpus.window_len:
        raise ConfigError(
            "extraction.skip_first_positions",
            extraction.skip_first_positions,
            f"< corpus.window_len={run.corpus.window_len}",
        )


def _check_neurons(neurons: NeuronsConfig) -> None:
    if neurons.select not in NEURON_SELECTIONS:
        raise ConfigError("neurons.select", neurons.select, NEURON_SELECTIONS)
    if neurons.select == "range":
        if neurons.start < 0:
            raise ConfigError("neurons.start", neurons.start, "an integer >= 0")
        if neurons.stop is not None and neurons.stop <= neurons.start:
            raise ConfigError(
                "neurons.stop", neurons.stop, f"> neurons.start={neurons.start} (the range is empty)"
            )
    if neurons.select == "sample" and neurons.n < 1:
        raise ConfigError("neurons.n", neurons.n, "an integer >= 1 (the sample is empty)")


def check_neurons_fit(neurons: NeuronsConfig, d_mlp: int) -> None:
    """Once the layer width is known: a range or sample must lie inside it."""
    if neurons.select == "range" and neurons.start >= d_mlp:
        raise ConfigError("neurons.start", neurons.start, f"< d_mlp={d_mlp} (the range is empty)")
    if neurons.select == "sample" and neurons.n > d_mlp:
        raise ConfigError("neurons.n", neurons.n, f"<= d_mlp={d_mlp}")


def _check_core_tokens(run: RunConfig) -> None:
    from intraneuron.analysis.core_tokens import validate_core_token_rule

    core = run.core_tokens
    if core.unit not in CORE_TOKEN_UNITS:
        raise ConfigError("core_tokens.unit", core.unit, CORE_TOKEN_UNITS)
    validate_core_token_rule(core.rule, core.n, core.tau, core.q, core.max_tokens)
    if core.min_count < 1:
        raise ConfigError("core_tokens.min_count", core.min_count, "an integer >= 1")
    if core.min_core_tokens < 3:
        raise ConfigError("core_tokens.min_core_tokens", core.min_core_tokens, "an integer >= 3")
    if core.unit == "occurrence":
        wanted = core.n if core.rule == "top_n" else core.max_tokens
        if wanted is None or wanted > run.extraction.top_k:
            raise ConfigError(
                "core_tokens.n" if core.rule == "top_n" else "core_tokens.max_tokens",
                wanted,
                f"<= extraction.top_k={run.extraction.top_k} (occurrences kept per neuron)",
            )


def _check_embedding(run: RunConfig) -> None:
    from intraneuron.embeddings.sources import MULTI_TOKEN_POLICIES, SOURCE_KINDS

    embedding = run.embedding
    if embedding.source not in SOURCE_KINDS:
        raise ConfigError("embedding.source", embedding.source, SOURCE_KINDS)
    if embedding.multi_token not in MULTI_TOKEN_POLICIES:
        raise ConfigError("embedding.multi_token", embedding.multi_token, MULTI_TOKEN_POLICIES)
    if embedding.source == "layer_input" and run.extraction.input_site is None:
        raise ConfigError(
            "embedding.source", "layer_input", "another source while extraction.input_site is null"
        )


def _check_clustering(clustering: ClusteringConfig) -> None:
    if clustering.categories not in CATEGORY_SOURCES:
        raise ConfigError("clustering.categories", clustering.categories, CATEGORY_SOURCES)
    if len(clustering.k_range) != 2:
        raise ConfigError("clustering.k_range", clustering.k_range, "[low, high]")
    if clustering.categories == "clusterer":
        estimator = clustering.estimator
        if not isinstance(estimator, dict) or "_target_" not in estimator:
            raise ConfigError(
                "clustering.estimator", estimator, "a config with `_target_` (a class with fit_predict)"
            )
        from intraneuron.build import clusterer_factory_of

        clusterer_factory_of(clustering)  # resolves the class and its arguments


def _check_analysis(run: RunConfig) -> None:
    from intraneuron.analysis.neuron import validate_analysis

    analysis, segmentation = run.analysis, run.segmentation
    validate_analysis(
        n_categories=run.clustering.n_categories,
        k_range=tuple(run.clustering.k_range),
        scheme=segmentation.scheme,
        n_segments=segmentation.n_segments,
        top_fraction=segmentation.top_fraction,
        homogeneity=analysis.homogeneity,
        n_permutations=analysis.n_permutations,
        n_mantel_permutations=analysis.n_mantel_permutations,
        alpha=analysis.alpha,
        min_tokens=run.core_tokens.min_core_tokens,
    )
    if analysis.n_jobs == 0 or analysis.n_jobs < -1:
        raise ConfigError("analysis.n_jobs", analysis.n_jobs, "an integer >= 1, or -1 for all cores")


def _check_tracking(tracking: TrackingSchema) -> None:
    from intraneuron.tracking.run import TrackingConfig, resolve

    resolve(TrackingConfig(**vars(tracking)), Path.cwd())


def extraction_settings(run: RunConfig):
    from intraneuron.extraction import ExtractionSettings

    return ExtractionSettings(**vars(run.extraction))

