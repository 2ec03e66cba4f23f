"""Entropy-neuron weight statistics and token-frequency statistics (Stolfo et al. 2024) on planted
neurons in tiny models.

A tiny random W_U has a flat spectrum, so each model copy first gets a "dark" subspace: the
unembedding is shrunk along DARK random directions (orthogonal to all-ones, so that GPT-2's
centring keeps them), which gives W_U the sharp drop of its last singular values that GPT-2 small
shows. Models are loaded as their own copies: the session's shared tiny models stay as built.
The entropy tests plant in (and read) the last layer only; the frequency tests plant in layer 1.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from intraneuron.analyses.confidence.entropy_stats import (
    centred_random_level,
    default_k,
    entropy_neuron_table,
    logit_var,
    norm_vs_logitvar_figure,
    null_space_fraction,
    paper_k,
    random_level,
    spectrum_figure,
    unembedding_spectrum,
)
from intraneuron.analyses.confidence.frequency import (
    counts_from_file,
    counts_from_windows,
    frequency_direction,
    frequency_projection,
    kl_freq_model,
    unigram_distribution,
)
from intraneuron.errors import ConfigError
from intraneuron.models.loading import load_model
from intraneuron.models.weights import neuron_weights, unembedding
from tests.figure_checks import assert_closed_png_with_data

DARK, K = 3, 4  # GPT-2's processed W_U adds the all-ones null direction: 3 + 1 = k
ENTROPY_NEURON, LAST = 5, 2
OUT_PROJ = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}


def set_w_out(handle, layer: int, neuron: int, w: torch.Tensor) -> None:
    """Overwrite one neuron's raw output weights (GPT-2's Conv1D is [d_mlp, d_model], Linear is
    [d_model, d_mlp])."""
    proj = handle.module(f"{handle.adapter.layer_path(layer)}.{OUT_PROJ[handle.adapter.name]}")
    if type(proj).__name__ == "Conv1D":
        proj.weight[neuron] = w
    else:
        proj.weight[:, neuron] = w


def with_dark_subspace(directory, seed: int):
    """A fresh copy whose unembedding is shrunk 1000x along DARK directions Q [d_model, DARK]."""
    handle = load_model(str(directory))
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(handle.d_model, DARK, generator=generator)
    q, _ = torch.linalg.qr(q - q.mean(0))  # orthonormal and orthogonal to all-ones
    head = handle.model.get_output_embeddings().weight  # [vocab, d_model]; GPT-2: tied to W_E
    with torch.no_grad():
        head.copy_(head - 0.999 * (head @ q) @ q.T)
    return handle, q


@pytest.fixture(scope="module")
def planted(tiny_model_dirs):
    """arch -> (handle, Q): neuron ENTROPY_NEURON of the last layer writes only into the dark
    subspace, with twice the largest norm of its layer."""
    models = {}
    for seed, arch in enumerate(("gpt2", "llama")):
        handle, q = with_dark_subspace(tiny_model_dirs[arch], seed)
        norms = neuron_weights(handle, LAST, processed=False).w_out.norm(dim=1)
        coeffs = torch.randn(DARK, generator=torch.Generator().manual_seed(10 + seed))
        w = q @ coeffs
        with torch.no_grad():
            set_w_out(handle, LAST, ENTROPY_NEURON, w * (2 * norms.max() / w.norm()))
        models[arch] = (handle, q)
    return models


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_planted_null_space_neuron_tops_rho_and_has_low_logit_var(planted, arch):
    handle, _ = planted[arch]
    table = entropy_neuron_table(handle, LAST, k=K)
    assert len(table) == handle.d_mlp and list(table["neuron"]) == list(range(handle.d_mlp))
    row = table.loc[table["neuron"] == ENTROPY_NEURON].iloc[0]
    assert row["rho_rank"] == 1 and row["rho"] > 0.999
    assert row["logit_var"] == table["logit_var"].min()
    assert row["logit_var"] < 1e-3 * table["logit_var"].median()
    assert row["w_out_norm"] == table["w_out_norm"].max() and (table["k"] == K).all()
    others = table.loc[table["neuron"] != ENTROPY_NEURON, "rho"]
    assert others.max() < 0.9 and sorted(table["rho_rank"]) == list(range(1, handle.d_mlp + 1))
    if arch == "gpt2":  # the all-ones direction is one of U_k but centred w_out never reach it
        assert row["rho_random_level"] == pytest.approx(math.sqrt((K - 1) / (handle.d_model - 1)), rel=1e-4)
    else:
        assert row["rho_random_level"] == pytest.approx(random_level(K, handle.d_model))

    fig = norm_vs_logitvar_figure(table, LAST, top=3)
    assert_closed_png_with_data(fig, "norm_vs_logitvar", f"layer {LAST}")
    assert ENTROPY_NEURON in fig.intraneuron_data["highlighted"]


def test_spectrum_has_the_planted_drop_and_its_figure(planted):
    handle, q = planted["gpt2"]
    W_U = unembedding(handle).W_U
    U, S = unembedding_spectrum(W_U)
    assert U.shape == (handle.d_model, handle.d_model) and bool((S[:-1] >= S[1:]).all())
    assert S[-1] < 1e-4 * S[0]  # all-ones: exact null direction of processed LayerNorm W_U
    assert S[-K:-1].max() < 0.01 * S[-K - 1]  # the planted dark directions
    # U_k spans the dark directions plus all-ones
    ones = torch.full((handle.d_model, 1), handle.d_model**-0.5)
    basis = torch.cat([q, ones], dim=1)
    assert (U[:, -K:].T @ basis).norm() ** 2 == pytest.approx(K, rel=1e-4)
    fig = spectrum_figure(S, K, "tiny-gpt2: singular values of W_U")
    assert_closed_png_with_data(fig, "spectrum", "tiny-gpt2")
    assert fig.intraneuron_data["k"] == K and len(fig.intraneuron_data["singular_values"]) == handle.d_model


def test_null_space_fraction_and_logit_var_equal_direct_numpy(planted):
    handle, _ = planted["gpt2"]
    w_out, W_U = neuron_weights(handle, LAST).w_out, unembedding(handle).W_U
    U, _ = unembedding_spectrum(W_U)
    rho = null_space_fraction(w_out, U, K)
    chunked = logit_var(w_out, W_U, chunk_bytes=handle.d_mlp * 12 * 1000)  # 1000-token chunks
    torch.testing.assert_close(chunked, logit_var(w_out, W_U), rtol=1e-9, atol=1e-12)
    Uk, cols = U[:, -K:].double().numpy(), W_U.double().numpy()
    for i in (0, ENTROPY_NEURON, 17, handle.d_mlp - 1):
        w = w_out[i].double().numpy()
        assert float(rho[i]) == pytest.approx(np.linalg.norm(Uk.T @ w) / np.linalg.norm(w), rel=1e-4)
        cos = [w @ cols[:, v] / np.linalg.norm(w) / np.linalg.norm(cols[:, v]) for v in range(0, cols.shape[1], 7)]
        sampled = logit_var(w_out[i : i + 1], W_U[:, ::7])
        assert float(sampled[0]) == pytest.approx(np.var(cos), rel=1e-4)


def test_random_directions_sit_at_the_random_level(planted):
    generator = torch.Generator().manual_seed(3)
    handle, _ = planted["gpt2"]
    U, _ = unembedding_spectrum(unembedding(handle).W_U)
    d = handle.d_model
    w = torch.randn(20_000, d, generator=generator)
    rms = null_space_fraction(w, U, K).pow(2).mean().sqrt()
    assert float(rms) == pytest.approx(random_level(K, d), rel=0.02)
    centred = null_space_fraction(w - w.mean(1, keepdim=True), U, K).pow(2).mean().sqrt()
    assert float(centred) == pytest.approx(centred_random_level(U, K), rel=0.02)
    assert centred_random_level(U, K) == pytest.approx(math.sqrt((K - 1) / (d - 1)), rel=1e-4)
    # at GPT-2 small's size the mean itself is the paper's sqrt(k / d_model), to Jensen's ~2%
    big, _ = torch.linalg.qr(torch.randn(768, 768, generator=generator))
    mean = null_space_fraction(torch.randn(4000, 768, generator=generator), big, 12).mean()
    assert float(mean) == pytest.approx(random_level(12, 768), rel=0.03)


def test_k_defaults_and_checks():
    assert default_k(768) == 8 and default_k(4096) == 41 and default_k(32) == 2
    assert paper_k("gpt2", 768) == 12 and paper_k("meta-llama/Llama-2-7b-hf", 4096) == 40
    assert paper_k("/models/pythia-410m", 1024) == 10
    with pytest.raises(ConfigError):
        null_space_fraction(torch.ones(2, 4), torch.eye(4), 5)


def least_squares_w_out(W_U: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The w [d_model] whose logit effect W_U^T w is closest to u."""
    return torch.linalg.lstsq(W_U.T.double(), u.double()[:, None]).solution[:, 0].float()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_planted_frequency_neuron_projects_onto_the_frequency_direction(planted, arch):
    handle, _ = planted[arch]
    W_U, layer = unembedding(handle).W_U, 1  # (the entropy tests read only the last layer)
    # a unigram distribution the model can express: log P_freq = W_U^T a (+ const)
    a = torch.randn(handle.d_model, generator=torch.Generator().manual_seed(4))
    u = frequency_direction(torch.softmax((a @ W_U).double(), 0))
    # and one it cannot: Zipf-like counts of a corpus
    rng = np.random.default_rng(5)
    ids = np.minimum(rng.zipf(1.3, size=(64, 32)) - 1, W_U.shape[1] - 1)
    u_zipf = frequency_direction(unigram_distribution(counts_from_windows(ids, W_U.shape[1])))
    with torch.no_grad():
        set_w_out(handle, layer, 0, least_squares_w_out(W_U, u))
        set_w_out(handle, layer, 1, -3 * least_squares_w_out(W_U, u))
        set_w_out(handle, layer, 2, least_squares_w_out(W_U, u_zipf))
    w_out = neuron_weights(handle, layer).w_out
    cos = frequency_projection(w_out, W_U, u, chunk_bytes=handle.d_mlp * 12 * 5000)
    torch.testing.assert_close(cos, frequency_projection(w_out, W_U, u), rtol=1e-9, atol=1e-12)
    assert float(cos[0]) > 0.999 and float(cos[1]) < -0.999
    random = cos[3:]  # the model's random-init neurons
    # random directions in a d_model-dimensional logit space: cos about N(0, 1 / d_model)
    assert abs(float(random.mean())) < 0.1 and float(random.pow(2).mean().sqrt()) < 1.5 / math.sqrt(handle.d_model)
    # with a direction outside W_U's row space, least squares is still the best any neuron can do
    zipf = frequency_projection(w_out, W_U, u_zipf)
    logit = (w_out[2] @ W_U).double().numpy()
    direct = logit @ u_zipf.double().numpy() / np.linalg.norm(logit)
    assert float(zipf[2]) == pytest.approx(direct, rel=1e-5)
    assert float(zipf[2]) == float(zipf.max()) and float(zipf[3:].abs().max()) < float(zipf[2])


def test_unigram_distribution_and_frequency_direction():
    counts = counts_from_windows(np.array([[0, 1, 1], [3, 3, 3]]), vocab_size=6)
    assert counts.tolist() == [1, 2, 0, 3, 0, 0]
    p = unigram_distribution(counts)
    n, v = 6, 6
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(p[2]) == pytest.approx(1 / (n + v)) and float(p[3]) == pytest.approx(4 / (n + v))
    u = frequency_direction(p)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6) and abs(float(u.sum())) < 1e-6
    assert float(u[3]) > float(u[1]) > float(u[0]) > float(u[2]) == pytest.approx(float(u[5]))
    with pytest.raises(ValueError):
        counts_from_windows(np.array([[0, 6]]), vocab_size=6)


def test_counts_from_file_formats(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"0": 5, "4": 2}))
    assert counts_from_file(tmp_path / "c.json", 6).tolist() == [5, 0, 0, 0, 2, 0]
    np.save(tmp_path / "c.npy", np.array([1, 2, 3]))
    assert counts_from_file(tmp_path / "c.npy", 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        counts_from_file(tmp_path / "c.npy", 4)
    (tmp_path / "bad.json").write_text(json.dumps({"9": 1}))
    with pytest.raises(ValueError):
        counts_from_file(tmp_path / "bad.json", 6)
    with pytest.raises(ConfigError):
        counts_from_file(tmp_path / "c.pkl", 6)


def test_kl_freq_model_equals_torch_kl_div_and_is_non_negative():
    generator = torch.Generator().manual_seed(6)
    vocab = 1000
    log_p = torch.log_softmax(2 * torch.randn(vocab, generator=generator, dtype=torch.float64), 0)
    logits = 3 * torch.randn(10, vocab, generator=generator)
    logits[0] = log_p.float() + 7.0  # the model predicts P_freq exactly: KL = 0
    kl = kl_freq_model(logits, log_p, rows=3)
    model_logprobs = torch.log_softmax(logits, dim=-1)
    expected = torch.nn.functional.kl_div(model_logprobs, log_p.float(), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)
    assert kl.shape == (10,) and bool((kl >= -1e-6).all()) and abs(float(kl[0])) < 1e-4
    assert float(kl[1:].min()) > 0.1
