"""The tokens a neuron's output promotes and suppresses: its direct effect on the logits.

One unit of a neuron's activation adds its w_out row to the residual stream. Read straight through
the final norm and the unembedding (the direct path: no later layer), that moves the logits by
w_out @ W_U, with both weights processed as TransformerLens processes them (models/weights.py):
the final norm's gain folded into W_U and, for LayerNorm models, w_out and W_U centred over d_model
as the norm's own centring would; W_U is also centred over the vocabulary, so a value is the logit
change relative to the mean token. The norm's scale (1 / rms of the residual) is the same for every
token, so it changes how large the values are, not which tokens come first. These are the "logit
effects" a Neuronpedia or SAEDashboard page shows.

A model without an unembedding (encoders) or whose MLP output is normalised again before the
residual (Gemma 2, OLMo 2: the direct path is not linear) gets none, and the card says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LogitTokens:
    """A neuron's strongest direct logit effects per unit of activation."""

    promoted: list[tuple[str, float]]  # (token text, logit change), largest first
    suppressed: list[tuple[str, float]]  # most negative first


def output_logits(handle, layer: int, neurons: list[int]) -> torch.Tensor:
    """[m, vocab] direct logit effect of one unit of each of `neurons` (processed weights).
    Raises ValueError or ConfigError where the model has no processed direct path."""
    from intraneuron.models.weights import neuron_weights, unembedding

    w_out = neuron_weights(handle, layer, processed=True).w_out[neurons]  # [m, d_model]
    return w_out @ unembedding(handle, processed=True).W_U  # [m, vocab]


def logit_tokens(handle, layer: int, neurons: list[int], token_texts: list[str],
                 k: int) -> tuple[dict[int, LogitTokens], str]:  # fmt: skip
    """Each neuron's `k` most promoted and `k` most suppressed tokens, or ({}, why there are none)."""
    from intraneuron.models.weights import weight_layout

    if not neurons or k == 0:
        return {}, ""
    layout = weight_layout(handle)
    if layout.final_norm is None or not layout.processable:
        why = "no unembedding" if layout.final_norm is None else "its MLP output is normalised again"
        return {}, f"no direct path to the logits ({handle.config.model_type}: {why})"
    logits = output_logits(handle, layer, neurons).numpy()  # [m, vocab]
    out = {}
    for row, neuron in zip(logits, neurons, strict=True):
        # stable sorts: equal logits keep the lower token id first, whatever the platform
        top, bottom = np.argsort(-row, kind="stable")[:k], np.argsort(row, kind="stable")[:k]
        out[neuron] = LogitTokens(
            promoted=[(token_texts[t], float(row[t])) for t in top],
            suppressed=[(token_texts[t], float(row[t])) for t in bottom],
        )
    return out, ""
