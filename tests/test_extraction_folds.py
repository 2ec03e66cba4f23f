"""Split-half token-type statistics for cross-fitting (even / odd windows, or alternating blocks of
windows: extraction.fold_block_windows), against brute force."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from intraneuron.errors import ConfigError
from intraneuron.extraction import ExtractionConfig, extract_profiles
from intraneuron.extraction.engine import profile_key_fields
from intraneuron.extraction.stats import CombinedStat, resolve_stats, stat_key_fields
from intraneuron.extraction.type_tables import TokenTypeTable

SETTINGS = ExtractionConfig(top_k=5, batch_size=7, progress=False, skip_first_positions=1)
SPEC = ("fold_token_types", "token_types", "topk")


def captured_post(handle, windows, layer: int, skip: int):
    """[W, T - skip, d_mlp] activations by an independent hook on GELU's output, and the ids."""
    acts = []
    hook = handle.model.transformer.h[layer].mlp.act.register_forward_hook(lambda _m, _i, o: acts.append(o))
    ids = torch.from_numpy(np.asarray(windows.ids, dtype=np.int64))
    with torch.no_grad():
        handle.model(ids)
    hook.remove()
    return acts[0][:, skip:].double(), ids[:, skip:]


@pytest.fixture(scope="module")
def fold_profile(tiny_gpt2, small_windows):
    return extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache=None, stats=SPEC)[1]


def test_split_halves_equal_per_half_brute_force(tiny_gpt2, small_windows, fold_profile):
    A, ids = captured_post(tiny_gpt2, small_windows, 1, 1)  # [W, T', D], [W, T']
    type_ids, counts, means = fold_profile.split_type_stats()
    assert np.array_equal(type_ids, np.unique(ids.numpy()))
    assert counts.dtype == np.int64 and means.dtype == np.float32
    assert counts.shape == (2, type_ids.size) and means.shape == (2, type_ids.size, tiny_gpt2.d_mlp)
    for half in (0, 1):
        a = A[half::2].reshape(-1, A.shape[-1])
        t = ids[half::2].reshape(-1)
        for col, token in enumerate(type_ids):
            mask = t == int(token)
            assert counts[half, col] == int(mask.sum())
            if mask.any():
                np.testing.assert_allclose(means[half, col], a[mask].mean(0).numpy(), atol=1e-6)
            else:
                assert np.isnan(means[half, col]).all()
    assert (counts.sum(0) > 0).all()


def test_weighted_halves_equal_type_mean(fold_profile):
    type_ids, counts, means = fold_profile.split_type_stats()
    assert np.array_equal(type_ids, fold_profile.numpy("type_ids"))
    assert np.array_equal(counts.sum(0), fold_profile.numpy("type_count"))
    combined = np.nansum(means * counts[..., None], 0) / counts.sum(0)[:, None]
    np.testing.assert_allclose(combined, fold_profile.numpy("type_mean"), atol=1e-6)
    # the per-type max over both halves is the type max
    fold_max = fold_profile.numpy("fold_max")
    per_type = np.full(fold_profile.numpy("type_max").shape, -np.inf, np.float32)
    np.maximum.at(per_type, np.searchsorted(type_ids, fold_profile.numpy("fold_ids") // 2), fold_max)
    np.testing.assert_array_equal(per_type, fold_profile.numpy("type_max"))


def test_fold_stats_merge_like_one_pass():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(240, 6, generator=g)
    ids = torch.randint(0, 9, (240,), generator=g)
    pos = torch.arange(240)
    win = pos // 8  # windows of 8 tokens

    def build():
        return CombinedStat.build(["fold_token_types", "token_types"], d_mlp=6, d_model=4, vocab_size=9,
                                  config=SETTINGS)  # fmt: skip

    whole, first, second = build(), build(), build()
    whole.add(acts, None, ids, pos, win)
    first.add(acts[:100], None, ids[:100], pos[:100], win[:100])
    second.add(acts[100:], None, ids[100:], pos[100:], win[100:])
    rebuilt = CombinedStat.load_state_dict(first.state_dict())  # a shard saved and resumed
    rebuilt.merge(second)
    a, b = rebuilt.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and "fold_ids" in a
    for key in b:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-6), key


def test_fold_stat_without_window_index_fails():
    stat = CombinedStat.build(["fold_token_types"], d_mlp=2, d_model=2, vocab_size=3, config=SETTINGS)
    with pytest.raises(ValueError, match="window_idx"):
        stat.add(torch.zeros(2, 2), None, torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_fold_is_requested_only_and_in_the_key(tiny_gpt2, small_windows):
    assert "fold_token_types" not in resolve_stats(None, SETTINGS)
    assert "pseudo_neurons" not in resolve_stats(None, SETTINGS)
    only_fold = stat_key_fields(["fold_token_types"], SETTINGS)
    assert only_fold["stats"] == ["fold_token_types"] and "track_type_max" in only_fold
    assert "top_k" not in only_fold and "pseudo_seed" not in only_fold
    with_fold = profile_key_fields(tiny_gpt2, small_windows, 1, SETTINGS, SPEC)
    without = profile_key_fields(tiny_gpt2, small_windows, 1, SETTINGS, ("token_types", "topk"))
    assert with_fold != without


def halves_by_walking(n_windows: int, block: int) -> list[int]:
    """The documented split, walked window by window: half 0 first, switching every `block` windows."""
    halves, half = [], 0
    for w in range(n_windows):
        if w and w % block == 0:
            half = 1 - half
        halves.append(half)
    return halves


def brute_force_halves(acts, ids, halves):
    """Per half, per token type: occurrence count and activation sum, by a loop over windows.
    acts [W, T', D] float64, ids [W, T'] -> ({type: count}, {type: [D] sum}) per half."""
    counts, sums = ({}, {}), ({}, {})
    for w, half in enumerate(halves):
        for token, act in zip(ids[w].tolist(), acts[w], strict=True):
            counts[half][token] = counts[half].get(token, 0) + 1
            sums[half][token] = sums[half].get(token, 0.0) + act
    return counts, sums


@pytest.mark.parametrize("block", [1, 3, 10])
def test_blocked_halves_equal_per_half_brute_force(tiny_gpt2, small_windows, block):
    """Real neurons and pseudo-neurons alike: window w is in half (w // block) % 2; the batches
    (7 windows) cut across the blocks."""
    settings = dataclasses.replace(SETTINGS, fold_block_windows=block, pseudo_neurons=6, pseudo_calibration_windows=4)
    profile = extract_profiles(tiny_gpt2, small_windows, [1], settings, cache=None,
                               stats=SPEC + ("pseudo_neurons",))[1]  # fmt: skip
    A, ids = captured_post(tiny_gpt2, small_windows, 1, 1)  # [W, T', D], [W, T']
    halves = halves_by_walking(small_windows.n_windows, block)
    assert halves.count(0) and halves.count(1)
    counts, sums = brute_force_halves(A.numpy(), ids.numpy(), halves)
    type_ids, got_counts, means = profile.split_type_stats()  # [T], [2, T], [2, T, D]
    for half in (0, 1):
        want_count = np.array([counts[half].get(int(t), 0) for t in type_ids])
        assert np.array_equal(got_counts[half], want_count)
        seen = want_count > 0
        want_mean = np.stack([sums[half][int(t)] for t in type_ids[seen]]) / want_count[seen, None]
        np.testing.assert_allclose(means[half][seen], want_mean, atol=1e-6)
        assert np.isnan(means[half][~seen]).all()
    pseudo_ids, pseudo_counts, _ = profile.pseudo().split_type_stats()  # the same halves
    assert np.array_equal(pseudo_ids, type_ids) and np.array_equal(pseudo_counts, got_counts)


def test_block_one_is_even_odd_bit_for_bit():
    """fold_block_windows=1 keys the fold table by token_id * 2 + window % 2, as before the option:
    the same table, bit for bit, as one fed those keys directly."""
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(600, 5, generator=g)
    ids = torch.randint(0, 11, (600,), generator=g)
    window = torch.arange(600) // 9
    even_odd = ids * 2 + window % 2
    stat = CombinedStat.build(["fold_token_types"], d_mlp=5, d_model=3, vocab_size=11,
                              config=dataclasses.replace(SETTINGS, fold_block_windows=1))  # fmt: skip
    table = TokenTypeTable(even_odd.unique(), 5)
    for start in range(0, 600, 64):
        part = slice(start, start + 64)
        stat.add(acts[part], None, ids[part], torch.arange(600)[part], window[part])
        table.add(acts[part], even_odd[part])
    got, want = stat.state_dict(), table.state_dict("fold")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    blocked = CombinedStat.build(["fold_token_types"], d_mlp=5, d_model=3, vocab_size=11,
                                 config=dataclasses.replace(SETTINGS, fold_block_windows=4))  # fmt: skip
    blocked.add(acts, None, ids, torch.arange(600), window)
    assert not torch.equal(blocked.state_dict()["fold_count"], got["fold_count"])


def test_the_fold_block_is_in_the_key_of_fold_profiles_only(tiny_gpt2, small_windows):
    blocked = dataclasses.replace(SETTINGS, fold_block_windows=64)
    assert stat_key_fields(["fold_token_types"], blocked)["fold_block_windows"] == 64
    assert "fold_block_windows" not in stat_key_fields(["token_types", "topk"], blocked)
    assert "batch_size" not in stat_key_fields(["fold_token_types"], blocked)  # how, not what
    fields = lambda settings, spec: profile_key_fields(tiny_gpt2, small_windows, 1, settings, spec)  # noqa: E731
    assert fields(blocked, SPEC) != fields(SETTINGS, SPEC)
    assert fields(blocked, ("token_types", "topk")) == fields(SETTINGS, ("token_types", "topk"))
    assert fields(dataclasses.replace(blocked, batch_size=3), SPEC) == fields(blocked, SPEC)


def test_a_block_longer_than_half_the_corpus_is_refused_before_the_pass(tiny_gpt2, small_windows):
    calls = []
    hook = tiny_gpt2.model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ConfigError) as err:  # 64 windows: blocks of 33 leave the second half 31
            extract_profiles(tiny_gpt2, small_windows, [1], dataclasses.replace(SETTINGS, fold_block_windows=33),
                             cache=None, stats=SPEC)  # fmt: skip
    finally:
        hook.remove()
    assert err.value.key == "extraction.fold_block_windows" and "64 windows" in str(err.value) and not calls
    halves = extract_profiles(tiny_gpt2, small_windows, [1], dataclasses.replace(SETTINGS, fold_block_windows=32),
                              cache=None, stats=SPEC)[1].split_type_stats()[1].sum(1)  # fmt: skip
    assert halves.tolist() == [32 * 31, 32 * 31]
    no_folds = dataclasses.replace(SETTINGS, fold_block_windows=33)  # read by the fold table only
    assert extract_profiles(tiny_gpt2, small_windows, [1], no_folds, cache=None, stats=("topk",))[1].n_tokens == 64 * 31
