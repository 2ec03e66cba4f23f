"""The geometry control: a neuron's own read-in directions, removed from its core tokens' vectors.

A neuron that reads direction w ranks tokens by x . w, so its top tokens share a large component
along w and look mutually similar with no categories at all (60 synthetic GELU neurons on isotropic
vectors: 92% had a "homogeneous" top segment; with w projected out, none). Two controls answer it:
this projection (each neuron's statistics on vectors with its read-in directions removed) and the
pseudo-neurons of `extraction.pseudo`, random read-in directions through the same nonlinearity and
the same pipeline, whose rows are each layer's empirical null.

The directions are those the MLP reads from the residual stream, in the residual stream's own
coordinates: the input weight row with the pre-MLP norm's gain folded in and, for LayerNorm, centred
over d_model (the norm removes each position's mean, so the all-ones component is never read).
That is `models.weights.neuron_weights(processed=True)`: w_in for GPT-2 / NeoX, gate and up rows for
gated MLPs (both reach the activation), the raw row for BERT, whose MLP reads the normalised stream.
"""

from __future__ import annotations

import numpy as np

from intraneuron.models.weights import neuron_weights


def read_in_directions(handle, layer: int) -> np.ndarray:
    """[d_mlp, r, d_model] float32: each neuron's r read-in directions (r = 1, or 2 for gated MLPs)."""
    try:
        weights = neuron_weights(handle, layer, processed=True)
    except ValueError:  # no pre-MLP norm to fold (BERT): the raw rows read the normalised stream
        weights = neuron_weights(handle, layer, processed=False)
    rows = [weights.w_gate, weights.w_up] if weights.gated else [weights.w_in]
    return np.stack([w.numpy() for w in rows], axis=1).astype(np.float32)


def project_out(X: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """X [n, d] with the span of directions [r, d] removed: X - X Q Q^T for an orthonormal basis Q."""
    directions = np.asarray(directions, dtype=np.float64).reshape(-1, X.shape[1])
    directions = directions[np.linalg.norm(directions, axis=1) > 0]
    if directions.size == 0:
        return np.asarray(X)
    basis, _ = np.linalg.qr(directions.T)  # [d, r]
    X64 = np.asarray(X, dtype=np.float64)
    return (X64 - (X64 @ basis) @ basis.T).astype(X.dtype, copy=False)
