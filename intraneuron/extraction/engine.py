"""The extraction pass: (model, token windows, layers) -> one ActivationProfile per layer.

One forward pass per batch of windows serves every requested layer: hooks read each layer's MLP
neurons (and the residual stream entering the layer), the stats of the spec fold them in, and the pass
stops after the deepest requested layer. Layers already in the cache cost nothing. Before the pass,
the token types of the windows size the type tables (extraction/types.py) and a memory plan splits
the layers into as many passes as the budget needs (extraction/memory.py); the pass opens with a
sample of windows strided over the whole corpus, on which the pseudo-neurons are calibrated. With
`extraction.corpus_shards` > 1 a job extracts one contiguous range of windows, and the job that finds
every range cached merges them into the profile one job would have written (extraction/shards.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from intraneuron.errors import ConfigError
from intraneuron.extraction.cache import CachedProfile, ProfileCache, cache_key
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.extraction.hooks import capture_sites, run_until_captured
from intraneuron.extraction.memory import GB, layer_footprint, plan_extraction, table_device
from intraneuron.extraction.profile import ActivationProfile
from intraneuron.extraction.pseudo import PseudoNeurons
from intraneuron.extraction.shards import ShardPending, merge_profiles, shard_windows
from intraneuron.extraction.stats import CombinedStat, resolve_stats, stat_key_fields
from intraneuron.extraction.types import TypeKeys

log = logging.getLogger(__name__)

PROGRESS_CALLBACK_SECONDS = 5.0  # least time between two `on_progress` calls during a pass

ProgressCallback = Callable[[int, int], None]  # (tokens_done, tokens_total)


LONG_PASS_SECONDS = 300.0  # a pass expected to run longer than this says so, and where a first look is
ETA_AFTER_SECONDS = 30.0  # the rate is taken once the pass has run this long


def long_pass_hint(elapsed: float, done: int, total: int) -> str | None:
    """The line a long pass logs once: its time left at the rate so far, and the quick preset."""
    if elapsed < ETA_AFTER_SECONDS or done <= 0 or done >= total:
        return None
    left = elapsed * (total - done) / done
    if left < LONG_PASS_SECONDS:
        return None
    return (f"extraction: about {left / 60:.0f} min left at {done / elapsed:,.0f} tok/s ({done:,} of {total:,} "
            "tokens); `experiment=quick` gives a first look at the default layer in about a minute")  # fmt: skip


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
    spec = check_before_pass(handle, windows, layers, settings, stats)
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
            for layer, profile, several_passes in _run_planned(handle, windows, missing, settings, spec, on_progress):
                if cache is not None and _save(cache, keys[layer], profile, fields[layer]) and several_passes:
                    profile = CachedProfile(cache, keys[layer], profile.metadata())  # read back when used
                profiles[layer] = profile
    if on_progress is not None:
        total = int(windows.ids.shape[0]) * (windows.window_len - settings.skip_first_positions)
        on_progress(total, total)
    return {l: profiles[l] for l in layers}


def check_before_pass(handle, windows, layers: list[int], settings: ExtractionConfig, stats) -> tuple[str, ...]:
    """The resolved spec, after every check that needs no forward pass (settings, fold blocks, sites)."""
    settings.validate()
    spec = resolve_stats(stats, settings)
    n_windows, block = int(windows.ids.shape[0]), settings.fold_block_windows
    # from there on the second half holds less than one block (nothing once block >= n_windows)
    if "fold_token_types" in spec and 2 * block > n_windows:
        raise ConfigError("extraction.fold_block_windows", block,
                          f"at most half the corpus's {n_windows} windows ({n_windows // 2})")  # fmt: skip
    for layer in layers:  # fail on a bad layer or site before any forward pass
        handle.site(f"blocks.{layer}.{settings.site}")
        if "input_token_types" in spec:
            handle.site(f"blocks.{layer}.{settings.input_site}")
    return spec


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
        for layer, partial, _ in _run_planned(handle, windows, todo, settings, spec, on_progress, window_range):
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


def _save(cache: ProfileCache, key: str, profile: ActivationProfile, key_fields: dict) -> bool:
    """Save, but keep the computed profile when the disk refuses (full, read-only, gone): True if saved."""
    try:
        cache.save(key, profile, key_fields)
    except OSError as err:
        log.warning("cache %s: could not save layer %d (%s); the result is not cached", cache.root, profile.layer, err)
        return False
    return True


def _run_planned(
    handle, windows, layers, settings: ExtractionConfig, spec, on_progress: ProgressCallback | None = None,
    window_range: range | None = None, calibration: dict | None = None,
) -> Iterator[tuple[int, ActivationProfile, bool]]:
    """(layer, profile, whether the plan has several passes) for `layers`, from as many passes as
    the memory plan needs, each pass's profiles yielded as soon as it ends (the caller saves them
    before the next pass starts, and may then drop them). calibration: layer -> the pseudo-neurons'
    calibration fixed by an earlier pass over another range (see `_run_pass`)."""
    if not layers:
        return
    plan, keys = plan_extraction(handle, windows, layers, settings, spec, window_range)
    log.info("%s", plan.describe())
    n = len(plan.passes)
    for i, group in enumerate(plan.passes):
        report = on_progress
        if on_progress is not None and n > 1:  # one progress series over all passes
            report = functools.partial(_pass_progress, on_progress, i, n)
        if n > 1:
            log.info("pass %d of %d: layers %s (about %.1f GB)", i + 1, n, group, plan.peak(group) / GB)
        passed = _run_pass(handle, windows, group, settings, spec, report, window_range, keys, calibration)
        for layer, profile in passed.items():
            yield layer, profile, n > 1


def _pass_progress(on_progress: ProgressCallback, i: int, n: int, done: int, total: int) -> None:
    """Pass i of n's progress as part of all n passes'."""
    on_progress(i * total + done, n * total)


def calibration_windows(n_windows: int, count: int) -> range | list[int]:
    """`count` window indices evenly strided over [0, n_windows) (all of them when fewer): the
    pseudo-neurons' calibration sample, one for the whole corpus whatever the shard or pass."""
    if count >= n_windows:
        return range(n_windows)
    return sorted({int(i) for i in np.linspace(0, n_windows - 1, count).round()})


def _run_pass(
    handle, windows, layers, settings: ExtractionConfig, spec, on_progress: ProgressCallback | None = None,
    window_range: range | None = None, keys: TypeKeys | None = None, calibration: dict | None = None,
) -> dict[int, ActivationProfile]:
    """One forward pass over `window_range` (default: every window) -> a profile per layer.

    calibration: layer -> pseudo-neuron Calibration of an earlier range's pass; those layers skip
    the calibration sample, so contiguous blocks of one job forward it once (extraction/blocks.py).

    Window indices and token positions are global (window * T + position), so profiles of disjoint
    ranges merge (extraction/shards.py). Batches are cut on the global grid of `batch_size` windows,
    so a range's batches are the one-worker pass's batches except at the range's ends.
    """
    device = torch.device(settings.device)
    T, skip = windows.window_len, settings.skip_first_positions
    if skip >= T:
        raise ConfigError("extraction.skip_first_positions", skip, f"< window_len ({T})")
    d_mlp, d_model = handle.d_mlp, handle.d_model
    ids = windows.ids  # [W, T] memmap
    n_windows = ids.shape[0]
    window_range = range(n_windows) if window_range is None else window_range
    keys = keys if keys is not None else TypeKeys.of_windows(ids, window_range, skip, settings.fold_block_windows)
    table_bytes = layer_footprint(spec, settings, d_mlp=d_mlp, d_model=d_model, n_types=len(keys.types),
                                  n_folds=len(keys.folds)).tables  # fmt: skip

    tables = table_device(device, table_bytes * len(layers))
    if tables != device:
        log.info("type tables on %s: %.1f GB do not fit %s's free memory", tables, table_bytes * len(layers) / GB, device)

    def build(layer: int) -> CombinedStat:
        pseudo = (
            PseudoNeurons.build(handle, layer, spec, settings, device, keys=keys, table_device=tables)
            if "pseudo_neurons" in spec else None
        )  # fmt: skip
        return CombinedStat.build(spec, d_mlp=d_mlp, d_model=d_model, keys=keys, config=settings, device=device,
                                  table_device=tables, pseudo=pseudo)  # fmt: skip

    reducers = {l: build(l) for l in layers}
    calibration = {l: c for l, c in (calibration or {}).items() if l in layers and "pseudo_neurons" in spec}
    for layer, fixed in calibration.items():
        reducers[layer].stats["pseudo_neurons"].calibration = fixed
    uncalibrated = [l for l in layers if l not in calibration]
    probe = reducers[layers[0]]
    neuron_sites = {l: handle.site(f"blocks.{l}.{settings.site}") for l in layers} if probe.reads_neurons else {}
    input_sites = (
        {l: handle.site(f"blocks.{l}.{settings.input_site}") for l in layers} if probe.reads_input else {}
    )
    mlp_in_sites = (
        {l: handle.site(f"blocks.{l}.ln2.hook_normalized") for l in layers} if probe.reads_mlp_input else {}
    )

    bs = settings.batch_size
    # The pseudo-neurons' calibration sample (windows strided over the whole corpus) is forwarded
    # first, in the same chunks in every shard and pass (so every shard calibrates identically);
    # its windows in this pass's range count there, their pseudo-neuron batches held until the
    # calibration is fixed, so the sample costs no forward pass of its own in a one-worker pass.
    sample = calibration_windows(n_windows, settings.pseudo_calibration_windows) if mlp_in_sites and uncalibrated else []
    sampled = set(sample)
    batches = [list(sample[i : i + bs]) for i in range(0, len(sample), bs)]
    batches += [  # the global grid of bs windows, clipped to the range, less the sample's windows
        rows for g in range(window_range.start - window_range.start % bs, window_range.stop, bs)
        if (rows := [w for w in range(max(g, window_range.start), min(g + bs, window_range.stop)) if w not in sampled])
    ]  # fmt: skip
    n_sample_batches = -(-len(sample) // bs)
    kept_per_window = T - skip
    pos_in_window = torch.arange(skip, T, device=device)  # [T - skip]
    tokens_total, tokens_done = len(window_range) * kept_per_window, 0
    bar = tqdm(
        total=tokens_total, unit="tok", unit_scale=True, disable=not settings.progress,
        desc=f"extract layers {layers}", mininterval=progress_interval(),
    )
    sites = list(neuron_sites.values()) + list(input_sites.values()) + list(mlp_in_sites.values())
    last_report = started = time.monotonic()
    hinted = False
    calibration_inputs = {l: [] for l in uncalibrated}  # [B * (T - skip), M] per sample batch
    for layer in uncalibrated if sample else ():
        reducers[layer].stats["pseudo_neurons"].defer_until_calibrated()

    def site(name: str, keep: torch.Tensor | None, width: int) -> torch.Tensor:
        """The captured site's kept windows and positions, one row per token: [N, width]."""
        value = captured[name] if keep is None else captured[name][keep]
        return value[:, skip:].reshape(-1, width)

    with torch.inference_mode(), capture_sites(handle.module, sites) as captured:
        for i, rows in enumerate(batches):
            batch = torch.from_numpy(np.asarray(ids[rows], dtype=np.int64)).to(device)  # [B, T]
            run_until_captured(handle.model, batch, captured)
            in_range = [j for j, w in enumerate(rows) if w in window_range]  # all but sample windows elsewhere
            keep = None if len(in_range) == len(rows) else torch.tensor(in_range, dtype=torch.long, device=device)
            if i < n_sample_batches:
                for layer in uncalibrated:
                    calibration_inputs[layer].append(site(mlp_in_sites[layer].name, None, d_model))
            if in_range:
                window_idx = torch.tensor(rows, device=device)[in_range]  # [B'] global
                token_ids = batch[in_range][:, skip:].reshape(-1)  # [N = B' * (T - skip)]
                positions = (window_idx[:, None] * T + pos_in_window[None, :]).reshape(-1)  # [N]
                token_windows = window_idx.repeat_interleave(T - skip)  # [N]
                for layer in layers:
                    acts = site(neuron_sites[layer].name, keep, d_mlp) if neuron_sites else None  # [N, d_mlp]
                    resid = site(input_sites[layer].name, keep, d_model) if input_sites else None  # [N, d_model]
                    mlp_in = site(mlp_in_sites[layer].name, keep, d_model) if mlp_in_sites else None  # [N, d_model]
                    reducers[layer].add(acts, resid, token_ids, positions, token_windows, mlp_in)
                bar.update(token_ids.numel())
                tokens_done += token_ids.numel()
            if sample and i == n_sample_batches - 1:  # the whole sample seen: calibrate
                for layer in uncalibrated:
                    reducers[layer].stats["pseudo_neurons"].calibrate(torch.cat(calibration_inputs.pop(layer)))
            if not hinted and (hint := long_pass_hint(time.monotonic() - started, tokens_done, tokens_total)):
                log.info("%s", hint)
                hinted = True
            if on_progress is not None and tokens_done < tokens_total:
                now = time.monotonic()
                if now - last_report >= PROGRESS_CALLBACK_SECONDS:
                    on_progress(tokens_done, tokens_total)
                    last_report = now
    bar.close()

    flat_ids = np.asarray(ids).reshape(-1)
    profiles = {}
    for layer in layers:
        tensors = {k: v.cpu() for k, v in reducers.pop(layer).export().items()}  # its tables go
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
