"""Contiguous corpus blocks of one job (extraction/blocks.py): their merge is the one-pass profile,
the pseudo-neurons are calibrated once for all blocks, and the blocks are cached and resumed."""

from __future__ import annotations

import pytest
import torch

from intraneuron.extraction import extract_profiles
from intraneuron.extraction.blocks import extract_blocks
from intraneuron.extraction.cache import ProfileCache
from tests.test_corpus_shards import LAYER, SETTINGS, SPEC, assert_same_profile


def test_block_profiles_merge_to_the_one_pass_profile_with_one_calibration(tiny_gpt2, small_windows, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    from intraneuron.extraction import engine

    whole = extract_profiles(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]
    forwarded = []
    original = engine.run_until_captured
    monkeypatch.setattr(engine, "run_until_captured", lambda model, batch, captured: (
        forwarded.append(batch.shape[0]), original(model, batch, captured))[1])  # fmt: skip
    cache = ProfileCache(tmp_path)
    merged, blocks = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, 3, stats=SPEC)
    assert_same_profile(merged[LAYER], whole)
    assert [b.n_tokens for b in blocks[LAYER]] == [21 * 32, 21 * 32, 22 * 32]
    calib = [b.tensors["pseudo.calib_real_sd"] for b in blocks[LAYER]]
    assert all(torch.equal(c, calib[0]) for c in calib)
    # the sample is forwarded once (its windows outside block 0 once more), not once per block
    extra = sum(forwarded) - small_windows.n_windows
    assert 0 < extra <= SETTINGS.pseudo_calibration_windows
    # cached: a second job forwards nothing and reads the same blocks; the whole key is saved
    forwarded.clear()
    again, blocks_again = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, 3, stats=SPEC)
    assert not forwarded
    for b, c in zip(blocks[LAYER], blocks_again[LAYER], strict=True):
        assert_same_profile(c, b)
    assert extract_profiles(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, stats=SPEC) and not forwarded


def test_a_lost_block_is_extracted_again_with_the_cached_calibration(tiny_gpt2, small_windows, tmp_path):
    from intraneuron.extraction.blocks import block_key_fields
    from intraneuron.extraction.cache import cache_key
    from intraneuron.extraction.engine import profile_key_fields
    from intraneuron.extraction.stats import resolve_stats

    cache = ProfileCache(tmp_path)
    _, first = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, 4, stats=SPEC)
    fields = profile_key_fields(tiny_gpt2, small_windows, LAYER, SETTINGS, resolve_stats(SPEC, SETTINGS))
    cache.remove(cache_key(block_key_fields(fields, 0, 4)))  # block 0 fixed the calibration
    _, second = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, 4, stats=SPEC)
    assert_same_profile(second[LAYER][0], first[LAYER][0])


def test_more_blocks_than_windows_are_refused(tiny_gpt2, small_windows):
    with pytest.raises(ValueError, match="blocks"):
        extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, None, small_windows.n_windows + 1, stats=SPEC)


def test_saved_blocks_are_read_back_when_used_not_held(tiny_gpt2, small_windows, tmp_path):
    """A job keeps no block in memory once it is cached: each access reads it back, and a replicate's
    merge (every block but one) streams them; the analysed profile is read back from the cache too."""
    from intraneuron.extraction.cache import CachedProfile
    from intraneuron.extraction.shards import merge_profiles

    merged, blocks = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, ProfileCache(tmp_path), 3,
                                    stats=SPEC)  # fmt: skip
    held = blocks[LAYER]
    assert held.held == [None, None, None] and isinstance(merged[LAYER], CachedProfile)
    assert held[1] is not held[1]  # loaded afresh at each access
    loaded = []
    streamed = merge_profiles(loaded.append(b) or b for b in held.without(0))
    assert len(loaded) == 2
    assert_same_profile(streamed, merge_profiles([held[1], held[2]]))
    # without a writable cache the blocks stay in memory, and the merge is the same
    _, in_memory = extract_blocks(tiny_gpt2, small_windows, [LAYER], SETTINGS, None, 3, stats=SPEC)
    assert all(b is not None for b in in_memory[LAYER].held)
    assert_same_profile(merge_profiles(in_memory[LAYER].without(0)), streamed)
