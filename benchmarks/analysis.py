"""Per-neuron analysis throughput: `analyse_neuron` with its defaults on SmolLM2-sized neurons.

Each neuron: 100 core tokens with d = 576 vectors (SmolLM2-135M's model width) and activations,
synthetic (half planted: 4 vector clusters whose activation levels differ; half null). Default
settings: Ward + cosine-silhouette K in 2..8, 10 equal-count segments, homogeneity null with 1,000
permutations, successive-token null with 1,000, Mantel with 999. Data are generated beforehand;
only the analysis is timed.

Prints neurons/s on one process (BLAS limited to one thread: one core) and on two joblib (loky)
worker processes (pool started before timing), with the extrapolated time for a SmolLM2 layer
(1,536 neurons), and a per-stage breakdown of one neuron.

Usage: python benchmarks/analysis.py [--neurons 60] [--jobs 2]
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
from intraneuron.analyses.two_fold.homomorphism import mantel_activation_cosine
from intraneuron.analyses.two_fold.neuron import analyse_neuron
from intraneuron.analyses.two_fold.segmentation import segment
from intraneuron.analyses.two_fold.topdown import top_down

N_TOKENS, D_MODEL, LAYER_NEURONS = 100, 576, 1536


def make_neuron(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """acts [100], X [100, 576]: even seeds planted (4 clusters, activation ~ cluster), odd null."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, N_TOKENS)
    X = rng.normal(size=(4, D_MODEL))[truth] + rng.normal(scale=1.0, size=(N_TOKENS, D_MODEL))
    acts = (
        truth + rng.normal(scale=0.5, size=N_TOKENS) if seed % 2 == 0 else rng.normal(size=N_TOKENS)
    )
    return acts, X.astype(np.float32)


def analyse_all(neurons, seeds) -> int:
    for (acts, X), seed in zip(neurons, seeds, strict=True):
        analyse_neuron(acts, X, seed=(0, seed))
    return len(neurons)


def analyse_chunk(neurons, seeds) -> int:
    with threadpool_limits(1):
        return analyse_all(neurons, seeds)


def stage_times(acts: np.ndarray, X: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Seconds per call of each stage of analyse_neuron, on one neuron (defaults)."""
    factory, normalize = preset_factory("ward")
    C = cosine_matrix(X)
    labels = segment(acts)
    fit = fit_categories(X, factory, normalize=normalize, cosine=C)
    stages = {
        "cosine matrix + segments": lambda: (cosine_matrix(X), segment(acts)),
        "bottom-up nulls (2 x 1,000)": lambda: bottom_up(acts, C, labels, 10, n_permutations=1000),
        "Ward + silhouette K 2..8": lambda: fit_categories(
            X, factory, normalize=normalize, cosine=C
        ),
        "top-down tests": lambda: top_down(acts, fit.labels),
        "Mantel (999)": lambda: mantel_activation_cosine(acts, C, 999),
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
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other work on the machine slows both settings
    seeds = list(range(args.neurons))
    neurons = [make_neuron(s) for s in seeds]
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
        f"analyse_neuron, defaults: {N_TOKENS} core tokens, d = {D_MODEL}, Ward + silhouette K 2..8, "
        "10 equal-count segments, 1,000 permutations (homogeneity and successive), Mantel 999"
    )
    print(f"machine: {os.cpu_count()} cores, 1-minute load average {load:.2f} before the run")
    header = (
        f"{'setting':<28} {'neurons':>7} {'seconds':>8} {'neurons/s':>10} {'1,536 neurons':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, n, seconds in rows:
        rate = n / seconds
        print(f"{name:<28} {n:>7} {seconds:>8.2f} {rate:>10.1f} {LAYER_NEURONS / rate:>12.0f} s")

    print("\nper stage, one neuron, 1 thread (ms per call)")
    with threadpool_limits(1):
        for name, seconds in stage_times(*neurons[0]).items():
            print(f"  {name:<30} {seconds * 1e3:>7.1f}")


if __name__ == "__main__":
    main()
