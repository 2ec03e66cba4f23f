"""A layer's profile extracted as G contiguous blocks of windows in one job, for corpus intervals.

Block i of G holds windows shard_windows(W, i, G) (extraction/shards.py). Each block's profile is
cached under the whole profile's key fields plus (interval_block, interval_blocks), written
atomically like every entry, so a job killed after some blocks resumes with the others. The
pseudo-neurons' calibration is fixed once per layer (by the first block extracted, on the usual
sample strided over the whole corpus, or read from a cached block) and handed to the other blocks'
passes, so every block is calibrated alike and the sample is forwarded once. The profile an analysis
reads is the blocks' merge (`merge_profiles`: exact for counts, top-k and extremes, float sums to
about 1e-7 relative), also saved under the whole key when that is absent, so later jobs without
blocks reuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from intraneuron.extraction.cache import ProfileCache, cache_key
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.extraction.engine import (
    ProgressCallback,
    _run_planned,
    _save,
    check_before_pass,
    profile_key_fields,
)
from intraneuron.extraction.profile import ActivationProfile
from intraneuron.extraction.pseudo import Calibration
from intraneuron.extraction.shards import merge_profiles, shard_windows

log = logging.getLogger(__name__)


def block_key_fields(fields: dict, block: int, blocks: int) -> dict:
    """A block's key fields: the whole profile's plus its place among the job's blocks."""
    return {**fields, "interval_block": block, "interval_blocks": blocks}


def extract_blocks(
    handle, windows, layers: list[int], settings: ExtractionConfig, cache: ProfileCache | None, blocks: int,
    stats: Iterable[str] | None = None, on_progress: ProgressCallback | None = None,
) -> tuple[dict[int, ActivationProfile], dict[int, list[ActivationProfile]]]:
    """(layer -> the merged profile, layer -> its `blocks` block profiles in corpus order)."""
    spec = check_before_pass(handle, windows, layers, settings, stats)
    n_windows = int(windows.ids.shape[0])
    if not 2 <= blocks <= n_windows:
        raise ValueError(f"{blocks} blocks of {n_windows} windows: expected 2 <= blocks <= windows")
    if settings.corpus_shards > 1:
        raise ValueError("corpus blocks and corpus shards do not combine (one job extracts every block)")
    if cache is not None and not cache.writable():
        cache = None
    fields = {l: profile_key_fields(handle, windows, l, settings, spec) for l in layers}
    keys = {l: [cache_key(block_key_fields(fields[l], i, blocks)) for i in range(blocks)] for l in layers}
    found: dict[int, list[ActivationProfile | None]] = {
        l: [cache.load(k) if cache is not None else None for k in keys[l]] for l in layers
    }
    calibration = {l: c for l in layers if (c := _calibration(found[l])) is not None}
    sizes = [len(shard_windows(n_windows, i, blocks)) for i in range(blocks)]
    for i in range(blocks):
        todo = [l for l in layers if found[l][i] is None]
        if not todo:
            continue
        window_range = shard_windows(n_windows, i, blocks)
        report = _offset(on_progress, sum(sizes[:i]), n_windows, i, blocks) if on_progress is not None else None
        passed = _run_planned(handle, windows, todo, settings, spec, report, window_range, calibration)
        for layer, profile, _ in passed:
            if cache is not None and _save(cache, keys[layer][i], profile, block_key_fields(fields[layer], i, blocks)):
                log.info("layer %d: block %d of %d saved to %s", layer, i, blocks, cache.entry(keys[layer][i]))
            found[layer][i] = profile
            if layer not in calibration and (fixed := _calibration([profile])) is not None:
                calibration[layer] = fixed
    merged = {}
    for layer in layers:
        merged[layer] = merge_profiles(found[layer])
        whole = cache_key(fields[layer])
        if cache is not None and not cache.entry(whole).exists():
            _save(cache, whole, merged[layer], fields[layer])
    if on_progress is not None:
        total = n_windows * (windows.window_len - settings.skip_first_positions)
        on_progress(total, total)
    return merged, {l: list(found[l]) for l in layers}


def _calibration(profiles: list[ActivationProfile | None]) -> Calibration | None:
    """The pseudo-neurons' calibration of the first profile that has one."""
    for profile in profiles:
        if profile is not None and (fixed := Calibration.load_state_dict(profile.tensors, "pseudo")) is not None:
            return fixed
    return None


def _offset(on_progress: ProgressCallback, before: int, n_windows: int, i: int, blocks: int) -> ProgressCallback:
    """Block i's progress as part of the whole corpus's (windows before it counted as done)."""

    def report(done: int, total: int) -> None:
        per_window = total // max(1, len(shard_windows(n_windows, i, blocks)))
        on_progress(before * per_window + done, n_windows * per_window)

    return report
