"""Split-half (even / odd window) token-type statistics for cross-fitting, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from intraneuron.extraction import ExtractionConfig, extract_profiles
from intraneuron.extraction.engine import profile_key_fields
from intraneuron.extraction.stats import CombinedStat, resolve_stats, stat_key_fields

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
