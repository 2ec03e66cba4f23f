"""The keys of a pass's type-keyed tables, read off its windows before the pass, and the corpus half
each window belongs to.

A corpus uses a fraction of the vocabulary (the default corpus: 21,195 of SmolLM2's 49,152 token
types, and 35,915 of the 98,304 (type, half) pairs), and the windows a pass reads are known before
it starts, so every table keyed by token type is sized by the keys that occur, not by the vocabulary.
Profiles store the keys they saw (`type_ids`, `fold_ids`, ...); merging two profiles takes the union.

The two halves of cross-fitting alternate by blocks of `extraction.fold_block_windows` windows: window
w is in half (w // block) % 2, and its fold key is token_id * 2 + half. Block 1 is even / odd windows;
longer blocks keep neighbouring windows, which share context (a chapter, its names), on one side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def fold_half(windows, block: int = 1):
    """The corpus half (0 or 1) of global window indices `windows` (an int, a numpy array or a
    tensor, returned as the same): alternating blocks of `block` windows."""
    return windows // block % 2


@dataclass(frozen=True)
class TypeKeys:
    types: torch.Tensor  # [U] sorted token ids that occur
    folds: torch.Tensor  # [F] sorted fold keys token_id * 2 + fold_half(window, block) that occur

    @classmethod
    def of_windows(cls, ids, window_range: range, skip: int, block: int = 1) -> TypeKeys:
        """Keys of windows `window_range` of ids [W, T] (global window indices), positions >= skip,
        the halves alternating by blocks of `block` windows."""
        tokens = np.asarray(ids[window_range.start : window_range.stop, skip:], dtype=np.int64)  # [w, T - skip]
        half = fold_half(np.arange(window_range.start, window_range.stop), block)[:, None]  # [w, 1]
        return cls(torch.from_numpy(np.unique(tokens)), torch.from_numpy(np.unique(tokens * 2 + half)))

    @classmethod
    def dense(cls, vocab_size: int) -> TypeKeys:
        """Every id of a vocabulary (tables built without a corpus: tests, tools)."""
        return cls(torch.arange(vocab_size), torch.arange(2 * vocab_size))
