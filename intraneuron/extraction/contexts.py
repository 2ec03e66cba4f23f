"""A few neurons' activation at every position of a few windows: the per-token shading of a card.

The streaming pass keeps only each neuron's top-k (position, value) pairs, never whole windows of
activations; a card that shades every token around a top occurrence re-runs the model on just the
windows it shows (a handful per neuron, so a fraction of a second), with the same hooks and early
exit as the extraction pass.
"""

from __future__ import annotations

import numpy as np
import torch

from intraneuron.extraction.hooks import capture_sites, run_until_captured


def window_activations(
    handle, ids: np.ndarray, layer: int, site: str, neurons: np.ndarray, *, device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:  # fmt: skip
    """[n_windows, window_len, m] activations of `neurons` [m] at `blocks.<layer>.<site>` over
    the windows `ids` [n_windows, window_len] (token ids), in float32.

    handle: a models.ModelHandle; site: extraction.site (e.g. "mlp.hook_post").
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [n_windows, window_len], got shape {ids.shape}")
    index = torch.as_tensor(np.asarray(neurons, dtype=np.int64))
    hook_site = handle.site(f"blocks.{layer}.{site}")
    out = np.empty((ids.shape[0], ids.shape[1], index.numel()), dtype=np.float32)
    with torch.inference_mode(), capture_sites(handle.module, [hook_site]) as captured:
        for start in range(0, ids.shape[0], batch_size):
            batch = torch.from_numpy(ids[start : start + batch_size]).to(device)  # [B, T]
            run_until_captured(handle.model, batch, captured)
            acts = captured[hook_site.name][..., index.to(device)]  # [B, T, m]
            out[start : start + batch.shape[0]] = acts.float().cpu().numpy()
    return out
