"""Per-neuron analysis throughput: `analyse_neuron` with its defaults on SmolLM2-sized neurons.

Each neuron: 100 core tokens with d = 576 vectors (SmolLM2-135M's model width) and activations,
synthetic: a share `--planted` (default 0.1) planted (4 vector clusters whose activation levels
differ: these run the sequential top-segment test to its end), the rest null. Default settings:
Ward with K in 1..8 by the gap statistic (10 references), 10 equal-count segments, homogeneity null
with 1,000 permutations growing to 100,000 where p is small, successive-token null 1,000,
interleaving and overlap nulls 1,000, rank Mantel 999, the read-in direction projected out. Data
are generated beforehand; only the analysis is timed.

Prints neurons/s on one process (BLAS limited to one thread: one core) and on two joblib (loky)
worker processes (pool started before timing), the extrapolated time for a SmolLM2 layer (1,536
neurons plus `--pseudo` 256 pseudo-neurons, the layer's geometry null, analysed the same way), and
a per-stage breakdown of one planted neuron.

Usage: python benchmarks/analysis.py [--neurons 60] [--jobs 2] [--planted 0.1] [--pseudo 256]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from intraneuron.analyses.two_fold.bottomup import bottom_up, cosine_matrix
from intraneuron.analyses.two_fold.clustering import fit_categories, preset_factory
from intraneuron.analyses.two_fold.geometry import project_out
from intraneuron.analyses.two_fold.homomorphism import mantel_activation_cosine
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron, analyse_neuron
from intraneuron.analyses.two_fold.segmentation import segment
from intraneuron.analyses.two_fold.topdown import interleaving_overlap_null, top_down

N_TOKENS, D_MODEL, LAYER_NEURONS = 100, 576, 1536


def make_neuron(seed: int, planted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """acts [100], X [100, 576], w [1, 576] (the read-in direction projected out): planted (4
    clusters, activation ~ cluster) or null."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, N_TOKENS)
    X = rng.normal(size=(4, D_MODEL))[truth] + rng.normal(scale=1.0, size=(N_TOKENS, D_MODEL))
    acts = truth + rng.normal(scale=0.5, size=N_TOKENS) if planted else rng.normal(size=N_TOKENS)
    return acts, X.astype(np.float32), rng.normal(size=(1, D_MODEL))


def analyse_all(neurons, seeds) -> int:
    for (acts, X, w), seed in zip(neurons, seeds, strict=True):
        analyse_neuron(acts, project_out(X, w), seed=(0, seed))
    return len(neurons)


def analyse_chunk(neurons, seeds) -> int:
    with threadpool_limits(1):
        return analyse_all(neurons, seeds)


def stage_times(acts: np.ndarray, X: np.ndarray, w: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Seconds per call of each stage of analyse_neuron, on one neuron (defaults)."""
    factory, normalize = preset_factory("ward")
    defaults = TwoFoldNeuron()
    C = cosine_matrix(X)
    labels = segment(acts)
    fit = fit_categories(X, factory, normalize=normalize, cosine=C, k_choice="gap", seed=0)
    stages = {
        "read-in projection": lambda: project_out(X, w),
        "cosine matrix + segments": lambda: (cosine_matrix(X), segment(acts)),
        "bottom-up nulls (1,000 -> 100,000)": lambda: bottom_up(
            acts, C, labels, 10, n_permutations=1000, max_permutations=defaults.max_permutations
        ),
        "Ward + gap statistic K 1..8": lambda: fit_categories(
            X, factory, normalize=normalize, cosine=C, k_choice="gap", seed=0
        ),
        "top-down tests": lambda: top_down(acts, fit.labels),
        "interleaving/overlap nulls": lambda: interleaving_overlap_null(
            acts, fit.labels, 1000, np.random.default_rng(0)
        ),
        "rank Mantel (999)": lambda: mantel_activation_cosine(acts, C, 999),
        "analyse_neuron (all)": lambda: analyse_neuron(acts, X),
    }
    times = {}
    for name, call in stages.items():
        call()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        times[name] = (time.perf_counter() - start) / repeats
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=60, help="neurons timed per setting")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the parallel run")
    parser.add_argument("--planted", type=float, default=0.1, help="share of planted neurons")
    parser.add_argument("--pseudo", type=int, default=256, help="pseudo-neurons per layer")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other work on the machine slows both settings
    seeds = list(range(args.neurons))
    every = max(1, round(1 / args.planted)) if args.planted > 0 else args.neurons + 1
    neurons = [make_neuron(s, planted=s % every == 0) for s in seeds]
    per_layer = LAYER_NEURONS + args.pseudo
    rows = []

    with threadpool_limits(1):
        analyse_all(neurons[:2], seeds[:2])  # warm-up (imports, first calls)
        start = time.perf_counter()
        analyse_all(neurons, seeds)
        rows.append(("1 process", args.neurons, time.perf_counter() - start))

    if args.jobs > 1:
        chunks = [slice(j, None, args.jobs) for j in range(args.jobs)]
        with Parallel(n_jobs=args.jobs, backend="loky") as parallel:
            parallel(
                delayed(analyse_chunk)(neurons[c][:1], seeds[c][:1]) for c in chunks
            )  # start pool
            start = time.perf_counter()
            done = parallel(delayed(analyse_chunk)(neurons[c], seeds[c]) for c in chunks)
            rows.append(
                (f"{args.jobs} processes (joblib loky)", sum(done), time.perf_counter() - start)
            )

    print(
        f"analyse_neuron, defaults: {N_TOKENS} core tokens, d = {D_MODEL}, read-in projected out, Ward + gap "
        "K 1..8, 10 equal-count segments, sequential top-segment null 1,000 -> 100,000, successive and "
        f"interleaving nulls 1,000, rank Mantel 999; {args.planted:.0%} planted neurons"
    )
    print(f"machine: {os.cpu_count()} cores, 1-minute load average {load:.2f} before the run")
    layer = f"{LAYER_NEURONS:,} + {args.pseudo} pseudo"
    header = f"{'setting':<28} {'neurons':>7} {'seconds':>8} {'neurons/s':>10} {layer:>20}"
    print(header)
    print("-" * len(header))
    for name, n, seconds in rows:
        rate = n / seconds
        print(f"{name:<28} {n:>7} {seconds:>8.2f} {rate:>10.1f} {per_layer / rate:>18.0f} s")

    print("\nper stage, one planted neuron, 1 thread (ms per call)")
    with threadpool_limits(1):
        for name, seconds in stage_times(*neurons[0]).items():
            print(f"  {name:<36} {seconds * 1e3:>7.1f}")


if __name__ == "__main__":
    main()
