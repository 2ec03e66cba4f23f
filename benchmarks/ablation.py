"""Mean-ablation throughput of final-layer neurons: the batched analytic path against one model
rerun per neuron, on the same tokens.

Model: SmolLM2-135M (30 layers, d_model 576, d_mlp 1536, vocab 49152), its last layer; tokens:
the first `--windows` windows of 128 tokens of the default corpus, the paper's token filter.
Both paths compute TE and DE (final-norm scale frozen): the rerun needs two full passes per neuron
for that (`rerun_effects(direct=True)`), the analytic path none. The TE-only rerun (one pass per
neuron, `direct=False`) is timed too. Clean pass and ablation values are computed beforehand and
not timed. Prints neurons/s of each and their ratio, and checks that both agree.

Usage: python benchmarks/ablation.py [--fast-neurons 32] [--slow-neurons 2] [--windows 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import default_model_and_windows

from intraneuron.analyses.confidence.effects import final_layer_effects, peak_bytes, rerun_effects
from intraneuron.analyses.confidence.forward import (
    clean_pass,
    drop_token_ids,
    mean_activation,
    token_filter,
)
from intraneuron.models.weights import neuron_weights, unembedding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast-neurons", type=int, default=32)
    parser.add_argument("--slow-neurons", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--token-block", type=int, default=128)
    args = parser.parse_args()

    handle, windows = default_model_and_windows(window_len=128)
    ids = torch.tensor(windows.ids[: args.windows].astype("int64"))  # [B, T] (a copy of the memmap)
    layer = handle.n_layers - 1
    neurons = list(range(args.fast_neurons))
    clean = clean_pass(handle, ids, layer, neurons)
    means = mean_activation(handle, ids, layer, neurons)
    mask = token_filter(ids, skip_first=3, drop_ids=drop_token_ids(handle.tokenizer))
    w_out = neuron_weights(handle, layer, processed=False).w_out[neurons]
    unembed = unembedding(handle, processed=False, n_vocab=clean.logits.shape[-1])
    print(f"{handle.model_id}: layer {layer}, {ids.numel()} tokens ({int(mask.sum())} counted), "
          f"vocab {unembed.n_vocab}, torch threads {torch.get_num_threads()}")  # fmt: skip

    start = time.perf_counter()
    fast = final_layer_effects(clean, w_out, unembed, means, mask=mask, chunk=args.chunk,
                               token_block=args.token_block)  # fmt: skip
    fast_s = time.perf_counter() - start
    few = neurons[: args.slow_neurons]
    rates = {"analytic TE+DE": args.fast_neurons / fast_s}
    for direct, name in ((True, "rerun TE+DE"), (False, "rerun TE")):
        start = time.perf_counter()
        slow = rerun_effects(handle, ids, layer, few, means[: len(few)], mask=mask, clean=clean,
                             direct=direct)  # fmt: skip
        rates[name] = len(few) / (time.perf_counter() - start)
    for name, rate in rates.items():
        print(f"  {name:15s} {rate:8.2f} neurons/s")
    print(f"  ratio analytic / rerun TE+DE: {rates['analytic TE+DE'] / rates['rerun TE+DE']:.1f}x, "
          f"/ rerun TE: {rates['analytic TE+DE'] / rates['rerun TE']:.1f}x")  # fmt: skip
    layer_s = handle.d_mlp / rates["analytic TE+DE"]
    print(f"  whole layer ({handle.d_mlp} neurons): analytic {layer_s:.0f} s, "
          f"rerun TE+DE {handle.d_mlp / rates['rerun TE+DE']:.0f} s")  # fmt: skip
    mb = peak_bytes(args.chunk, args.token_block, unembed.n_vocab) / 1e6
    print(f"  analytic peak memory (formula): {mb:.0f} MB for chunk={args.chunk}, "
          f"token_block={args.token_block}")  # fmt: skip
    diff = (fast.summary["mean_abs_dloss_te"][: len(few)] - slow.summary["mean_abs_dloss_te"]).abs().max()
    print(f"  max |mean|dL_TE| analytic - rerun| over the rerun neurons: {float(diff):.2e}")


if __name__ == "__main__":
    main()
