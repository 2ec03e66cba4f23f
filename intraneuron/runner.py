"""One job: validate the config, load the model, extract each requested layer once, analyse, log.

Order matters for researchers' time: every config check runs before the model is loaded, the layer
and neuron checks that need the model run before the corpus pass, and the extraction is read from
the cache when any earlier job (another threshold, clusterer, segmentation) already did it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from intraneuron import paths
from intraneuron.analysis.aggregate import aggregate_layer
from intraneuron.analysis.layer import analyse_layer, core_tokens_of, keep_mask, select_neurons
from intraneuron.build import (
    category_labeller,
    clusterer_factory_of,
    embedding_source,
    load_model_handle,
    token_texts,
    token_windows,
)
from intraneuron.config import (
    RunConfig,
    check_layers,
    check_neurons_fit,
    extraction_settings,
    validate,
)
from intraneuron.extraction import extract_profiles
from intraneuron.extraction.cache import ProfileCache, cache_key
from intraneuron.extraction.engine import profile_key_fields, progress_interval
from intraneuron.tracking.run import RunLogger

log = logging.getLogger(__name__)

# Config groups logged as flattened MLflow params: what a sweep varies and a reader compares.
PARAM_KEYS = (
    "layer", "model", "corpus", "extraction", "neurons", "core_tokens", "embedding",
    "clustering", "segmentation", "analysis",
)  # fmt: skip
# Layer metrics printed at the end of a run (all of them go to MLflow).
HEADLINE_METRICS = (
    "neurons/analysed",
    "topdown/kruskal_sig_frac_bh",
    "topdown/interleaving_mean/median",
    "bottomup/top_sig_frac_bh",
    "bottomup/h_top_minus_rest/median",
    "homomorphism/ari/median",
)


@dataclass
class JobSummary:
    run_id: str
    layers: dict[int, dict[str, float]]  # layer -> its aggregate metrics


def run(cfg: DictConfig, tracker: RunLogger) -> JobSummary:
    rc = validate(cfg)
    clusterer = clusterer_factory_of(rc.clustering) if rc.clustering.categories == "clusterer" else None

    started = time.perf_counter()
    handle = load_model_handle(rc.model)
    check_layers(rc.layers, handle.n_layers, rc.model.name)
    check_neurons_fit(rc.neurons, handle.d_mlp)
    windows = token_windows(rc.corpus, handle.tokenizer)
    settings = extraction_settings(rc)
    keys = {
        layer: cache_key(profile_key_fields(handle, windows, layer, settings)) for layer in rc.layers
    }
    tracker.set_tags({
        "model": rc.model.name,
        "model.fingerprint": handle.fingerprint,
        "layer": ",".join(map(str, rc.layers)),
        "analysis": rc.analysis.name,
        "corpus.content_hash": windows.content_hash,
        **{f"cache_key.layer_{layer}": key for layer, key in keys.items()},
    })  # fmt: skip
    tracker.log_metrics({"corpus/n_tokens": windows.n_tokens, "setup_seconds": time.perf_counter() - started})

    # Everything that can fail on a missing file or a bad checkpoint is built before the pass.
    texts = token_texts(handle.tokenizer, handle.vocab_size)
    keep = keep_mask(texts, rc.core_tokens.drop_whitespace_punct, rc.core_tokens.drop_byte_fragments)
    label = category_labeller(rc.clustering, texts)
    vectors = None if rc.embedding.source == "layer_input" else embedding_source(rc.embedding, handle)

    started = time.perf_counter()
    profiles = extract_profiles(handle, windows, rc.layers, settings, ProfileCache(paths.cache_dir()))
    tracker.log_metrics({"extraction_seconds": time.perf_counter() - started})

    summary = JobSummary(tracker.run_id, {})
    for layer in rc.layers:
        layer_vectors = vectors or embedding_source(rc.embedding, handle, profiles[layer])
        summary.layers[layer] = _analyse_and_log(
            rc, layer, profiles[layer], handle, texts, keep, label, clusterer, layer_vectors, tracker
        )
    return summary


def _analyse_and_log(
    rc: RunConfig, layer, profile, handle, texts, keep, label, clusterer, vectors, tracker
):
    started = time.perf_counter()
    neurons = select_neurons(handle.d_mlp, **vars(rc.neurons))
    core = rc.core_tokens
    cores = core_tokens_of(
        profile, neurons, unit=core.unit, rule=core.rule, n=core.n, tau=core.tau, q=core.q,
        max_tokens=core.max_tokens, min_count=core.min_count, keep_token=keep,
    )  # fmt: skip
    bar = tqdm(total=len(cores), unit="neuron", desc=f"analyse layer {layer}",
               disable=not rc.extraction.progress, mininterval=progress_interval())  # fmt: skip
    result = analyse_layer(
        layer, cores, vectors.embed,
        label=label,
        decode=lambda ids: [texts[i] for i in ids],
        seed=rc.analysis.seed,
        n_jobs=rc.analysis.n_jobs,
        progress=bar.update,
        make_clusterer=clusterer,
        normalize=rc.clustering.normalize,
        n_categories=rc.clustering.n_categories,
        k_range=tuple(rc.clustering.k_range),
        scheme=rc.segmentation.scheme,
        n_segments=rc.segmentation.n_segments,
        top_fraction=rc.segmentation.top_fraction,
        homogeneity=rc.analysis.homogeneity,
        n_permutations=rc.analysis.n_permutations,
        n_mantel_permutations=rc.analysis.n_mantel_permutations,
        alpha=rc.analysis.alpha,
        min_tokens=rc.core_tokens.min_core_tokens,
    )  # fmt: skip
    bar.close()
    metrics = aggregate_layer(result.rows, rc.analysis.alpha)
    metrics["core_tokens/n_mean"] = float(result.rows["n_core"].mean()) if len(result.rows) else np.nan
    metrics["embedding/unembedded_frac"] = _ratio(result.rows, "n_unembedded", "n_core")
    if label is not None:
        metrics["categories/label_coverage_mean"] = float(result.rows["label_coverage"].mean())
    metrics["analysis_seconds"] = time.perf_counter() - started

    for skipped in result.rows.loc[result.rows["skipped"] != "", ["neuron", "skipped"]].head(5).itertuples():
        log.info("layer %d neuron %d skipped: %s", layer, skipped.neuron, skipped.skipped)
    view = tracker.for_layer(layer)
    view.log_metrics(metrics)
    view.log_table(result.rows, "tables/neurons.parquet")
    for name in ("categories", "segments", "pairs"):
        table = getattr(result, name)
        if len(table):
            view.log_table(table, f"tables/{name}.parquet")
    return metrics


def _ratio(rows, numerator: str, denominator: str) -> float:
    total = rows[denominator].sum() if len(rows) else 0
    return float(rows[numerator].sum() / total) if total else np.nan
