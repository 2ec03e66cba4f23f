"""ActivationProfile: everything one extraction pass learned about one layer's neurons."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ActivationProfile:
    """Per-neuron statistics of one layer over one corpus.

    T = token types seen in the corpus, D = neurons (d_mlp), M = model width (d_model),
    K = top-k occurrences kept, B = histogram bins (+2 for under/overflow).
    """

    layer: int
    site: str  # e.g. "blocks.3.mlp.hook_post"
    input_site: str | None  # e.g. "blocks.3.hook_resid_pre", or None when not extracted
    window_len: int
    n_tokens: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    # Present by stat spec (see extraction/stats.py):
    # type_ids [T], type_count [T], type_mean [T, D], type_max [T, D],
    # resid_ids [T'], resid_count [T'], resid_mean [T', M] (same types as type_* when both are there),
    # topk_values [D, K] (descending), topk_positions [D, K] (global position = window * window_len + pos),
    # topk_token_ids [D, K], act_* [D] moments, hist_edges [B + 1], hist_counts [D, B + 2]

    @property
    def d_mlp(self) -> int:
        return self.tensors["topk_values"].shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def numpy(self, name: str) -> np.ndarray:
        return self.tensors[name].numpy()

    def topk_window_and_pos(self) -> tuple[np.ndarray, np.ndarray]:
        """[D, K] window index and position within the window of each top-k occurrence."""
        positions = self.numpy("topk_positions")
        return positions // self.window_len, positions % self.window_len

    def metadata(self) -> dict:
        return {
            "layer": self.layer,
            "site": self.site,
            "input_site": self.input_site,
            "window_len": self.window_len,
            "n_tokens": self.n_tokens,
        }
