"""Per-neuron weight statistics of Gurnee et al. 2024 ("Universal Neurons"), section 2.3 / 2.5a.

One row per neuron of a layer, from TL-processed weights by default (`intraneuron.models.weights`):

    w_in_norm    ||w_in||            w_out_norm   ||w_out||          input_bias   b_in
    in_out_sim   cos(w_in, w_out)    l2_penalty   ||w_in||^2 + ||w_out||^2
    vocab_mean, vocab_var, vocab_skew, vocab_kurt
                 moments over the vocabulary of c_v = cos(w_out, W_U[:, v]): population moments
                 (variance with ddof 0, raw kurtosis: Gaussian = 3), as in the paper's code
    prediction   vocab_kurt > 10 and vocab_skew > 0   (boosts a small set of tokens)
    suppression  vocab_kurt > 10 and vocab_skew < 0   (suppresses a small set of tokens)
    partition    vocab_var > 0.005                    (splits the vocabulary in two)

Gated MLPs: w_in is the gate (see `NeuronWeights`). The [d_mlp, vocab] cosine matrix is computed in
neuron chunks of at most `chunk_bytes`, so memory stays bounded for 50k-token vocabularies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from intraneuron.models.weights import NeuronWeights, Unembedding, neuron_weights, unembedding

COLUMNS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty",
           "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")  # fmt: skip


def neuron_weight_table(
    handle: Any,
    layer: int,
    processed: bool = True,
    *,
    prediction_kurt: float = 10.0,
    partition_var: float = 0.005,
    chunk_bytes: int = 1 << 28,
) -> pd.DataFrame:
    """The weight statistics and family labels of every neuron in `layer`."""
    return weight_table(
        neuron_weights(handle, layer, processed), unembedding(handle, processed),
        prediction_kurt=prediction_kurt, partition_var=partition_var, chunk_bytes=chunk_bytes,
    )  # fmt: skip


def weight_table(
    weights: NeuronWeights,
    unembed: Unembedding,
    *,
    prediction_kurt: float = 10.0,
    partition_var: float = 0.005,
    chunk_bytes: int = 1 << 28,
) -> pd.DataFrame:
    """`neuron_weight_table` from weights already read (planted weights in tests)."""
    w_in, w_out = weights.w_in.float(), weights.w_out.float()
    in_norm, out_norm = w_in.norm(dim=1), w_out.norm(dim=1)
    moments = vocab_moments(w_out, unembed.W_U, chunk_bytes=chunk_bytes)
    table = pd.DataFrame({
        "layer": weights.layer,
        "neuron": np.arange(w_in.shape[0]),
        "w_in_norm": in_norm.numpy(),
        "w_out_norm": out_norm.numpy(),
        "input_bias": weights.b_in.float().numpy(),
        "in_out_sim": ((w_in * w_out).sum(1) / (in_norm * out_norm)).numpy(),
        "l2_penalty": (in_norm.pow(2) + out_norm.pow(2)).numpy(),
        **moments,
    })  # fmt: skip
    return pd.concat([table, family_labels(table, prediction_kurt, partition_var)], axis=1)


def family_labels(
    table: pd.DataFrame, prediction_kurt: float = 10.0, partition_var: float = 0.005
) -> pd.DataFrame:
    """Prediction / suppression / partition booleans from the vocab moments (paper 2.5a)."""
    peaked = table["vocab_kurt"] > prediction_kurt
    return pd.DataFrame({
        "prediction": peaked & (table["vocab_skew"] > 0),
        "suppression": peaked & (table["vocab_skew"] < 0),
        "partition": table["vocab_var"] > partition_var,
    })  # fmt: skip


def vocab_moments(
    w_out: torch.Tensor, W_U: torch.Tensor, *, chunk_bytes: int = 1 << 28
) -> dict[str, np.ndarray]:
    """Mean, variance, skew and raw kurtosis over the vocabulary of cos(w_out[i], W_U[:, v]).

    w_out [d_mlp, d_model], W_U [d_model, vocab]. A zero w_out gives NaN moments beyond the mean.
    """
    U = W_U.float()
    U = U / U.norm(dim=0, keepdim=True)
    W = w_out.float()
    W = W / W.norm(dim=1, keepdim=True)
    n_vocab = U.shape[1]
    chunk = max(1, chunk_bytes // (n_vocab * 32))  # float32 product + float64 copies per entry
    parts: list[torch.Tensor] = []
    for start in range(0, W.shape[0], chunk):
        cos = (W[start:start + chunk] @ U).double()  # [chunk, vocab]
        mean = cos.mean(1)
        diff = cos - mean[:, None]
        m2 = diff.pow(2).mean(1)
        m3 = diff.pow(3).mean(1)
        m4 = diff.pow(4).mean(1)
        parts.append(torch.stack([mean, m2, m3 / m2.pow(1.5), m4 / m2.pow(2)], dim=1))
    stats = torch.cat(parts).numpy() if parts else np.zeros((0, 4))
    return {name: stats[:, i] for i, name in enumerate(("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"))}
