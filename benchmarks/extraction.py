"""Extraction engine vs a plain forward pass, on the configuration the main job runs.

The main job (`make run`: analysis=two_fold on SmolLM2-135M) extracts every statistic the two-fold
analysis reads: top-k, per-type and per-half (fold) tables, moments, histograms, the layer input
per type (hook_resid_mid) and the pseudo-neurons with those statistics, skipping window position 0.
This script measures exactly that (`--stats five` measures the older five-statistic set instead),
as the main job extracts it: the corpus in `analysis.interval_blocks` contiguous blocks (its corpus
intervals), one pass per block, each block and their merge saved to a temporary profile cache
(`--interval-blocks 0`: one pass, nothing saved).

Each side runs in a fresh process (so its peak RSS is its own), sides alternate `--rounds` times and
the ratio is the median of the paired rounds:
  engine / plain : tokens/s and CPU-time ratio against a plain forward of the same batches
                   truncated after the same layer (no hooks, no statistics); > 1 is faster;
  peak RSS       : per side, model included;
  TransformerLens: when transformer_lens (4.x) is installed, the engine is also paired with its
                   TransformerBridge's `run_with_hooks` reading hook_post, stopped after the layer,
                   with a light reduction (per-neuron sum and max): "TransformerLens-lite".

`--scale` builds a random-weight GPT-2 XL-shaped model (vocab 50,257, d_model 1,600, d_mlp 6,400,
2 layers); `--all-layers` takes all 30 SmolLM2 layers. Both print the memory plan of the whole
default corpus under `--memory-gb` (memory per layer, passes, estimated peak), then extract over
`--tokens` tokens with a profile cache and print the plan there, its estimated peak and the
measured peak RSS (the check of the estimate). With `--whole-keys` they extract instead over windows
that hold every (token type, half) key of the whole corpus once (`_common.key_complete`): tables, plan
and peak memory are the whole corpus's, at the cost of about 36k tokens.

Usage: python benchmarks/extraction.py [--layers 0 15] [--tokens 32768] [--rounds 2] [--interval-blocks 0]
       python benchmarks/extraction.py --scale [--tokens 65536 | --whole-keys] [--memory-gb 8]
       python benchmarks/extraction.py --all-layers [--tokens 65536 | --whole-keys] [--memory-gb 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model_and_windows, key_complete, prefix  # noqa: E402

from intraneuron.extraction import STAT_NAMES, ExtractionConfig, extract_profiles  # noqa: E402

FIVE_STATS = ("topk", "token_types", "moments", "histogram", "input_token_types")


def main_job_settings(**overrides) -> ExtractionConfig:
    """conf/extraction/default.yaml, as the main job composes it (read from the file, so the benchmark
    follows the defaults: 2,048 pseudo-neurons since the calibrated geometry null), on the CPU."""
    from omegaconf import OmegaConf

    from intraneuron.paths import CONF_DIR

    fields = {f.name for f in dataclasses.fields(ExtractionConfig)}
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "extraction" / "default.yaml"))
    settings = {k: v for k, v in defaults.items() if k in fields and k != "device"}
    settings["progress"] = False
    settings.update({k: v for k, v in overrides.items() if v is not None and k in fields})
    return ExtractionConfig(**settings)


def main_job_blocks() -> int:
    """conf/analysis/two_fold.yaml's interval_blocks: the corpus blocks the main job extracts."""
    from omegaconf import OmegaConf

    from intraneuron.paths import CONF_DIR

    return int(OmegaConf.load(CONF_DIR / "analysis" / "two_fold.yaml").interval_blocks)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(windows, batch_size):
    for start in range(0, windows.ids.shape[0], batch_size):
        yield torch.from_numpy(np.asarray(windows.ids[start : start + batch_size], dtype=np.int64))


def plain_forward(model, windows, batch_size: int, keep_layers: int) -> None:
    """The base model's forward with its layer list cut after `keep_layers` layers: no hooks, no stats."""
    base = model.model if hasattr(model, "model") else model.transformer
    name = "layers" if hasattr(base, "layers") else "h"
    all_layers = getattr(base, name)
    setattr(base, name, all_layers[:keep_layers])
    try:
        with torch.inference_mode():
            for ids in batches(windows, batch_size):
                base(input_ids=ids, use_cache=False)
    finally:
        setattr(base, name, all_layers)


def lens_forward(bridge, windows, batch_size: int, layer: int, skip: int = 1) -> None:
    """TransformerLens-lite: `run_with_hooks` reading `blocks.{layer}.mlp.hook_post`, stopped after
    the layer, with a light reduction (per-neuron sum and max over the kept positions)."""
    total = torch.zeros(bridge.cfg.d_mlp, dtype=torch.float64)
    peak = torch.full((bridge.cfg.d_mlp,), -torch.inf)

    def reduce(acts, hook):  # returns None: the activation is read, not replaced
        kept = acts[:, skip:].reshape(-1, acts.shape[-1])
        total.add_(kept.sum(0, dtype=torch.float64))
        torch.maximum(peak, kept.amax(0), out=peak)

    with torch.inference_mode():
        for ids in batches(windows, batch_size):
            bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", reduce)], stop_at_layer=layer + 1)


def lens_bridge():
    """The packaged SmolLM2 as a TransformerLens 4 bridge, booted from its de-quantised folder."""
    from transformer_lens.model_bridge import TransformerBridge

    from intraneuron.models.loading import dequantised
    from intraneuron.models.packaged import InMemory, smollm2_gguf

    folder = dequantised(smollm2_gguf())
    if isinstance(folder, InMemory):  # the warning above says why
        raise SystemExit("TransformerLens boots from a folder: the de-quantised SmolLM2 could not be saved")
    return TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)


def probe(args) -> None:
    """One side in this process: prints its JSON line (seconds, CPU seconds, tokens, peak RSS)."""
    torch.manual_seed(0)
    handle, windows = default_model_and_windows()
    sub = prefix(windows, args.tokens)
    stats = FIVE_STATS if args.stats == "five" else STAT_NAMES
    settings = main_job_settings(batch_size=args.batch_size, pseudo_neurons=args.pseudo_neurons)
    warm = prefix(sub, 2 * sub.window_len * args.batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    if args.probe == "plain":
        plain_forward(handle.model, warm, args.batch_size, args.layer + 1)
        wall, cpu = time.perf_counter(), time.process_time()
        plain_forward(handle.model, sub, args.batch_size, args.layer + 1)
    elif args.probe == "lens":
        bridge = lens_bridge()
        lens_forward(bridge, warm, args.batch_size, args.layer)
        wall, cpu = time.perf_counter(), time.process_time()
        lens_forward(bridge, sub, args.batch_size, args.layer)
    else:
        blocks = main_job_blocks() if args.interval_blocks is None else args.interval_blocks
        if blocks:  # the main job's own extraction: G block passes, each block and the merge saved
            from intraneuron.extraction.blocks import extract_blocks
            from intraneuron.extraction.cache import ProfileCache

            with tempfile.TemporaryDirectory() as folder:
                extract_blocks(handle, sub, [args.layer], settings, ProfileCache(Path(folder)), blocks, stats=stats)
        else:
            extract_profiles(handle, sub, [args.layer], settings, cache=None, stats=stats)
    print(json.dumps({
        "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
        "tokens": sub.n_tokens, "peak_rss_mb": peak_rss_mb(),
    }))


def run_probe(side: str, layer: int, args) -> dict:
    cmd = [sys.executable, __file__, "--probe", side, "--layers", str(layer), "--tokens", str(args.tokens),
           "--batch-size", str(args.batch_size), "--stats", args.stats]
    if args.pseudo_neurons is not None:
        cmd += ["--pseudo-neurons", str(args.pseudo_neurons)]
    if args.interval_blocks is not None:
        cmd += ["--interval-blocks", str(args.interval_blocks)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def paired(args) -> None:
    handle, windows = default_model_and_windows()
    print(f"model smollm2-135m ({handle.n_layers} layers, d_mlp {handle.d_mlp}), {args.tokens} tokens, "
          f"batch {args.batch_size} x {windows.window_len}, torch threads {torch.get_num_threads()}, "
          f"stats: {'main job (' + ', '.join(STAT_NAMES) + ')' if args.stats == 'main' else ', '.join(FIVE_STATS)}, "
          f"pseudo-neurons {args.pseudo_neurons or main_job_settings().pseudo_neurons}, corpus blocks "
          f"{main_job_blocks() if args.interval_blocks is None else args.interval_blocks} (0: one pass, nothing saved)")
    del handle
    try:
        import transformer_lens  # noqa: F401

        sides = ("plain", "lens")
    except ImportError:
        print("TransformerLens: not installed in this environment, not compared")
        sides = ("plain",)
    print("| layer | against | engine tok/s | its tok/s | tok/s ratio | CPU-time ratio | engine peak RSS | its peak RSS | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in args.layers:
        rounds = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                rounds[side].append((run_probe(side, layer, args), run_probe("engine", layer, args)))
        for side in sides:
            _row(layer, "plain forward" if side == "plain" else "TransformerLens-lite", rounds[side])


def _row(layer: int, label: str, rounds: list[tuple[dict, dict]]) -> None:
    """One table row from (other side, engine) pairs of one layer."""
    speed = statistics.median(p["seconds"] / e["seconds"] for p, e in rounds)
    cpu = statistics.median(p["cpu_seconds"] / e["cpu_seconds"] for p, e in rounds)
    e_rss = max(e["peak_rss_mb"] for _, e in rounds)
    p_rss = max(p["peak_rss_mb"] for p, _ in rounds)
    tokens = rounds[0][1]["tokens"]
    e_tps = statistics.median(tokens / e["seconds"] for _, e in rounds)
    p_tps = statistics.median(tokens / p["seconds"] for p, _ in rounds)
    print(f"| {layer} | {label} | {e_tps:,.0f} | {p_tps:,.0f} | {speed:.2f}x | {cpu:.2f}x | {e_rss:,.0f} MB | "
          f"{p_rss:,.0f} MB | {e_rss / p_rss:.2f}x |", flush=True)


def planned(args, handle, windows, layers: list[int], label: str, whole=None) -> None:
    """Extract `layers` over `windows` under the memory budget; print the plan, its estimated peak
    and the measured peak RSS; with `whole` (the whole corpus), also the plan it would get."""
    from intraneuron.extraction.cache import ProfileCache
    from intraneuron.extraction.memory import GB, plan_extraction

    settings = main_job_settings(batch_size=args.batch_size, memory_gb=args.memory_gb,
                                 pseudo_neurons=args.pseudo_neurons)  # fmt: skip
    spec = tuple(sorted(STAT_NAMES))
    if whole is not None:
        plan, keys = plan_extraction(handle, whole, layers, settings, spec)
        print(f"{label}, whole corpus ({whole.n_tokens:,} tokens, {len(keys.types):,} token types, "
              f"{len(keys.folds):,} (type, half) keys): {plan.describe()}", flush=True)
    plan, keys = plan_extraction(handle, windows, layers, settings, spec)
    print(f"{label}, {windows.n_tokens:,} tokens ({len(keys.types):,} token types): {plan.describe()}", flush=True)
    before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        extract_profiles(handle, windows, layers, settings, ProfileCache(Path(tmp)), stats=spec)
        seconds = time.perf_counter() - started
    estimate = max(plan.peak(p) for p in plan.passes) / GB * 1024
    print(f"{label}: {seconds:,.0f} s ({windows.n_tokens / seconds:,.0f} tok/s); peak RSS {peak_rss_mb():,.0f} MB "
          f"(before the pass {before:,.0f} MB); the plan's estimated peak {estimate:,.0f} MB, budget "
          f"{args.memory_gb:g} GB")


def scale(args) -> None:
    from intraneuron.corpus import build_windows, load_source, source_key
    from intraneuron.models.loading import load_model
    from intraneuron.models.tiny import tiny_gpt2

    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny_gpt2(Path(tmp) / "gpt2-xl-shaped", n_layers=2, d_model=1600)
        handle = load_model(str(directory))
        print(f"GPT-2 XL-shaped random model: vocab {handle.vocab_size}, d_model {handle.d_model}, "
              f"d_mlp {handle.d_mlp}, {handle.n_layers} layers", flush=True)
        windows = build_windows(load_source("gutenberg"), handle.tokenizer, window_len=128,
                                source_key=source_key("gutenberg"))  # fmt: skip
        planned(args, handle, measured(args, windows), [0, 1], "gpt2-xl-shaped", whole=windows)


def measured(args, windows):
    """What --scale and --all-layers extract over: a prefix, or the whole corpus's keys."""
    return key_complete(windows) if args.whole_keys else prefix(windows, args.tokens)


def all_layers(args) -> None:
    handle, windows = default_model_and_windows()
    planned(args, handle, measured(args, windows), list(range(handle.n_layers)), "smollm2-135m, 30 layers",
            whole=windows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    parser.add_argument("--tokens", type=int, default=None, help="default 32768 (paired), 65536 (--scale, "
                        "--all-layers); the plan for the whole corpus is printed too")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stats", choices=("main", "five"), default="main")
    parser.add_argument("--pseudo-neurons", type=int, default=None)
    parser.add_argument("--memory-gb", type=float, default=8.0)
    parser.add_argument("--interval-blocks", type=int, default=None, help="the engine's corpus blocks (default: "
                        "the main job's analysis.interval_blocks; each block and the merge saved to a temporary cache)")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--all-layers", action="store_true")
    parser.add_argument("--whole-keys", action="store_true", help="--scale, --all-layers: extract over windows "
                        "holding the whole corpus's type keys (its tables and memory) instead of --tokens")  # fmt: skip
    parser.add_argument("--probe", choices=("plain", "engine", "lens"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        args.layer = args.layers[0]
        args.tokens = args.tokens or 32768
        return probe(args)
    if args.scale:
        args.tokens = args.tokens or 65536
        return scale(args)
    if args.all_layers:
        args.tokens = args.tokens or 65536
        return all_layers(args)
    args.tokens = args.tokens or 32768
    paired(args)


if __name__ == "__main__":
    main()
