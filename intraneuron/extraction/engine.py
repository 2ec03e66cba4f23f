"""The extraction pass: (model, token windows, layers) -> one ActivationProfile per layer.

One forward pass per batch of windows serves every requested layer: hooks read each layer's MLP
neurons (and the residual stream entering the layer), the stats of the spec fold them in, and the pass
stops after the deepest requested layer. Layers already in the cache cost nothing. With
`extraction.corpus_shards` > 1 a job extracts one contiguous range of windows, and the job that finds
every range cached merges them into the profile one job would have written (extraction/shards.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from intraneuron.errors import ConfigError
from intraneuron.extraction.cache import ProfileCache, cache_key
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.extraction.hooks import capture_sites, run_until_captured
from intraneuron.extraction.profile import ActivationProfile
from intraneuron.extraction.pseudo import PseudoNeurons, calibrate
from intraneuron.extraction.shards import ShardPending, merge_profiles, shard_windows
from intraneuron.extraction.stats import CombinedStat, resolve_stats, stat_key_fields

log = logging.getLogger(__name__)

PROGRESS_CALLBACK_SECONDS = 5.0  # least time between two `on_progress` calls during a pass

ProgressCallback = Callable[[int, int], None]  # (tokens_done, tokens_total)


def progress_interval() -> float:
    """Seconds between progress-bar updates: live in a terminal, sparse in a log file."""
    return 0.5 if sys.stderr.isatty() else 60.0


def profile_key_fields(
    handle, windows, layer: int, settings: ExtractionConfig, stats: Iterable[str] | None = None
) -> dict:
    """Everything that changes one layer's numbers: model, corpus, layer, spec and its settings."""
    return {
        "model": handle.fingerprint,
        "dtype": str(next(handle.model.parameters()).dtype),
        "corpus": windows.content_hash,
        "window_len": windows.window_len,
        "layer": layer,
        **stat_key_fields(resolve_stats(stats, settings), settings),
    }


def extract_profiles(
    handle,
    windows,
    layers: list[int],
    settings: ExtractionConfig,
    cache: ProfileCache | None,
    stats: Iterable[str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[int, ActivationProfile]:
    """Profiles for `layers`, from the cache where possible, else from one shared forward pass.

    `stats` is a spec of names from STAT_NAMES; None keeps the five default stats the settings allow
    (all but "input_token_types" when `settings.input_site` is None); "fold_token_types" and
    "pseudo_neurons" only when named.

    With `settings.corpus_shards` n > 1 the pass covers only shard `settings.corpus_shard` of the
    windows (extraction/shards.py); the partial profile is cached under its own key, and the job that
    finds all n partials cached merges them into the whole profile (the key of a one-worker pass) and
    returns it; the others raise ShardPending after saving theirs.

    `on_progress(tokens_done, tokens_total)`, if given, is called during the forward pass at most
    once every PROGRESS_CALLBACK_SECONDS, and once at the end with tokens_done == tokens_total
    (also when every layer came from the cache), so a tracker can plot how far a long pass is.
    """
    settings.validate()
    spec = resolve_stats(stats, settings)
    for layer in layers:  # fail on a bad layer or site before any forward pass
        handle.site(f"blocks.{layer}.{settings.site}")
        if "input_token_types" in spec:
            handle.site(f"blocks.{layer}.{settings.input_site}")
    fields = {l: profile_key_fields(handle, windows, l, settings, spec) for l in layers}
    keys = {l: cache_key(fields[l]) for l in layers}
    profiles = {}
    for layer in layers:
        if cache is not None and (hit := cache.load(keys[layer])) is not None:
            log.info("layer %d: profile from cache %s", layer, cache.entry(keys[layer]))
            profiles[layer] = hit
    missing = [l for l in layers if l not in profiles]
    if missing and settings.corpus_shards > 1:
        profiles.update(_extract_shard(handle, windows, missing, settings, cache, spec, fields, on_progress))
    elif missing:
        if cache is not None and not cache.writable():  # warned; a pass must not be lost at the save
            cache = None
        with cache.locked(keys[l] for l in missing) if cache is not None else contextlib.nullcontext():
            for layer in missing:  # another job may have saved it while we waited for the lock
                if cache is not None and (hit := cache.load(keys[layer])) is not None:
                    log.info("layer %d: profile from cache %s (written by another job)", layer, cache.entry(keys[layer]))
                    profiles[layer] = hit
            missing = [l for l in missing if l not in profiles]
            computed = _run_pass(handle, windows, missing, settings, spec, on_progress) if missing else {}
            for layer, profile in computed.items():
                if cache is not None:
                    _save(cache, keys[layer], profile, fields[layer])
                profiles[layer] = profile
    if on_progress is not None:
        total = int(windows.ids.shape[0]) * (windows.window_len - settings.skip_first_positions)
        on_progress(total, total)
    return {l: profiles[l] for l in layers}


def _extract_shard(
    handle, windows, layers, settings: ExtractionConfig, cache: ProfileCache | None, spec, fields: dict,
    on_progress: ProgressCallback | None,
) -> dict[int, ActivationProfile]:
    """This job's shard of `layers` (extracted, or read from the cache), saved under its partial
    key; then, under the whole keys' lock, the merged profiles if every shard is cached, else
    ShardPending. Partials live in the cache only, so a shard job needs a writable one."""
    shard, shards = settings.corpus_shard, settings.corpus_shards
    if cache is None or not cache.writable():
        raise ConfigError("extraction.corpus_shards", shards, "1 without a writable profile cache "
                          "(the shards of a corpus meet in the cache)")  # fmt: skip
    n_windows = int(windows.ids.shape[0])
    if shards > n_windows:
        raise ConfigError("extraction.corpus_shards", shards, f"at most the corpus's {n_windows} windows")
    part_fields = {  # the whole key's fields + this shard's place: one key per (layer, shard)
        l: {i: {**fields[l], **replace(settings, corpus_shard=i).shard_key_fields()} for i in range(shards)}
        for l in layers
    }
    part_keys = {l: {i: cache_key(f) for i, f in part_fields[l].items()} for l in layers}
    with cache.locked(part_keys[l][shard] for l in layers):
        todo = [l for l in layers if cache.load(part_keys[l][shard]) is None]  # a corrupt one is redone
        window_range = shard_windows(n_windows, shard, shards)
        computed = _run_pass(handle, windows, todo, settings, spec, on_progress, window_range) if todo else {}
        for layer, partial in computed.items():
            cache.save(part_keys[layer][shard], partial, part_fields[layer][shard])  # an OSError fails the job
            log.info("layer %d: shard %d of %d saved to %s", layer, shard, shards, cache.entry(part_keys[layer][shard]))
    keys = {l: cache_key(fields[l]) for l in layers}
    profiles, pending = {}, {}
    with cache.locked(keys.values()):
        for layer in layers:
            if (hit := cache.load(keys[layer])) is not None:  # merged by another shard's job
                log.info("layer %d: profile from cache %s (merged by another job)", layer, cache.entry(keys[layer]))
                profiles[layer] = hit
                continue
            partials = {i: cache.load(key) for i, key in part_keys[layer].items()}
            absent = [i for i, p in partials.items() if p is None]
            if absent:
                pending[layer] = absent
                continue
            profiles[layer] = merge_profiles([partials[i] for i in range(shards)])
            _save(cache, keys[layer], profiles[layer], fields[layer])
            if cache.entry(keys[layer]).exists():  # the whole is saved: its shards are disk space only
                for key in part_keys[layer].values():
                    cache.remove(key)
            log.info("layer %d: %d shards merged into %s", layer, shards, cache.entry(keys[layer]))
    if pending:
        raise ShardPending(shard, shards, pending)
    return profiles


def _save(cache: ProfileCache, key: str, profile: ActivationProfile, key_fields: dict) -> None:
    """Save, but keep the computed profile when the disk refuses (full, read-only, gone)."""
    try:
        cache.save(key, profile, key_fields)
    except OSError as err:
        log.warning("cache %s: could not save layer %d (%s); the result is not cached", cache.root, profile.layer, err)


def _run_pass(
    handle, windows, layers, settings: ExtractionConfig, spec, on_progress: ProgressCallback | None = None,
    window_range: range | None = None,
) -> dict[int, ActivationProfile]:
    """One forward pass over `window_range` (default: every window) -> a profile per layer.

    Window indices and token positions are global (window * T + position), so profiles of disjoint
    ranges merge (extraction/shards.py). Batches are cut on the global grid of `batch_size` windows,
    so a range's batches are the one-worker pass's batches except at the range's ends.
    """
    device = torch.device(settings.device)
    T, skip = windows.window_len, settings.skip_first_positions
    if skip >= T:
        raise ConfigError("extraction.skip_first_positions", skip, f"< window_len ({T})")
    d_mlp, d_model = handle.d_mlp, handle.d_model

    def build(layer: int) -> CombinedStat:
        pseudo = PseudoNeurons.build(handle, layer, spec, settings, device) if "pseudo_neurons" in spec else None
        return CombinedStat.build(
            spec, d_mlp=d_mlp, d_model=d_model, vocab_size=handle.vocab_size, config=settings, device=device,
            pseudo=pseudo,
        )

    reducers = {l: build(l) for l in layers}
    probe = reducers[layers[0]]
    neuron_sites = {l: handle.site(f"blocks.{l}.{settings.site}") for l in layers} if probe.reads_neurons else {}
    input_sites = (
        {l: handle.site(f"blocks.{l}.{settings.input_site}") for l in layers} if probe.reads_input else {}
    )
    mlp_in_sites = (
        {l: handle.site(f"blocks.{l}.ln2.hook_normalized") for l in layers} if probe.reads_mlp_input else {}
    )

    ids = windows.ids  # [W, T] memmap
    n_windows = ids.shape[0]
    window_range = range(n_windows) if window_range is None else window_range
    bs = settings.batch_size
    batches = [  # [start, stop) on the global grid of bs windows, clipped to the range
        range(max(g, window_range.start), min(g + bs, window_range.stop))
        for g in range(window_range.start - window_range.start % bs, window_range.stop, bs)
    ]
    first_batch = range(0, min(bs, n_windows))  # where pseudo-neurons calibrate, in every shard
    kept_per_window = T - skip
    pos_in_window = torch.arange(skip, T, device=device)  # [T - skip]
    tokens_total, tokens_done = len(window_range) * kept_per_window, 0
    bar = tqdm(
        total=tokens_total, unit="tok", unit_scale=True, disable=not settings.progress,
        desc=f"extract layers {layers}", mininterval=progress_interval(),
    )
    sites = list(neuron_sites.values()) + list(input_sites.values()) + list(mlp_in_sites.values())
    last_report = time.monotonic()

    def forward(rows: range) -> torch.Tensor:
        batch = torch.from_numpy(np.asarray(ids[rows.start : rows.stop], dtype=np.int64))
        batch = batch.to(device)  # [B, T]
        run_until_captured(handle.model, batch, captured)
        return batch

    with torch.inference_mode(), capture_sites(handle.module, sites) as captured:
        if mlp_in_sites and (not batches or batches[0] != first_batch):
            forward(first_batch)  # this range does not start with the corpus's first batch
            for layer in layers:
                mlp_in = captured[mlp_in_sites[layer].name][:, skip:].reshape(-1, d_model)  # [N0, d_model]
                pseudo = reducers[layer].stats["pseudo_neurons"]
                pseudo.calibration = calibrate(*pseudo.pre_activations(mlp_in))
        for rows in batches:
            batch = forward(rows)  # [B, T]
            token_ids = batch[:, skip:].reshape(-1)  # [N = B * (T - skip)]
            window_idx = torch.arange(rows.start, rows.stop, device=device)  # [B] global
            positions = (window_idx[:, None] * T + pos_in_window[None, :]).reshape(-1)  # [N]
            token_windows = window_idx.repeat_interleave(T - skip)  # [N]
            for layer in layers:
                acts = (
                    captured[neuron_sites[layer].name][:, skip:].reshape(-1, d_mlp) if neuron_sites else None
                )  # [N, d_mlp]
                resid = (
                    captured[input_sites[layer].name][:, skip:].reshape(-1, d_model) if input_sites else None
                )  # [N, d_model]
                mlp_in = (
                    captured[mlp_in_sites[layer].name][:, skip:].reshape(-1, d_model) if mlp_in_sites else None
                )  # [N, d_model]
                reducers[layer].add(acts, resid, token_ids, positions, token_windows, mlp_in)
            bar.update(token_ids.numel())
            tokens_done += token_ids.numel()
            if on_progress is not None and tokens_done < tokens_total:
                now = time.monotonic()
                if now - last_report >= PROGRESS_CALLBACK_SECONDS:
                    on_progress(tokens_done, tokens_total)
                    last_report = now
    bar.close()

    flat_ids = np.asarray(ids).reshape(-1)
    profiles = {}
    for layer in layers:
        tensors = {k: v.cpu() for k, v in reducers[layer].state_dict().items()}
        for p in ("", "pseudo."):
            if f"{p}topk_positions" in tensors:
                tensors[f"{p}topk_token_ids"] = torch.from_numpy(
                    flat_ids[tensors[f"{p}topk_positions"].clamp_min(0).numpy()].astype(np.int64)
                )  # [D, K]
        profiles[layer] = ActivationProfile(
            layer=layer,
            site=f"blocks.{layer}.{settings.site}",
            input_site=input_sites[layer].name if input_sites else None,
            window_len=T,
            n_tokens=tokens_total,
            tensors=tensors,
        )
    return profiles
