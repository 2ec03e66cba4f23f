"""Token-frequency statistics of Stolfo et al. 2024 (paper_methods.md section 3.4).

Token-frequency neurons move the output distribution toward or away from the unigram distribution
P_freq, by adding to each token's logit an amount proportional to its log frequency.

    counts_from_windows / counts_from_file -> counts [vocab]      unigram_distribution -> P_freq
    frequency_direction(P_freq)            -> u [vocab], the log-frequency direction in logit space
    frequency_projection(w_out, W_U, u)    -> cos(W_U^T w_out, u) per neuron (the direct check the
                                              paper's wording implies; proposed, not in its code)
    kl_freq_model(logits, log P_freq)      -> KL(P_freq || P_model) per position (nats)

The paper counts tokens in the model's training corpus; counts from the analysis corpus (or a
supplied count file) are a proxy for them, and results should say which was used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from intraneuron.errors import ConfigError

COUNT_FORMATS = (".json", ".npy")


def counts_from_windows(ids, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id in ids [W, T] (any shape) -> int64 [vocab_size]."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, got {flat.min()}..{flat.max()}")
    return np.bincount(flat, minlength=vocab_size)


def counts_from_file(path: str | Path, vocab_size: int) -> np.ndarray:
    """Token counts supplied as a file -> int64 [vocab_size]. Two formats (no pickle):

    .json  {"token_id": count, ...}: ids absent from the file count 0
    .npy   one vector of length vocab_size (np.save(path, counts)), loaded with allow_pickle=False
    """
    path = Path(path)
    if path.suffix == ".json":
        counts = np.zeros(vocab_size, dtype=np.int64)
        for key, value in json.loads(path.read_text()).items():
            token = int(key)
            if not 0 <= token < vocab_size:
                raise ValueError(f"{path}: token id {token} outside 0..{vocab_size - 1}")
            counts[token] = int(value)
    elif path.suffix == ".npy":
        loaded = np.load(path, allow_pickle=False)
        if loaded.shape != (vocab_size,):
            raise ValueError(f"{path}: expected a count vector of shape ({vocab_size},), got {loaded.shape}")
        counts = loaded.astype(np.int64)
    else:
        raise ConfigError("analysis.counts_file", str(path), f"a file ending in one of {COUNT_FORMATS}")
    if (counts < 0).any():
        raise ValueError(f"{path}: token counts must be non-negative")
    return counts


def unigram_distribution(counts) -> torch.Tensor:
    """P_freq [vocab] float64 = (count + 1) / (N + V): add-one smoothing, as the paper, so every
    token has a finite log-probability (an unseen token gets 1 / (N + V))."""
    smoothed = torch.as_tensor(np.asarray(counts), dtype=torch.float64) + 1.0
    return smoothed / smoothed.sum()


def frequency_direction(P_freq: torch.Tensor) -> torch.Tensor:
    """u [vocab] float32: log P_freq minus its mean, unit norm. Logits are defined up to a constant
    (softmax ignores it), so the mean carries nothing and is removed."""
    log_p = torch.as_tensor(P_freq, dtype=torch.float64).log()
    u = log_p - log_p.mean()
    return (u / u.norm()).float()


def frequency_projection(
    w_out: torch.Tensor, W_U: torch.Tensor, u: torch.Tensor, *, chunk_bytes: int = 1 << 27
) -> torch.Tensor:
    """cos(W_U^T w_out[i], u) [m] float64: how well each neuron's direct logit effect follows the
    log-frequency direction (+1: boosts frequent tokens in proportion, -1: suppresses them).

    w_out [m, d_model], W_U [d_model, vocab], u [vocab]. Formed in vocabulary chunks of at most
    `chunk_bytes` and reduced to running sums. A neuron with no logit effect: NaN.
    """
    W = w_out.float()  # [m, d_model]
    u = torch.as_tensor(u).double()
    m, n_vocab = W.shape[0], W_U.shape[1]
    chunk = max(1, chunk_bytes // (max(m, 1) * 12))  # float32 product + its float64 copy
    dot = torch.zeros(m, dtype=torch.float64)
    squares = torch.zeros(m, dtype=torch.float64)
    for start in range(0, n_vocab, chunk):
        logits = (W @ W_U[:, start : start + chunk].float()).double()  # [m, chunk]
        dot += logits @ u[start : start + chunk]
        squares += logits.pow(2).sum(1)
    return dot / (squares.sqrt() * u.norm())


def kl_freq_model(logits: torch.Tensor, log_p_freq: torch.Tensor, *, rows: int = 256) -> torch.Tensor:
    """KL(P_freq || P_model) [N] in nats for logits [N, vocab]: sum_v P_freq (log P_freq - log P_model).

    The paper's `torch.kl_div(model_logprobs, log P_freq, log_target=True)` summed over the
    vocabulary. float32 log-softmax, `rows` positions at a time (bounded extra memory).
    """
    log_p = torch.as_tensor(log_p_freq).float().to(logits.device)  # [vocab]
    p = log_p.exp()
    parts = []
    for start in range(0, logits.shape[0], rows):
        model = torch.log_softmax(logits[start : start + rows].float(), dim=-1)  # [rows, vocab]
        parts.append((p * (log_p - model)).sum(-1))
    return torch.cat(parts) if parts else torch.zeros(0, device=logits.device)
