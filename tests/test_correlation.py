"""Streaming correlation between two models' neurons, checked against brute force (numpy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from intraneuron.extraction.correlation import (
    StreamingCorrelation,
    bytes_per_pair,
    merge_summaries,
    plan_tiles,
    rotation,
    summarise,
    working_bytes,
)

UNEVEN = [0, 700, 701, 2300, 3000]  # batch edges: includes a one-row batch


def correlated(n: int, d_a: int, d_b: int, mean: float = 0.0, std: float = 1.0, seed: int = 0):
    """A [n, d_a], B [n, d_b] float64 sharing 6 latent factors, so |r| spans 0 to ~0.7."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    a = z @ rng.standard_normal((6, d_a)) / 2 + rng.standard_normal((n, d_a))
    b = z @ rng.standard_normal((6, d_b)) / 2 + rng.standard_normal((n, d_b))
    return mean + std * a, mean + std * b


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.corrcoef(a, b, rowvar=False)[: a.shape[1], a.shape[1] :]  # [Da, Db]


def stream(a, b, edges=UNEVEN, batch_dtype=torch.float64, input_dtype=torch.float64, stat=None):
    stat = stat or StreamingCorrelation(a.shape[1], b.shape[1], batch_dtype=batch_dtype)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        stat.add(torch.as_tensor(a[lo:hi], dtype=input_dtype), torch.as_tensor(b[lo:hi], dtype=input_dtype))
    return stat


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_float64_stream_over_uneven_batches_equals_corrcoef(mean):
    a, b = correlated(3000, 20, 12, mean=mean, std=0.5)
    got = stream(a, b).correlation(torch.float64).numpy()
    np.testing.assert_allclose(got, reference(a, b), rtol=0, atol=1e-10)


def test_float32_batches_on_large_mean_data_match_float64_numpy():
    # mean 100, std 0.01: raw float32 power sums would cancel to noise; centred batches do not.
    # Tolerances: on float32 inputs the algorithm adds ~1e-7 to what float32 storage already lost
    # (an ulp of 100 is 8e-6, ~1e-3 of the std, which moves r by ~1e-5 against the float64 data).
    # Measured: 8e-8, 1e-5, 7e-8 and 3e-7 for the four checks below.
    a, b = correlated(3000, 20, 12, mean=100.0, std=0.01)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    got = stream(a32, b32, batch_dtype=torch.float32, input_dtype=torch.float32).correlation(torch.float64).numpy()
    np.testing.assert_allclose(got, reference(a32.astype(np.float64), b32.astype(np.float64)), atol=5e-7, rtol=0)
    np.testing.assert_allclose(got, reference(a, b), atol=5e-5, rtol=0)
    # float64 inputs with float32 batch products keep the digits below float32's ulp of the mean
    got = stream(a, b, batch_dtype=torch.float32).correlation(torch.float64).numpy()
    np.testing.assert_allclose(got, reference(a, b), atol=5e-7, rtol=0)
    # batches are centred on the running mean: a mean that jumps by 3 std mid-stream costs little
    a[1500:] += 0.05
    b[1500:] -= 0.05
    got = stream(a, b, batch_dtype=torch.float32).correlation(torch.float64).numpy()
    np.testing.assert_allclose(got, reference(a, b), atol=1e-6, rtol=0)


def test_merge_of_two_halves_equals_one_stream_and_state_dict_round_trips():
    a, b = correlated(3000, 10, 7, mean=5.0)
    whole = stream(a, b)
    first = stream(a, b, edges=[0, 700, 1300])
    second = stream(a, b, edges=[1300, 1301, 3000])
    first.merge(second)
    np.testing.assert_allclose(first.comoment.numpy(), whole.comoment.numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(first.correlation(torch.float64), whole.correlation(torch.float64), atol=1e-12)
    empty = StreamingCorrelation(10, 7)
    empty.merge(whole)  # into an empty stat, and an empty one into a full stat
    whole.merge(StreamingCorrelation(10, 7))
    assert torch.equal(empty.correlation(), whole.correlation())

    state = whole.state_dict("pair_3_5")
    assert all(k.startswith("pair_3_5_") for k in state)
    rebuilt = StreamingCorrelation.load_state_dict(state, "pair_3_5")
    assert rebuilt.n == whole.n and torch.equal(rebuilt.correlation(), whole.correlation())
    # resuming the rebuilt stat is the same as never having stopped
    part = StreamingCorrelation.load_state_dict(stream(a, b, edges=[0, 1300]).state_dict(), batch_dtype=torch.float64)
    resumed = stream(a, b, edges=[1300, 3000], stat=part)
    np.testing.assert_allclose(resumed.correlation(torch.float64), whole.correlation(torch.float64), atol=1e-12)


def test_a_model_against_itself_has_a_unit_diagonal():
    a, _ = correlated(2000, 16, 1, mean=3.0)
    corr = stream(a, a, edges=[0, 999, 2000], batch_dtype=torch.float32).correlation()
    np.testing.assert_allclose(corr.diagonal(), np.ones(16), atol=1e-6)
    assert (corr.abs() <= 1).all()


def test_a_permuted_copy_is_recovered_and_the_rotation_baseline_destroys_it():
    d, n = 64, 3000
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=gen) * 2 + 1
    perm = torch.randperm(d, generator=gen)
    b = a[:, perm] + 0.05 * torch.randn(n, d, generator=gen)  # B's column j is A's column perm[j]
    s = summarise(stream(a, b, edges=[0, 1000, 3000], batch_dtype=torch.float32).correlation(), top_k=3)
    assert torch.equal(s["partner"], torch.argsort(perm))  # neuron i of A sits at perm^-1[i] in B
    assert (s["max_corr"] > 0.99).all()
    assert (s["top_corr"][:, 1] < 0.2).all()  # the runner-up is noise
    for orthogonal in (False, True):
        rotated = b @ rotation(d, seed=1, orthogonal=orthogonal).T
        base = summarise(stream(a, rotated, edges=[0, 3000]).correlation(), top_k=3)
        assert base["max_corr"].max() < 0.5 and base["max_corr"].median() < 0.35, orthogonal


def test_a_dead_neuron_gives_nan_and_no_partner_without_warnings():
    a, b = correlated(1500, 6, 5)
    a[:, 2] = 0.0  # dead neurons of A and B; 1/3 is no float32 number, 3.14159 no power of 2
    b[:, 4] = 1 / 3
    b[:, 1] = np.float32(3.14159)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch_dtype, input_dtype in [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                         (torch.float64, torch.float16), (torch.float64, torch.float64)]:
            corr = stream(a, b, batch_dtype=batch_dtype, input_dtype=input_dtype).correlation()
            assert corr[2].isnan().all() and corr[:, [1, 4]].isnan().all()
            assert not corr[[0, 1, 3, 4, 5]][:, [0, 2, 3]].isnan().any()
            assert not corr.isinf().any()
            s = summarise(corr, top_k=2)
            assert s["partner"][2] == -1 and s["max_corr"][2].isnan()
            assert not np.isin(s["top_partner"], [1, 4]).any()  # never a dead one
        alive = [0, 1, 3, 4, 5]
        np.testing.assert_allclose(corr[alive][:, [0, 2, 3]], reference(a[:, alive], b[:, [0, 2, 3]]), atol=1e-6, rtol=0)
        assert StreamingCorrelation(3, 2).correlation().isnan().all()  # nothing seen yet


def test_nearly_dead_neurons_are_not_dead():
    # a sparse neuron, one token one ulp off a constant, and a neuron constant within each batch
    a, b = correlated(3000, 4, 5)
    a = a.astype(np.float32)
    a[:, 0] = np.where(np.arange(3000) % 500 == 7, a[:, 0], 0.0)
    a[:, 1] = np.float32(100.0)
    a[1234, 1] = np.nextafter(np.float32(100.0), np.float32(200.0))
    a[:, 2] = np.arange(3000) >= 1300
    corr = stream(a, b, batch_dtype=torch.float32, input_dtype=torch.float32).correlation(torch.float64)
    np.testing.assert_allclose(corr, reference(a.astype(np.float64), b), atol=1e-6, rtol=0)


def test_summaries_merged_over_column_blocks_equal_the_full_summary():
    gen = torch.Generator().manual_seed(3)
    corr = torch.rand(9, 23, generator=gen) * 2 - 1
    corr[:, 7] = torch.nan  # a dead neuron of B
    corr[4] = torch.nan  # a dead neuron of A
    full = summarise(corr, top_k=5)
    edges = [0, 3, 11, 12, 23]  # the 1- and 3-wide blocks are narrower than k: padded
    merged = summarise(corr[:, :3], top_k=5)
    for lo, hi in zip(edges[1:-1], edges[2:], strict=True):
        merged = merge_summaries(merged, summarise(corr[:, lo:hi], top_k=5), offset2=lo)
    for key in full:
        torch.testing.assert_close(merged[key], full[key], equal_nan=True, rtol=0, atol=0)
    assert full["partner"][4] == -1 and (full["top_partner"][4] == -1).all()
    assert not (full["top_partner"] == 7).any()
    np.testing.assert_array_equal(full["max_corr"][[0, 1]], np.nanmax(corr[[0, 1]].numpy(), axis=1))


def test_rotation_rows_are_unit_norm_seeded_and_optionally_orthogonal():
    r = rotation(48, seed=7)
    torch.testing.assert_close(r.norm(dim=1), torch.ones(48))
    assert torch.equal(r, rotation(48, seed=7)) and not torch.equal(r, rotation(48, seed=8))
    assert (r @ r.T - torch.eye(48)).abs().max() > 0.1  # the authors' baseline: not orthogonal
    q = rotation(48, seed=7, orthogonal=True, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q.float(), rotation(48, seed=7, orthogonal=True))


def test_plan_tiles_respects_the_bound_and_covers_each_pair_once():
    pairs = [(la, lb) for la in range(5) for lb in range(4)]
    per_pair, reserve = bytes_per_pair(96, 64), working_bytes(96, 64, 512)
    assert per_pair == 8 * 96 * 64 + 16 * (96 + 64)
    bound = 3 * per_pair + reserve + 100
    passes = plan_tiles(pairs, 96, 64, bound, reserve_bytes=reserve)
    assert sorted(p for tile in passes for p in tile) == sorted(pairs)
    assert all(len(t) * per_pair + reserve <= bound for t in passes)
    assert len(passes) == 7  # ceil(20 / 3)
    with pytest.raises(ValueError, match=f"at least {per_pair + reserve:,} bytes"):
        plan_tiles(pairs, 96, 64, per_pair + reserve - 1, reserve_bytes=reserve)
    with pytest.raises(ValueError, match="duplicates"):
        plan_tiles([(0, 0), (0, 0)], 96, 64, bound)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    a, b = correlated(3000, 32, 24, mean=50.0)
    cpu = stream(a, b, batch_dtype=torch.float32).correlation(torch.float64)
    gpu = StreamingCorrelation(32, 24, device="cuda")
    for lo, hi in zip(UNEVEN[:-1], UNEVEN[1:], strict=True):
        gpu.add(torch.as_tensor(a[lo:hi], device="cuda"), torch.as_tensor(b[lo:hi], device="cuda"))
    torch.testing.assert_close(gpu.correlation(torch.float64).cpu(), cpu, atol=1e-5, rtol=0)
    assert rotation(16, 0, device="cuda").device.type == "cuda"
    torch.testing.assert_close(rotation(16, 0, device="cuda").cpu(), rotation(16, 0))
