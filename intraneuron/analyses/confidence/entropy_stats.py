"""Entropy-neuron weight statistics of Stolfo et al. 2024 (paper_methods.md section 3.2).

Entropy neurons write into directions the unembedding almost ignores: a large ||w_out|| that moves
the final norm's scale (and so the entropy of every prediction) while barely changing the ranking
of tokens. Three weight statistics find them, on TL-processed weights by default (the paper's):

    w_out_norm   ||w_out||
    logit_var    Var over the vocabulary of cos(w_out, W_U[:, v])   (low for entropy neurons)
    rho          ||U_k^T w_out|| / ||w_out||: the share of w_out in the span of the k left singular
                 vectors of W_U with the smallest singular values (the "null space"; high for them)

k: the paper uses 12 for GPT-2 small (d_model 768) and 40 for LLaMA-2 7B (d_model 4096); for other
models it proposes about 1% of d_model (`default_k`, which gives 8 and 41 for those two, hence
`PAPER_K` for them). Processed LayerNorm models: W_U is centred over d_model, so the all-ones
direction is an exact null direction and always one of the last k columns, while every w_out is
centred and never reaches it; there rho uses k - 1 effective directions (k = 1 gives rho = 0 for
every neuron), and the table's random level says so (`centred_random_level`).
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd
import torch

from intraneuron.errors import ConfigError
from intraneuron.models.weights import NeuronWeights, neuron_weights, unembedding

# k used by the paper's code, by model name (the hub name's last part, lower case)
PAPER_K = {"gpt2": 12, "llama-2-7b-hf": 40, "llama-2-7b": 40}
TOP_N = 10  # the paper's candidate list: the top-10 neurons by rho


def unembedding_spectrum(W_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of W_U [d_model, vocab] -> U [d_model, d_model] (left singular vectors, as columns),
    S [d_model], singular values descending."""
    U, S, _ = torch.linalg.svd(W_U.float(), full_matrices=False)
    return U, S


def default_k(d_model: int) -> int:
    """About 1% of the residual width (the paper's proposal for models it gives no k for), and at
    least 2: in a processed LayerNorm model the last direction is always the all-ones null
    direction no w_out can reach, so k = 1 would make rho 0 for every neuron."""
    return max(2, round(0.01 * d_model))


def paper_k(model_id: str, d_model: int) -> int:
    """The paper's k for GPT-2 small / LLaMA-2 7B, `default_k` for any other model."""
    return PAPER_K.get(PurePath(str(model_id)).name.lower(), default_k(d_model))


def null_space_fraction(w_out: torch.Tensor, U: torch.Tensor, k: int) -> torch.Tensor:
    """rho [m] of each row of w_out [m, d_model]; U from `unembedding_spectrum`. A zero row: NaN."""
    _check_k(k, U.shape[0])
    w = w_out.float()
    return (w @ U[:, -k:].float()).norm(dim=1) / w.norm(dim=1)  # [m]


def random_level(k: int, d_model: int) -> float:
    """rho of a direction drawn uniformly from R^d_model, as the root of E[rho^2] = k / d_model.

    The mean of rho is a little lower (Jensen): by a factor of about 1 - (1 - k/d) / (4k), e.g.
    2% for k = 12 in GPT-2 small.
    """
    return math.sqrt(k / d_model)


def centred_random_level(U: torch.Tensor, k: int) -> float:
    """`random_level` for directions drawn from the centred space (orthogonal to all-ones), where
    processed LayerNorm w_out live: sqrt((k - ||U_k^T 1/sqrt(d)||^2) / (d - 1)).

    For processed LayerNorm W_U the all-ones direction is one of U_k, so this is about
    sqrt((k - 1) / (d - 1)): 0.120 instead of 0.125 for GPT-2 small.
    """
    _check_k(k, U.shape[0])
    d = U.shape[0]
    ones = torch.full((d,), d**-0.5, dtype=torch.float64)
    reach = (ones @ U[:, -k:].double()).pow(2).sum().item()  # in [0, 1]
    return math.sqrt(max(k - reach, 0.0) / (d - 1))


def logit_var(w_out: torch.Tensor, W_U: torch.Tensor, *, chunk_bytes: int = 1 << 27) -> torch.Tensor:
    """LogitVar [m] float64: variance (ddof 0) over the vocabulary of cos(w_out[i], W_U[:, v]).

    w_out [m, d_model], W_U [d_model, vocab]. The [m, vocab] cosines are formed in vocabulary
    chunks of at most `chunk_bytes` and reduced to running sums, so memory stays bounded for 50k
    vocabularies and thousands of neurons. A zero W_U column counts as cosine 0; a zero w_out: NaN.
    """
    W = w_out.float()
    W = W / W.norm(dim=1, keepdim=True)  # [m, d_model]
    m, n_vocab = W.shape[0], W_U.shape[1]
    chunk = max(1, chunk_bytes // (max(m, 1) * 12))  # float32 product + its float64 copy
    total = torch.zeros(m, dtype=torch.float64)
    squares = torch.zeros(m, dtype=torch.float64)
    for start in range(0, n_vocab, chunk):
        cols = W_U[:, start : start + chunk].float()  # [d_model, chunk]
        cols = cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-30)
        cos = (W @ cols).double()  # [m, chunk]
        total += cos.sum(1)
        squares += cos.pow(2).sum(1)
    mean = total / n_vocab
    return (squares / n_vocab - mean.pow(2)).clamp_min(0.0)  # float64 sums: no cancellation issue


def entropy_neuron_table(
    handle: Any, layer: int, k: int | None = None, processed: bool = True, *, chunk_bytes: int = 1 << 27
) -> pd.DataFrame:
    """One row per neuron of `layer`: layer, neuron, w_out_norm, logit_var, rho, rho_random_level,
    rho_rank (1 = highest rho), k. k=None: `paper_k` of the model."""
    unembed = unembedding(handle, processed)
    U, _ = unembedding_spectrum(unembed.W_U)
    k = paper_k(handle.model_id, U.shape[0]) if k is None else k
    return entropy_table(neuron_weights(handle, layer, processed), unembed.W_U, U, k, chunk_bytes=chunk_bytes)


def entropy_table(
    weights: NeuronWeights, W_U: torch.Tensor, U: torch.Tensor, k: int, *, chunk_bytes: int = 1 << 27
) -> pd.DataFrame:
    """`entropy_neuron_table` from weights and a spectrum already computed (one SVD for many layers)."""
    w_out = weights.w_out.float()  # [d_mlp, d_model]
    rho = null_space_fraction(w_out, U, k).numpy()
    centred = "centre w_out over d_model" in weights.steps  # then w_out never reaches all-ones
    level = centred_random_level(U, k) if centred else random_level(k, U.shape[0])
    table = pd.DataFrame({
        "layer": weights.layer,
        "neuron": np.arange(w_out.shape[0]),
        "w_out_norm": w_out.norm(dim=1).numpy(),
        "logit_var": logit_var(w_out, W_U, chunk_bytes=chunk_bytes).numpy(),
        "rho": rho,
        "rho_random_level": level,
    })  # fmt: skip
    rank = table["rho"].rank(ascending=False, method="first", na_option="bottom")
    table["rho_rank"] = rank.astype(int)
    table["k"] = k
    return table


def spectrum_figure(S: torch.Tensor, k: int, title: str, noise_floor: float | None = None):
    """Singular values of W_U on a log axis, the last k (the null space rho measures) marked, so
    the elbow the paper's k should sit on is visible; with `noise_floor`, the size simulated
    de-quantisation noise gives an exact null direction (quantisation.py)."""
    plt = _pyplot()
    s = np.asarray(S, dtype=np.float64)  # [d_model] descending
    d = s.size
    _check_k(k, d)
    # an exact zero (LayerNorm's all-ones direction) would vanish from a log axis: show it at a floor
    floor = s[0] * 1e-9 if s[0] > 0 else 1e-30
    shown, index = np.maximum(s, floor), np.arange(d)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    ax.semilogy(index[: d - k], shown[: d - k], ".", ms=3, color="tab:blue", label="singular values")
    ax.semilogy(index[d - k :], shown[d - k :], "o", ms=4, color="tab:red", label=f"last k = {k} (null space)")
    ax.axvline(d - k - 0.5, color="tab:red", ls="--", lw=1)
    if noise_floor is not None:
        ax.axhline(noise_floor, color="0.3", ls=":", lw=1, label=f"Q8_0 noise floor ({noise_floor:.3g})")
    ax.set(xlabel="index (descending order)", ylabel="singular value of W_U")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.intraneuron_data = {"singular_values": s, "k": k, "noise_floor": noise_floor}
    plt.close(fig)
    return fig


def norm_vs_logitvar_figure(table: pd.DataFrame, layer: int, top: int = TOP_N):
    """||w_out|| against LogitVar (log axis), the top-`top` neurons by rho highlighted and named:
    entropy neurons sit high and to the left (paper Fig. 2a)."""
    plt = _pyplot()
    x, y = table["logit_var"].to_numpy(float), table["w_out_norm"].to_numpy(float)
    top_mask = table["rho_rank"].to_numpy(int) <= top
    neurons = table["neuron"].to_numpy(int)
    k = int(table["k"].iloc[0]) if len(table) else 0
    fig, ax = plt.subplots(figsize=(5.5, 4.2), layout="constrained")
    ax.scatter(x[~top_mask], y[~top_mask], s=5, color="0.6", label=f"other ({(~top_mask).sum()})")
    ax.scatter(x[top_mask], y[top_mask], s=14, color="tab:red", label=f"top {top_mask.sum()} by rho (k = {k})")
    for xi, yi, n in zip(x[top_mask], y[top_mask], neurons[top_mask], strict=True):
        ax.annotate(f"{layer}.{n}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="LogitVar: variance over the vocabulary of cos(w_out, W_U[:, v])", ylabel="||w_out||")
    ax.legend(fontsize=8)
    fig.suptitle(f"layer {layer}: entropy-neuron candidates (high norm, low LogitVar)")
    fig.intraneuron_data = {"neuron": neurons, "logit_var": x, "w_out_norm": y,
                            "rho": table["rho"].to_numpy(float), "highlighted": neurons[top_mask], "k": k}  # fmt: skip
    plt.close(fig)
    return fig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _check_k(k: int, d_model: int) -> None:
    if not 1 <= int(k) <= d_model:
        raise ConfigError("analysis.k", k, f"an integer in 1..{d_model} (d_model)")
