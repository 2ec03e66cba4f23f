"""Extraction engine vs plain transformers forward passes on SmolLM2-135M, measured in one run.

Prints:
  1. tokens/s of the engine vs a plain forward pass over the same tokens truncated at the same layer
     (target: engine >= 0.9x);
  2. the early-exit saving: the engine on layer 0 vs a full forward pass (all 30 layers + LM head);
  3. peak RSS of an extraction over 1x and 4x as many tokens (target: flat);
  4. the cache-hit speed-up (second identical extraction, read from the cache).

Usage: python benchmarks/extraction.py [--layer 3] [--tokens 32768] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model_and_windows, prefix, timer  # noqa: E402

from intraneuron.extraction import ExtractionConfig, extract_profiles  # noqa: E402
from intraneuron.extraction.cache import ProfileCache  # noqa: E402


def batches(windows, batch_size):
    for start in range(0, windows.ids.shape[0], batch_size):
        yield torch.from_numpy(np.asarray(windows.ids[start : start + batch_size], dtype=np.int64))


def plain_forward(model, windows, batch_size, keep_layers: int | None):
    """A plain forward of the base model; keep_layers truncates its layer list (no hooks, no reducers)."""
    base = model.model
    all_layers = base.layers
    if keep_layers is not None:
        base.layers = all_layers[:keep_layers]
    try:
        with torch.inference_mode():
            for ids in batches(windows, batch_size):
                (base if keep_layers is not None else model)(input_ids=ids, use_cache=False)
    finally:
        base.layers = all_layers


def rss_probe(n_tokens: int, layer: int, batch_size: int) -> None:
    handle, windows = default_model_and_windows()
    sub = prefix(windows, n_tokens)
    settings = ExtractionConfig(batch_size=batch_size, progress=False)
    extract_profiles(handle, sub, [layer], settings, cache=None)
    print(json.dumps({"tokens": sub.n_tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rss-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        return rss_probe(args.rss_probe, args.layer, args.batch_size)

    torch.manual_seed(0)
    handle, windows = default_model_and_windows()
    sub = prefix(windows, args.tokens)
    n = sub.n_tokens
    settings = ExtractionConfig(batch_size=args.batch_size, progress=False)
    print(f"model smollm2-135m ({handle.n_layers} layers, d_mlp {handle.d_mlp}), {n} tokens, "
          f"windows of {sub.window_len}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    t: dict[str, float] = {}
    plain_forward(handle.model, prefix(sub, 4 * sub.window_len * args.batch_size), args.batch_size, None)  # warm-up
    with timer(t, "plain_truncated"):
        plain_forward(handle.model, sub, args.batch_size, args.layer + 1)
    with timer(t, "engine"):
        extract_profiles(handle, sub, [args.layer], settings, cache=None)
    with timer(t, "engine_layer0"):
        extract_profiles(handle, sub, [0], settings, cache=None)
    with timer(t, "plain_full"):
        plain_forward(handle.model, sub, args.batch_size, None)

    print(f"\n1. layer {args.layer}: engine {n / t['engine']:,.0f} tok/s vs plain forward truncated at "
          f"layer {args.layer}: {n / t['plain_truncated']:,.0f} tok/s -> ratio "
          f"{t['plain_truncated'] / t['engine']:.2f}x")
    print(f"2. early exit: engine on layer 0 {n / t['engine_layer0']:,.0f} tok/s vs full forward "
          f"({handle.n_layers} layers + LM head) {n / t['plain_full']:,.0f} tok/s -> layer 0 costs "
          f"{t['engine_layer0'] / t['plain_full']:.3f} of a full pass ({t['plain_full'] / t['engine_layer0']:.1f}x faster)")

    rss = []
    for factor in (1, 4):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-probe", str(factor * n), "--layer", str(args.layer),
             "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True,
        )
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"3. peak RSS: {rss[0]['peak_rss_mb']:,.0f} MB for {rss[0]['tokens']} tokens, "
          f"{rss[1]['peak_rss_mb']:,.0f} MB for {rss[1]['tokens']} tokens -> ratio "
          f"{rss[1]['peak_rss_mb'] / rss[0]['peak_rss_mb']:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        cache = ProfileCache(Path(tmp))
        with timer(t, "cold"):
            extract_profiles(handle, sub, [args.layer], settings, cache)
        with timer(t, "hit"):
            extract_profiles(handle, sub, [args.layer], settings, cache)
    print(f"4. cache: cold {t['cold']:.2f} s (extract + write), hit {t['hit']:.2f} s -> "
          f"{t['cold'] / t['hit']:.0f}x faster")


if __name__ == "__main__":
    main()
