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

Memory: a saved block is dropped once saved and read back from the cache each time it is used
(`BlockProfiles`), and the merge streams the blocks one at a time, so a job holds about one profile
per layer beside the pass, as without blocks (G blocks of 30 layers held at once would not fit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from intraneuron.extraction.cache import CachedProfile, ProfileCache, cache_key
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


class BlockProfiles(Sequence):
    """One layer's G block profiles in corpus order. A block saved to the cache is read back afresh
    at each access (nothing is kept: a replicate's merge streams G - 1 of them through
    `merge_profiles`); one the cache could not take is held in memory."""

    def __init__(self, cache: ProfileCache | None, keys: list[str], held: list[ActivationProfile | None]):
        self.cache, self.keys, self.held = cache, keys, held

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.held[i] is not None:
            return self.held[i]
        profile = self.cache.load(self.keys[i])
        if profile is None:
            raise RuntimeError(f"block {i}: {self.cache.entry(self.keys[i])} was removed from the cache during the job")
        return profile

    def without(self, g: int) -> Iterator[ActivationProfile]:
        """Every block but block g, loaded one at a time."""
        return (self[j] for j in range(len(self)) if j != g)


def block_key_fields(fields: dict, block: int, blocks: int) -> dict:
    """A block's key fields: the whole profile's plus its place among the job's blocks."""
    return {**fields, "interval_block": block, "interval_blocks": blocks}


def extract_blocks(
    handle, windows, layers: list[int], settings: ExtractionConfig, cache: ProfileCache | None, blocks: int,
    stats: Iterable[str] | None = None, on_progress: ProgressCallback | None = None,
) -> tuple[dict[int, ActivationProfile], dict[int, BlockProfiles]]:
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
    found: dict[int, list] = {l: [None] * blocks for l in layers}  # None: to extract
    calibration: dict[int, Calibration] = {}
    for layer in layers:
        for i, key in enumerate(keys[layer]):  # each cached block verified (a damaged one is redone), not kept
            if cache is not None and (cached := cache.load(key)) is not None:
                found[layer][i] = _SAVED
                if layer not in calibration and (fixed := _calibration([cached])) is not None:
                    calibration[layer] = fixed
    sizes = [len(shard_windows(n_windows, i, blocks)) for i in range(blocks)]
    for i in range(blocks):
        todo = [l for l in layers if found[l][i] is None]
        if not todo:
            continue
        window_range = shard_windows(n_windows, i, blocks)
        report = _offset(on_progress, sum(sizes[:i]), n_windows, i, blocks) if on_progress is not None else None
        passed = _run_planned(handle, windows, todo, settings, spec, report, window_range, calibration)
        for layer, profile, _ in passed:
            if layer not in calibration and (fixed := _calibration([profile])) is not None:
                calibration[layer] = fixed
            found[layer][i] = profile
            if cache is not None and _save(cache, keys[layer][i], profile, block_key_fields(fields[layer], i, blocks)):
                log.info("layer %d: block %d of %d saved to %s", layer, i, blocks, cache.entry(keys[layer][i]))
                found[layer][i] = _SAVED  # read back when used
    block_sets = {l: BlockProfiles(cache, keys[l], [None if b is _SAVED else b for b in found[l]]) for l in layers}
    merged = {}
    for layer in layers:
        whole = cache_key(fields[layer])
        if cache is not None and (hit := cache.load(whole)) is not None:
            merged[layer] = hit
            continue
        merged[layer] = merge_profiles(iter(block_sets[layer]))
        if cache is not None and _save(cache, whole, merged[layer], fields[layer]):
            merged[layer] = CachedProfile(cache, whole, merged[layer].metadata())  # read back when analysed
    if on_progress is not None:
        total = n_windows * (windows.window_len - settings.skip_first_positions)
        on_progress(total, total)
    return merged, block_sets


_SAVED = object()  # a block saved to the cache, not held


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
