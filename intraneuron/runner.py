"""One job, whatever the analysis: validate -> load -> extract what the analysis requires (cached)
-> analyse each layer -> log through the artifact contract.

Order matters for researchers' time: every config check runs before the model is loaded, the
checks that need the model's dimensions and everything the analysis can build early (embedding
checkpoints, category labels) run before the corpus pass, and the extraction is read from the cache
when an earlier job (another threshold, clusterer, segmentation) already did it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from intraneuron import paths
from intraneuron.analyses.base import Job
from intraneuron.config import RunConfig, check_layers, check_width, validate
from intraneuron.errors import ConfigError
from intraneuron.reports import artifacts
from intraneuron.tracking.logger import RunLogger

log = logging.getLogger(__name__)

# The config keys logged as params whatever the analysis; it adds the groups it declares.
RUN_PARAM_KEYS = ("layer", "model", "corpus", "extraction", "analysis")


@dataclass
class JobSummary:
    run_id: str
    layers: dict[int, dict[str, float]]  # layer -> its headline metrics (readable name -> value)
    reasons: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> why its NaN ones are (name -> reason)


def run(cfg: DictConfig, tracker: RunLogger) -> JobSummary:
    from intraneuron.extraction import extract_profiles
    from intraneuron.extraction.blocks import extract_blocks
    from intraneuron.extraction.cache import ProfileCache, cache_key
    from intraneuron.extraction.engine import profile_key_fields
    from intraneuron.extraction.shards import ShardPending
    from intraneuron.reports.cards import build_cards

    rc = validate(cfg)
    analysis = rc.analysis
    requirements = analysis.requirements(rc)
    check_model_count(rc, requirements.n_models)
    started = time.perf_counter()
    job = open_job(rc)
    handle, windows = job.handle, job.windows
    stats = requirements.stats
    keys = {
        layer: cache_key(profile_key_fields(handle, windows, layer, rc.extraction, stats))
        for layer in rc.layers
    }
    tracker.set_tags({
        "model": rc.model.name,
        "model.fingerprint": handle.fingerprint,
        **{f"models.{m.name}.fingerprint": h.fingerprint for m, h in zip(rc.models.others, job.others, strict=True)},
        "layer": ",".join(map(str, rc.layers)),
        "analysis": analysis.name,
        "corpus.content_hash": windows.content_hash,
        **{f"cache_key.layer_{layer}": key for layer, key in keys.items()},
    })  # fmt: skip
    tracker.log_corpus_input(rc.corpus.name, windows.content_hash, windows.path,
                             n_tokens=windows.n_tokens, window_len=windows.window_len)  # fmt: skip
    tracker.log_metrics({"corpus/n_tokens": windows.n_tokens, "setup_seconds": time.perf_counter() - started})

    analysis.prepare(job)  # what can fail on a missing file is built before the pass

    started = time.perf_counter()
    cache = ProfileCache(paths.cache_dir())
    try:
        if requirements.blocks:  # the profile as contiguous corpus blocks, for the analysis's intervals
            profiles, job.blocks = extract_blocks(handle, windows, rc.layers, rc.extraction, cache, requirements.blocks,
                                                  stats=stats, on_progress=tracker.progress_callback("extraction/progress"))  # fmt: skip
        else:
            profiles = extract_profiles(handle, windows, rc.layers, rc.extraction, cache, stats=stats,
                                        on_progress=tracker.progress_callback("extraction/progress"))  # fmt: skip
    except ShardPending as pending:  # this job's corpus shard is cached; another job merges and analyses
        tracker.log_metrics({"extraction_seconds": time.perf_counter() - started})
        tracker.set_tags({"intraneuron.extraction_shard_pending": str(pending)})
        log.info("%s", pending)
        return JobSummary(tracker.run_id, {})
    tracker.log_metrics({"extraction_seconds": time.perf_counter() - started})
    started = time.perf_counter()
    if analysis.collect(job, profiles, on_progress=tracker.progress_callback("collect/progress")):
        tracker.log_metrics({"collect_seconds": time.perf_counter() - started})

    summary = JobSummary(tracker.run_id, {})
    headline = dict(analysis.headline)
    tracker.set_tags(artifacts.headline_tags(analysis))
    cards, cards_seconds, layer_metrics = [], 0.0, {}
    for layer in rc.layers:
        profile = profiles.pop(layer)  # held for this layer only (a many-layer job's profiles are large)
        result = analysis.analyse_layer(job, layer, profile)
        job.blocks.pop(layer, None)
        summary.layers[layer], summary.reasons[layer] = artifacts.log_layer_result(
            tracker, layer, result, headline, analysis.companions, artifacts.figure_heading(rc, layer))
        layer_metrics[layer] = result.metrics
        if rc.report.enabled:
            started = time.perf_counter()
            neurons = result.tables.get("neurons")
            cards += build_cards(job, analysis, layer, profile, neurons, rc.report)
            cards_seconds += time.perf_counter() - started
    for name, figure in analysis.run_figures(layer_metrics).items():
        artifacts.log_figure(tracker, figure, artifacts.run_figure_path(name), artifacts.figure_heading(rc, rc.layers))
    if cards:
        artifacts.log_cards(tracker, cards, f"{rc.model.name}, layers {', '.join(map(str, rc.layers))}: neuron cards")
        tracker.log_metrics({"cards_seconds": cards_seconds, "cards": len(cards)})
    tracker.set_tags({"mlflow.note.content": describe(summary)})
    return summary


def check_model_count(rc: RunConfig, n_models: int) -> None:
    """The analysis's model count against `model` plus `models.others`."""
    others = [m.name for m in rc.models.others]
    if n_models == 1 and others:
        raise ConfigError("models.others", others, f"[] (analysis {rc.analysis.name} reads one model: `model`)")
    if n_models != 1 + len(others):
        raise ConfigError("models.others", others, f"{n_models - 1} models to compare with `model` "
                          f"(analysis {rc.analysis.name}; e.g. models=<option of conf/models/>)")  # fmt: skip


def open_job(rc: RunConfig) -> Job:
    """Load the models and the corpus windows, with the checks that need the models' dimensions."""
    from intraneuron.corpus.windows import tokenizer_fingerprint

    handle = rc.model.load()
    check_layers(rc.layers, handle.n_layers, rc.model.name)
    check_width(rc, handle.d_mlp)
    rc.analysis.check_model(rc, handle)
    others = rc.models.load()
    reference = tokenizer_fingerprint(handle.tokenizer)
    for i, other in enumerate(others):
        if tokenizer_fingerprint(other.tokenizer) != reference:  # lockstep needs the same token ids
            raise ConfigError(f"models.others.{i}.source", rc.models.others[i].source,
                              f"a model with the same tokenizer as model={rc.model.name}")  # fmt: skip
    return Job(run=rc, handle=handle, windows=rc.corpus.windows(handle.tokenizer), others=others)


def neuron_cards(cfg: DictConfig, layer: int, neurons: list[int], neurons_table=None) -> list:
    """Cards of chosen neurons of one layer of a finished run, rebuilt from its composed config
    (`cfg`) with no tracking: the extraction is read from the cache when this machine has it.
    neurons_table: the run's neurons table of that layer (the cards' statistics)."""
    from dataclasses import replace

    from intraneuron.extraction import extract_profiles
    from intraneuron.extraction.cache import ProfileCache
    from intraneuron.reports.cards import build_cards

    rc = validate(cfg)
    rc.layers = [layer]
    rc.report = replace(rc.report, neurons=list(neurons), top=0, random=0)
    job = open_job(rc)
    rc.analysis.prepare(job)
    stats = rc.analysis.requirements(rc).stats
    profiles = extract_profiles(job.handle, job.windows, [layer], rc.extraction, ProfileCache(paths.cache_dir()),
                                stats=stats)  # fmt: skip
    return build_cards(job, rc.analysis, layer, profiles[layer], neurons_table, rc.report)


def describe(summary: JobSummary) -> str:
    """The headline sentence of a job: each layer's headline metrics, a NaN one with its reason."""
    return "\n".join(
        f"layer {layer}: " + artifacts.headline_text(metrics, summary.reasons.get(layer, {}))
        for layer, metrics in summary.layers.items()
    )
