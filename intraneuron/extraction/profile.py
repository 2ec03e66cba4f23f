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
    # topk_token_ids [D, K], act_* [D] moments, hist_edges [B + 1], hist_counts [D, B + 2],
    # fold_ids [F] (token_id * 2 + half, extraction/types.py fold_half), fold_count [F], fold_mean, fold_max [F, D],
    # pseudo.<any of the above> over n pseudo-neurons, pseudo.source_neurons [n],
    # pseudo.rotation_seed [2] (seed, layer), pseudo.calib_{pseudo,real}_{mean,sd} [r, n]

    @property
    def d_mlp(self) -> int:
        """Columns (neurons, or pseudo-neurons in a `pseudo()` view)."""
        for name, axis in (("topk_values", 0), ("act_mean", 0), ("type_mean", 1), ("fold_mean", 1),
                           ("hist_counts", 0)):  # fmt: skip
            if name in self.tensors:
                return self.tensors[name].shape[axis]
        raise KeyError("no per-neuron tensor in this profile")

    def pseudo(self) -> ActivationProfile | None:
        """The pseudo-neurons' statistics as a profile with the same API (None if not extracted)."""
        tensors = {k[len("pseudo.") :]: v for k, v in self.tensors.items() if k.startswith("pseudo.")}
        if not tensors:
            return None
        return ActivationProfile(
            layer=self.layer, site=f"{self.site}.pseudo", input_site=None, window_len=self.window_len,
            n_tokens=self.n_tokens, tensors=tensors,
        )

    def split_type_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token type, per half of the corpus (alternating blocks of windows,
        extraction.fold_block_windows; 1: even / odd windows), for cross-fitting.

        Returns type_ids [T] (sorted; seen in either half), counts [2, T] int64 and
        means [2, T, D] float32 (NaN where that half never saw the type).
        """
        keys = self.numpy("fold_ids").astype(np.int64)  # [F]
        count, mean = self.numpy("fold_count").astype(np.int64), self.numpy("fold_mean")  # [F], [F, D]
        type_ids, column = np.unique(keys // 2, return_inverse=True)  # [T], [F]
        half = keys % 2
        counts = np.zeros((2, type_ids.size), np.int64)
        means = np.full((2, type_ids.size, mean.shape[1]), np.nan, np.float32)
        counts[half, column] = count
        means[half, column] = mean
        return type_ids, counts, means

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
