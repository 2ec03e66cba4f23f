"""The confidence analysis's calibration: bootstrap intervals over windows for the ablation effects
(against a loop over resampled windows of the per-token effects, and their coverage of a known
value), and the check of W_U's bottom singular values against simulated Q8_0 de-quantisation noise
(against gguf's own Q8_0 round trip, and on a synthetic W_U with a planted null space)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from intraneuron.analyses.confidence.bootstrap import (
    INTERVAL_OF,
    interval_columns,
    median_intervals,
    window_replicates,
)
from intraneuron.analyses.confidence.effects import NeuronEffects, final_layer_effects
from intraneuron.analyses.confidence.forward import clean_pass, mean_activation, token_filter
from intraneuron.analyses.confidence.quantisation import null_space_under_noise, q8_0_noise
from intraneuron.models.weights import neuron_weights, unembedding

NEURONS = [1, 4, 9, 30]
N_BOOT, SEED = 300, (0, 2)


@pytest.fixture(scope="module")
def effects(tiny_gpt2):
    """Analytic final-layer effects of NEURONS on 7 windows of 12 tokens, with per-token rows."""
    handle, layer = tiny_gpt2, tiny_gpt2.n_layers - 1
    ids = torch.randint(0, 3000, (7, 12), generator=torch.Generator().manual_seed(0))  # [W, T]
    ids[1, 4] = ids[5, 0] = 50256
    mask = token_filter(ids, skip_first=2, drop_ids=[50256])
    mask[3] = False  # a window with no counted token: it is drawn, and adds nothing
    clean = clean_pass(handle, ids, layer, NEURONS)
    log_p = torch.log_softmax(torch.randn(50257, generator=torch.Generator().manual_seed(1)), 0)
    out = final_layer_effects(clean, neuron_weights(handle, layer, processed=False).w_out[NEURONS],
                              unembedding(handle, processed=False), mean_activation(handle, ids, layer, NEURONS),
                              mask=mask, freq_direction=log_p - log_p.mean(), log_p_freq=log_p, per_token=True)  # fmt: skip
    return out, mask


def loop_reference(per_token: dict[str, torch.Tensor], window: np.ndarray, draws: np.ndarray) -> dict[str, np.ndarray]:
    """Each replicate's effects from the per-token rows of its drawn windows, one replicate at a time."""
    out = {name: [] for name in INTERVAL_OF}
    for drawn in draws:
        rows = np.concatenate([np.flatnonzero(window == w) for w in drawn])
        mean = {k: v[:, rows].double().mean(1).numpy() for k, v in per_token.items()}  # [m]
        absolute = {k: v[:, rows].double().abs().mean(1).numpy() for k, v in per_token.items()}
        out["ln_mediated"].append(1 - absolute["dloss_de"] / absolute["dloss_te"])
        out["freq_mediated"].append(1 - absolute["dloss_freq"] / absolute["dloss_te"])
        out["mean_dentropy_te"].append(mean["dentropy_te"])
        out["mean_dentropy_de"].append(mean["dentropy_de"])
        out["mean_abs_dentropy_te"].append(absolute["dentropy_te"])
    return {k: np.array(v) for k, v in out.items()}  # [R, m]


def test_the_window_bootstrap_equals_a_loop_over_resampled_windows(effects):
    result, mask = effects
    W, P = mask.shape
    window = np.repeat(np.arange(W), P)[mask.reshape(-1).numpy()]  # [N] window of each per-token row
    assert result.window_tokens.tolist() == np.bincount(window, minlength=W).tolist()
    for key, rows in result.per_token.items():  # the per-window sums add up to the totals
        torch.testing.assert_close(result.window_sums[key].sum(1), rows.double().sum(1), rtol=1e-5, atol=1e-7)
    fast = window_replicates(result, N_BOOT, SEED)
    draws = np.random.default_rng(SEED).integers(0, W, size=(N_BOOT, W))  # the same seed, the same draws
    slow = loop_reference(result.per_token, window, draws)
    for name in INTERVAL_OF:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=1e-8, err_msg=name)
    columns = interval_columns(fast)
    for name in INTERVAL_OF:
        lo, hi = np.percentile(slow[name], [2.5, 97.5], axis=0)
        np.testing.assert_allclose(columns[f"{name}_lo"], lo, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(columns[f"{name}_hi"], hi, rtol=1e-5, atol=1e-8)
        point = result.summary[name].double().numpy()
        assert (columns[f"{name}_lo"] <= point + 1e-6).all() and (point <= columns[f"{name}_hi"] + 1e-6).all()
    assert (columns["ln_mediated_hi"] - columns["ln_mediated_lo"] > 0).all()  # not degenerate
    rows = np.array([0, 2, 3])  # the median over a subset of neurons, replicate by replicate
    metrics = median_intervals(fast, rows, "candidates")
    lo, hi = np.percentile(np.median(slow["ln_mediated"][:, rows], axis=1), [2.5, 97.5])
    assert metrics["candidates/ln_mediated/median_lo"] == pytest.approx(lo, rel=1e-5)
    assert metrics["candidates/ln_mediated/median_hi"] == pytest.approx(hi, rel=1e-5)


def synthetic_effects(rng: np.random.Generator, n_windows: int) -> NeuronEffects:
    """One neuron's per-window sums, tokens sharing their window's context: entropy change per token
    0.3 + b_w + N(0, 1) with b_w ~ N(0, 0.5); |dL_TE| per token Gamma(2, 1) times a window factor,
    |dL_DE| = 0.4 h_w |dL_TE| with E h_w = 1. Known: mean entropy change 0.3, ln_mediated 0.6."""
    n = rng.integers(20, 61, n_windows)  # tokens per window
    entropy = rng.normal(n * (0.3 + rng.normal(0, 0.5, n_windows)), np.sqrt(n))
    te = rng.gamma(2.0 * n, 1.0) * rng.lognormal(0, 0.3, n_windows)
    de = 0.4 * rng.uniform(0.5, 1.5, n_windows) * te
    sums = {"dentropy_te": entropy, "abs_dloss_te": te, "abs_dloss_de": de}
    return NeuronEffects(0, torch.arange(1), int(n.sum()), {}, None,
                         {k: torch.from_numpy(v[None]) for k, v in sums.items()}, torch.from_numpy(n))  # fmt: skip


def test_95_percent_intervals_cover_the_known_value_at_the_binomial_rate():
    """200 draws of 256 windows: an honest 95% interval covers the truth in 190 of 200 on average;
    fewer than binom.ppf(0.001) or more than binom.isf(0.001) would happen by chance once in a
    thousand. (The percentile bootstrap under-covers with few windows: 92% at 16, measured.)"""
    draws, rng = 200, np.random.default_rng(0)
    covered = {"mean_dentropy_te": 0, "ln_mediated": 0}
    truth = {"mean_dentropy_te": 0.3, "ln_mediated": 0.6}
    for i in range(draws):
        columns = interval_columns(window_replicates(synthetic_effects(rng, 256), 1000, seed=i))
        for name in covered:
            covered[name] += int(columns[f"{name}_lo"][0] <= truth[name] <= columns[f"{name}_hi"][0])
    low, high = stats.binom.ppf(0.001, draws, 0.95), stats.binom.isf(0.001, draws, 0.95)
    for name, count in covered.items():
        assert low <= count <= high, (name, count, low, high)


def test_simulated_q8_0_noise_is_the_size_of_gguf_s_own_rounding_error():
    from gguf import GGMLQuantizationType, quants

    gen = np.random.default_rng(0)
    weight = gen.normal(size=(64, 320)) * np.exp(gen.uniform(-3, 2, size=(64, 1)))  # rows at many scales
    weight = weight.astype(np.float32)
    real = quants.dequantize(quants.quantize(weight, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0) - weight
    simulated = q8_0_noise(torch.from_numpy(weight), torch.Generator().manual_seed(0)).numpy()
    scale = np.abs(weight.reshape(64, 10, 32)).max(-1, keepdims=True) / 127  # [rows, blocks, 1]
    assert (np.abs(simulated.reshape(64, 10, 32)) <= scale / 2).all()
    assert (np.abs(real.reshape(64, 10, 32)) <= scale * 0.55).all()  # gguf stores the scale as float16
    rms = lambda x: np.sqrt((x.astype(np.float64) ** 2).mean(1))  # noqa: E731  per row
    assert rms(simulated.reshape(1, -1)) / rms(real.reshape(1, -1)) == pytest.approx(1, abs=0.02)
    np.testing.assert_allclose(rms(simulated) / rms(real), 1, atol=0.15)  # 320 entries a row
    partial = q8_0_noise(torch.ones(3, 40), torch.Generator().manual_seed(1))  # 32 + a partial block of 8
    assert partial.shape == (3, 40) and (partial.abs() <= 0.5 / 127).all()


def planted_W_U(bottom: float, d: int = 48, vocab: int = 3000, k: int = 4) -> torch.Tensor:
    """W_U [d, vocab] with singular values spread over [20, 40] except the last k, set to `bottom`."""
    gen = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(vocab, d, generator=gen, dtype=torch.float64))  # [vocab, d]
    S = torch.linspace(40, 20, d, dtype=torch.float64)
    S[-k:] = bottom
    return (U * S) @ V.T


@pytest.mark.parametrize("case", ["above", "far_below"])
def test_a_planted_null_space_is_told_apart_from_the_noise_floor(case):
    k, draws = 4, 3
    floor = null_space_under_noise(planted_W_U(1.0), None, k, draws).metrics["unembedding_noise/noise_floor"]
    bottom = (10 if case == "above" else 1e-3) * floor
    check = null_space_under_noise(planted_W_U(bottom), None, k, draws, seed=1)
    metrics, table = check.metrics, check.table
    assert table["in_null_space"].sum() == k and len(table) == 2 * k
    np.testing.assert_allclose(table["singular_value"][:k], bottom, rtol=1e-3)
    assert metrics["unembedding_noise/noise_norm"] > metrics["unembedding_noise/noise_floor"]
    assert metrics["unembedding_noise/null_overlap"] > 0.99  # the gap to the rest (20) dwarfs the noise
    if case == "above":  # real: the noise barely moves it
        assert metrics["unembedding_noise/s_min_over_floor"] == pytest.approx(10, rel=0.01)
        np.testing.assert_allclose(table["noisy_mean"][:k], bottom, rtol=0.02)
    else:  # a null space below the noise comes back at the noise floor
        assert metrics["unembedding_noise/s_min_over_floor"] == pytest.approx(1e-3, rel=0.01)
        np.testing.assert_allclose(table["noisy_mean"][:k] / floor, 1, atol=0.1)


def test_layernorm_s_exact_null_direction_is_set_aside_not_reported_as_below_the_noise():
    """Processed LayerNorm W_U is centred over d_model: all-ones is null in it and in any processed
    noise, so it is counted apart and s_min is the smallest singular value above it."""
    from intraneuron.models.weights import Norm

    d = 48
    gain = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    norm = Norm("layernorm", gain, torch.zeros(d, dtype=torch.float64), 1e-5)
    check = null_space_under_noise(planted_W_U(5.0), norm, k=4, draws=2)
    table, metrics = check.table, check.metrics
    assert metrics["unembedding_noise/exact_null"] == 1
    assert table["singular_value"].iloc[0] < 1e-6 * table["singular_value"].iloc[1]
    assert metrics["unembedding_noise/s_min"] == pytest.approx(table["singular_value"].iloc[1])
    assert metrics["unembedding_noise/s_min_over_floor"] > 1
