"""Shared set-up for benchmarks: the packaged model and a prefix of the default corpus."""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager

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


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start
