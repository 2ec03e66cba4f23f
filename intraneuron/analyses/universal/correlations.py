"""The universal analysis's lockstep pass, cached: its key is every model's fingerprint, the
windows' content hash, the layers and the settings, so rerunning (another threshold, another
report) reads the correlations back instead of streaming every model again."""

from __future__ import annotations

import contextlib
import logging

import torch

from intraneuron import paths
from intraneuron.extraction.cache import TensorCache, cache_key
from intraneuron.extraction.lockstep import Correlations, LockstepSettings, correlate_models

log = logging.getLogger(__name__)
KINDS = ("actual", "baseline")


def settings_of(job, analysis) -> LockstepSettings:
    tokenizer = job.handle.tokenizer
    drop = set()
    for name in analysis.drop_tokens or ():
        if name == "newline":
            drop |= {i for i in range(job.handle.vocab_size) if job.token_texts[i] == "\n"}
        else:
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if token_id is not None:
                drop.add(int(token_id))
    extraction = job.run.extraction
    return LockstepSettings(
        site=analysis.site, top_k=analysis.top_k, baseline=analysis.baseline, seed=analysis.seed,
        memory_bytes=int(analysis.memory_gb * 1024**3), batch_size=extraction.batch_size,
        device=extraction.device, skip_first_positions=extraction.skip_first_positions,
        drop_token_ids=tuple(sorted(drop)),
    )  # fmt: skip


def other_layers(job, analysis) -> list[list[int]]:
    return [list(analysis.other_layers) if analysis.other_layers is not None else list(range(h.n_layers))
            for h in job.others]  # fmt: skip


def cached_correlations(job, analysis, on_progress=None) -> Correlations:
    settings = settings_of(job, analysis)
    layers = other_layers(job, analysis)
    fields = {
        "kind": "lockstep_correlation",
        "reference": job.handle.fingerprint,
        "others": [h.fingerprint for h in job.others],
        "dtypes": [str(next(h.model.parameters()).dtype) for h in (job.handle, *job.others)],
        "corpus": job.windows.content_hash,
        "ref_layers": list(job.run.layers),
        "other_layers": layers,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()
           if k not in ("batch_size", "device", "memory_bytes")},  # how, not what
    }  # fmt: skip
    key = cache_key(fields)
    cache = TensorCache(paths.cache_dir(), "correlations")
    if (hit := cache.load(key)) is not None:
        log.info("correlations from cache %s", cache.entry(key))
        return _unpack(*hit)
    # as for profiles: a read-only cache is noticed before the pass (warned, nothing saved), and jobs
    # that need the same entry wait for the first one's save and read it
    writable = cache.writable()
    with cache.locked([key]) if writable else contextlib.nullcontext():
        if writable and (hit := cache.load(key)) is not None:
            log.info("correlations from cache %s (written by another job)", cache.entry(key))
            return _unpack(*hit)
        result = correlate_models(job.handle, job.others, job.windows.ids, list(job.run.layers), layers,
                                  settings, on_progress)  # fmt: skip
        if writable:
            try:
                cache.save(key, _pack(result), {"n_tokens": result.n_tokens}, fields)
            except OSError as err:  # a full or vanished disk costs the cache entry, not the result
                log.warning("cache %s: could not save the correlations (%s); not cached", cache.root, err)
    return result


def _pack(result: Correlations) -> dict[str, torch.Tensor]:
    tensors = {}
    for kind in KINDS:
        for m, layers in getattr(result, kind).items():
            for layer, summary in layers.items():
                for name, tensor in summary.items():
                    tensors[f"{kind}/{m}/{layer}/{name}"] = tensor.cpu()
    return tensors


def _unpack(tensors: dict[str, torch.Tensor], meta: dict) -> Correlations:
    out = {kind: {} for kind in KINDS}
    for key, tensor in tensors.items():
        kind, m, layer, name = key.split("/")
        out[kind].setdefault(int(m), {}).setdefault(int(layer), {})[name] = tensor
    return Correlations(actual=out["actual"], baseline=out["baseline"], n_tokens=int(meta["n_tokens"]))
