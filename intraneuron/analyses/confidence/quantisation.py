"""Is W_U's null space above the de-quantisation noise?

Entropy neurons are found by the share of w_out in the span of W_U's k smallest singular
directions. A model stored quantised (the packaged SmolLM2's embedding, tied to W_U, is Q8_0) is
de-quantised with a rounding error per weight; an exact null direction of the original W_U would
come back with a singular value of about the noise's own size, and directions whose singular
values are at that size are set by the noise, not by training. So the check perturbs W_U with
simulated Q8_0 rounding error and compares:

    Q8_0: per block of 32 consecutive weights of one token's vector, scale d = max|w| / 127,
          weights stored as round(w / d) * d, so the error is uniform in [-d/2, d/2] (0 for the
          block's largest weight; gguf keeps d as float16, which moves the error by < 7% of d).

    q8_0_noise(weight, generator)                     -> the simulated error, shaped as `weight`
    null_space_under_noise(W_U_raw, norm, k, draws)   -> NoiseCheck: bottom singular values clean /
                                                         noisy, the noise floor, the null space's overlap

noise floor = ||E||_F / sqrt(d_model) for the processed noise E [d_model, vocab]: the RMS singular
value of E, the size an exact null direction of W_U takes in W_U + E. noise norm = ||E||_2, the
most any singular value can move (Weyl). null overlap = ||U_k^T U'_k||_F^2 / k: 1 when the noisy
W_U's last k directions span the clean ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from intraneuron.models.weights import Norm, processed_W_U

Q8_0_BLOCK = 32
Q8_0_LEVELS = 127


def q8_0_noise(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Simulated Q8_0 rounding error of `weight` [rows, cols], in blocks of 32 consecutive entries
    of a row (GGUF's layout of a [vocab, d_model] embedding: each token's vector in blocks; a last
    partial block is its own block). float32, the shape of `weight`."""
    rows, cols = weight.shape
    n_blocks = -(-cols // Q8_0_BLOCK)
    padded = torch.zeros(rows, n_blocks * Q8_0_BLOCK, dtype=torch.float32)
    padded[:, :cols] = weight.float()
    blocks = padded.view(rows, n_blocks, Q8_0_BLOCK)
    peak = blocks.abs().amax(-1, keepdim=True)  # [rows, n_blocks, 1]
    uniform = torch.rand(blocks.shape, generator=generator) - 0.5  # [rows, n_blocks, 32] in [-1/2, 1/2)
    error = uniform * (peak / Q8_0_LEVELS)
    error[blocks.abs() == peak] = 0.0  # the block's largest weight is stored exactly (as +-127 d)
    return error.view(rows, -1)[:, :cols]


@dataclass(frozen=True)
class NoiseCheck:
    table: pd.DataFrame  # per bottom singular value: from_bottom (1 = smallest), clean, noisy mean/min/max
    metrics: dict[str, float]  # unembedding_noise/<name>


def null_space_under_noise(W_U_raw: torch.Tensor, norm: Norm | None, k: int, draws: int, seed: int = 0,
                           n_bottom: int | None = None) -> NoiseCheck:  # fmt: skip
    """W_U_raw [d_model, vocab] as stored (blocks run along d_model, one token per column);
    `norm`: process W_U and the noise as the analysis does (`processed_W_U`), None for raw.
    Compares the `n_bottom` (default 2k) smallest singular values of W_U with those of W_U + E over
    `draws` seeded draws of the Q8_0 error E. Directions exactly null with the noise too (below
    1e-6 of the largest singular value in every draw: processed LayerNorm models' all-ones, which
    the processing removes from any noise) are counted (`exact_null`), and the metrics' s_min is
    the smallest singular value above them."""
    d = W_U_raw.shape[0]
    n_bottom = min(d, n_bottom or 2 * k)
    process = (lambda w: w) if norm is None else (lambda w: processed_W_U(w, norm))  # noqa: E731
    clean = process(W_U_raw.float())
    U, S = _spectrum(clean)
    generator = torch.Generator().manual_seed(seed)
    noisy, overlap, floor, spectral = [], [], [], []
    for _ in range(draws):
        E = process(q8_0_noise(W_U_raw.T, generator).T)  # [d_model, vocab]
        U_e, S_e = _spectrum(clean + E)
        noisy.append(S_e[-n_bottom:].numpy())
        overlap.append(float((U[:, -k:].T @ U_e[:, -k:]).pow(2).sum()) / k)
        floor.append(float(E.norm()) / d**0.5)
        spectral.append(float(torch.linalg.eigvalsh(E @ E.T)[-1].clamp_min(0).sqrt()))  # ||E||_2
    bottom = S[-n_bottom:].numpy()[::-1]  # smallest first
    noisy_m = np.array(noisy)[:, ::-1]  # [draws, n_bottom], smallest first
    table = pd.DataFrame({
        "from_bottom": np.arange(1, n_bottom + 1), "singular_value": bottom,
        "noisy_mean": noisy_m.mean(0), "noisy_min": noisy_m.min(0), "noisy_max": noisy_m.max(0),
        "in_null_space": np.arange(1, n_bottom + 1) <= k,
    })  # fmt: skip
    exact = int((noisy_m < 1e-6 * float(S[0])).all(0).sum())
    first = min(exact, n_bottom - 1)
    metrics = {
        "unembedding_noise/s_min": float(bottom[first]),
        "unembedding_noise/s_min_noisy": float(noisy_m[:, first].mean()),
        "unembedding_noise/s_k": float(bottom[k - 1]),
        "unembedding_noise/s_k_noisy": float(noisy_m[:, k - 1].mean()),
        "unembedding_noise/noise_floor": float(np.mean(floor)),
        "unembedding_noise/noise_norm": float(np.mean(spectral)),
        "unembedding_noise/s_min_over_floor": float(bottom[first] / np.mean(floor)),
        "unembedding_noise/null_overlap": float(np.mean(overlap)),
        "unembedding_noise/exact_null": float(exact),
        "unembedding_noise/draws": float(draws),
    }
    return NoiseCheck(table, metrics)


def _spectrum(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors [d, d] (as columns) and singular values [d], descending, of W [d, vocab],
    from the float64 Gram matrix: 7x faster than an SVD of a 576 x 49k matrix, and exact enough
    for the bottom of a spectrum whose condition number is far below 1e8."""
    W = W.double()
    values, vectors = torch.linalg.eigh(W @ W.T)  # ascending
    return vectors.flip(1).float(), values.flip(0).clamp_min(0).sqrt().float()
