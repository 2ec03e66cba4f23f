"""Assembly of a run's config: each group merged onto its schema, then the checks across groups.

Schemas live next to the code they configure (`models/config.py`, `corpus/config.py`,
`extraction/config.py`, `tracking/store.py`, and the groups an analysis declares). `validate(cfg)`
validates the run's own groups (`layer`, `model`, `models`, `corpus`, `extraction`, `tracking`, `report`), builds the
analysis named by `analysis._target_`, then validates only the groups that analysis declares.
A top-level key that is neither a config group nor a key of the entry config is refused first.
Merging onto a schema rejects unknown keys and values of the wrong type; each schema's `validate()`
checks ranges. Every failure is a ConfigError naming the key, the value and what is allowed, and
nothing here loads weights or reads the corpus (a local model's config.json at most).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from intraneuron.corpus.config import CorpusConfig
from intraneuron.errors import ConfigError, unresolvable
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.models.config import ModelConfig, ModelsConfig
from intraneuron.paths import CONF_DIR
from intraneuron.reports.config import ReportConfig
from intraneuron.tracking.store import TrackingConfig

# The run's own groups: every analysis has them.
RUN_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "models": ModelsConfig,
    "corpus": CorpusConfig,
    "extraction": ExtractionConfig,
    "tracking": TrackingConfig,
    "report": ReportConfig,
}


@dataclass
class RunConfig:
    """The validated, typed run: what `runner.run` consumes."""

    layers: list[int]
    model: ModelConfig
    models: ModelsConfig
    corpus: CorpusConfig
    extraction: ExtractionConfig
    tracking: TrackingConfig
    report: ReportConfig
    analysis: Any  # an analyses.base.Analysis
    groups: dict[str, Any] = field(default_factory=dict)  # the analysis's declared groups, typed


def validate(cfg: DictConfig) -> RunConfig:
    """Type- and range-check the composed config; raise ConfigError on the first bad value."""
    from intraneuron.registry import build_analysis, refuse_other_targets

    tree = _resolved(cfg)
    refuse_unknown_top_keys(tree)
    refuse_other_targets(tree)
    run_groups = {name: _typed(tree, name, schema) for name, schema in RUN_GROUPS.items()}
    layers = _layers(tree.get("layer"))
    analysis = build_analysis(_group(tree, "analysis"))
    groups = {name: _typed(tree, name, schema) for name, schema in analysis.groups.items()}
    run = RunConfig(layers=layers, analysis=analysis, groups=groups, **run_groups)
    for group in (run.model, run.models, run.corpus, run.extraction, run.report, *groups.values()):
        group.validate()
    _check_across(run)
    run.report.check(analysis.rank_by, run.extraction.top_k)
    analysis.check(run)
    run.tracking.validate()
    return run


def top_level_keys() -> list[str]:
    """The keys a composed config may have at its top: the config groups (the folders of conf/,
    whatever options they hold) and the entry config's own keys (`layer`). Read from the config
    tree itself, so a new group or key is allowed as soon as it exists; `hydra` is Hydra's node,
    never part of a job's config."""
    from omegaconf import OmegaConf

    own = OmegaConf.load(CONF_DIR / "config.yaml")
    keys = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {str(k) for k in own if k != "defaults"}
    return sorted(keys - {"hydra"})


def refuse_unknown_top_keys(tree: dict[str, Any]) -> None:
    """`+bogus_top=1` would otherwise be accepted and never read by anything."""
    allowed = top_level_keys()
    for key, value in tree.items():
        if key not in allowed:
            raise ConfigError(str(key), value, f"a config group or key of conf/config.yaml: {', '.join(allowed)}")


def _check_across(run: RunConfig) -> None:
    depth, width = run.model.shape()
    if depth is not None:
        check_layers(run.layers, depth, run.model.name)
    if width is not None:
        check_width(run, width)
    if run.extraction.skip_first_positions >= run.corpus.window_len:
        raise ConfigError(
            "extraction.skip_first_positions",
            run.extraction.skip_first_positions,
            f"< corpus.window_len={run.corpus.window_len}",
        )


def check_layers(layers: list[int], depth: int, model_name: str) -> None:
    for layer in layers:
        if layer >= depth:
            raise ConfigError("layer", layer, f"0..{depth - 1} ({model_name} has {depth} layers)")


def check_width(run: RunConfig, d_mlp: int) -> None:
    """The checks that need the layer's width: before loading when a local config.json gives it,
    else right after loading. Each group of the analysis with a `check_fits(d_mlp)` checks itself."""
    for group in run.groups.values():
        if hasattr(group, "check_fits"):
            group.check_fits(d_mlp)
    for neuron in run.report.neurons:
        if neuron >= d_mlp:
            raise ConfigError("report.neurons", run.report.neurons, f"neuron indices < d_mlp={d_mlp}")


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers, every interpolation (`${model.device}`) resolved."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise unresolvable(error) from None


def _group(tree: dict[str, Any], name: str) -> dict[str, Any]:
    node = tree.get(name)
    if not isinstance(node, dict):
        raise ConfigError(name, node, f"a `{name}` config group (see conf/{name}/)")
    return node


def _typed(tree: dict[str, Any], name: str, schema: type) -> Any:
    node = _group(tree, name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        where = _locate(node, str(error.key)) if error.key else ""
        key = f"{name}.{where}" if where else name
        allowed = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        raise ConfigError(key, node.get(str(error.key), "(unknown key)"), f"a key of {name}: {allowed}") from None
    except ValidationError as error:
        # the schema's field, also for an element of a list field (full_key "k_range[1]")
        field_name = re.split(r"[.\[]", str(error.full_key or error.key or ""))[0]
        key = f"{name}.{field_name}" if field_name else name
        field_ = schema.__dataclass_fields__.get(field_name)
        kind = f"a value of type {field_.type}" if field_ is not None else "a valid value"
        reason = getattr(error, "msg", str(error)).split("\n")[0]
        raise ConfigError(key, node.get(field_name, getattr(error, "value", None)), f"{kind} ({reason})") from None
    except MissingMandatoryValue as error:  # `???` left unset
        raise ConfigError(f"{name}.{error.full_key}", "???", "a value (it is mandatory)") from None


def _locate(node: Any, key: str, path: str = "") -> str:
    """Dotted path of the first `key` in a nested dict/list node ("others.0.colour"): OmegaConf
    reports only the key itself when it sits in a list element."""
    if isinstance(node, dict):
        if key in node:
            return f"{path}{key}"
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return ""
    for name, child in items:
        found = _locate(child, key, f"{path}{name}.")
        if found:
            return found
    return ""


def _layers(value: Any) -> list[int]:
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError("layer", value, "an integer >= 0 or a non-empty list of them")
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError("layer", value, "distinct integers >= 0")
    return sorted(values)
