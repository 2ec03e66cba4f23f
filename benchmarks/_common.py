"""Shared set-up for benchmarks: the packaged model and a prefix of the default corpus."""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_and_windows(window_len: int = 128):
    from intraneuron.corpus import build_windows, load_source, source_key
    from intraneuron.models.loading import load_model

    handle = load_model("smollm2-135m")
    windows = build_windows(
        load_source("gutenberg"), handle.tokenizer, window_len=window_len,
        source_key=source_key("gutenberg"),
    )
    return handle, windows


def prefix(windows, n_tokens: int):
    """The first n_tokens of a TokenWindows, as a TokenWindows with its own content hash."""
    n = max(1, n_tokens // windows.window_len)
    return dataclasses.replace(windows, ids=windows.ids[:n], content_hash=f"{windows.content_hash}[:{n}]")


def key_complete(windows, skip: int = 1, block: int = 1):
    """Windows holding every (token type, half) key of `windows` once (positions >= skip, halves
    alternating by blocks of `block` windows), and no other: a type seen in one half there sits in a
    window of that half here, position 0 is the corpus's own first token. The type tables of a pass
    over it are the whole corpus's size (they are sized by these keys) while the pass reads a few
    percent of the tokens, so the peak memory of the whole corpus is measured at the cost of a prefix."""
    from intraneuron.extraction.types import TypeKeys, fold_half

    keys = TypeKeys.of_windows(windows.ids, range(windows.n_windows), skip, block).folds.numpy()
    width = windows.window_len - skip
    by_half = [keys[keys % 2 == h] // 2 for h in (0, 1)]
    n = max(-(-len(types) // width) for types in by_half)  # windows per half
    halves = fold_half(np.arange(2 * block * -(-n // block)), block)  # whole pairs of blocks: >= n per half
    ids = np.empty((halves.size, windows.window_len), dtype=windows.ids.dtype)
    ids[:, :skip] = windows.ids[0, :skip]
    for h, types in enumerate(by_half):  # padded by repeating the half's own types: no new key
        rows = np.flatnonzero(halves == h)
        ids[rows, skip:] = np.resize(types, rows.size * width).reshape(rows.size, width)
    return dataclasses.replace(windows, ids=ids, content_hash=f"{windows.content_hash}[keys]")


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start
