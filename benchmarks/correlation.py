"""StreamingCorrelation on two SmolLM2-sized layers (d_mlp 1536), random activations, one run.

Prints:
  1. `add` throughput in tokens/s, and as a fraction of the plain float32 matmul it is built on
     ([N, D]^T @ [N, D], the same shapes, timed in the same run): target >= 0.8x;
     also the float64-batch path, for the price of its extra digits;
  2. peak memory of one pass of P layer pairs (P = what plan_tiles packs under --bound-mb) against
     P * bytes_per_pair (accumulators alone), the plan's estimate (+ working_bytes) and the bound.
     Measured in a fresh subprocess as RSS: peak (VmHWM, reset by /proc/self/clear_refs just
     before the pass) minus the RSS then, with the input batches already allocated (they are the
     caller's activations, not the stat's); once with glibc's defaults, once with large blocks
     always mmapped, so RSS follows the live bytes. tracemalloc cannot be used: torch's CPU
     tensors are not allocated through Python's allocator. On CUDA: max_memory_allocated.

Usage: python benchmarks/correlation.py [--tokens 200000] [--batch 4096] [--d 1536] [--bound-mb 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from intraneuron.extraction.correlation import (
    StreamingCorrelation,
    bytes_per_pair,
    plan_tiles,
    working_bytes,
)

MB = 2**20


def batches(n: int, d: int, seed: int, count: int = 4) -> list[torch.Tensor]:
    """A few fixed random batches, cycled: generating 200k x 1536 normals would cost more than the
    matmuls being measured. Offsets and scales differ per column, as real activations' do."""
    gen = torch.Generator().manual_seed(seed)
    scale, offset = torch.rand(d, generator=gen) + 0.1, torch.randn(d, generator=gen)
    # in place: no [N, D] temporaries
    return [torch.randn(n, d, generator=gen).mul_(scale).add_(offset) for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_add_and_matmul(a_batches, b_batches, n_batches: int, matmul_every: int, device: torch.device):
    """Per-batch seconds of `add` (float32 products) and of the bare matmul, interleaved so that
    both see the same load from whatever else shares the cores."""
    d_a, d_b = a_batches[0].shape[1], b_batches[0].shape[1]
    stat = StreamingCorrelation(d_a, d_b, device=device)
    stat.add(a_batches[0], b_batches[0])  # warm-up
    _ = a_batches[0].T @ b_batches[0]
    t_add, t_mm = [], []
    for i in range(n_batches):
        a, b = a_batches[i % len(a_batches)], b_batches[i % len(b_batches)]
        t_add.append(timed(lambda a=a, b=b: stat.add(a, b), device))
        if i % matmul_every == 0:
            t_mm.append(timed(lambda a=a, b=b: a.T @ b, device))
    return t_add, t_mm


def time_add64(a_batches, b_batches, n_batches: int, device: torch.device) -> list[float]:
    stat = StreamingCorrelation(a_batches[0].shape[1], b_batches[0].shape[1], device=device, batch_dtype=torch.float64)
    stat.add(a_batches[0], b_batches[0])  # warm-up
    return [timed(lambda i=i: stat.add(a_batches[i % len(a_batches)], b_batches[i % len(b_batches)]), device)
            for i in range(n_batches)]


def memory_probe(d: int, batch: int, n_pairs: int, device: torch.device) -> int:
    """Peak bytes above the baseline while adding 2 batches to n_pairs accumulators."""
    a = [x.to(device) for x in batches(batch, d, seed=0, count=2)]
    b = [x.to(device) for x in batches(batch, d, seed=1, count=2)]
    _ = a[0].T @ b[0]  # the BLAS's own buffers belong to the baseline, not to the stat
    del _
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_peak_rss()
    stats = [StreamingCorrelation(d, d, device=device) for _ in range(n_pairs)]
    for i in range(2):  # two batches: the second one merges into a non-empty state
        for stat in stats:
            stat.add(a[i], b[i])
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return proc_status_bytes("VmHWM") - before


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that. VmHWM, not
    getrusage's ru_maxrss: a child started by vfork + exec inherits its parent's peak in ru_maxrss."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--matmul-every", type=int, default=3, help="time a bare matmul after every k-th add")
    parser.add_argument("--f64-batches", type=int, default=6, help="batches timed with float64 products")
    parser.add_argument("--bound-mb", type=float, default=256.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_probe is not None:
        delta = memory_probe(args.d, args.batch, args.memory_probe, device)
        return print(json.dumps({"delta_bytes": delta}))

    d, n = args.d, args.batch
    n_batches = math.ceil(args.tokens / n)
    print(f"d_a = d_b = {d}, {n_batches} batches of {n} tokens ({n_batches * n:,} tokens) on {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    a = [x.to(device) for x in batches(n, d, seed=0)]
    b = [x.to(device) for x in batches(n, d, seed=1)]
    t_add, t_mm = time_add_and_matmul(a, b, n_batches, args.matmul_every, device)
    t_add64 = time_add64(a, b, args.f64_batches, device)
    add, mm, add64 = median(t_add), median(t_mm), median(t_add64)
    gflop = 2 * n * d * d / 1e9  # per batch
    print(f"\n1. add, float32 products: {n / add:,.0f} tok/s ({gflop / add:.0f} GFLOP/s; "
          f"{n_batches * n / sum(t_add):,.0f} tok/s over the whole stream); bare float32 matmul "
          f"[{n},{d}]^T @ [{n},{d}] ({len(t_mm)} interleaved): {n / mm:,.0f} tok/s ({gflop / mm:.0f} GFLOP/s) "
          f"-> add runs at {mm / add:.2f} of matmul peak (per-batch medians)")
    print(f"   add, float64 products: {n / add64:,.0f} tok/s -> {mm / add64:.2f} of the float32 matmul peak, "
          f"{add64 / add:.1f}x the float32 path's time")

    per_pair, work = bytes_per_pair(d, d), working_bytes(d, d, n)
    bound = int(args.bound_mb * MB)
    passes = plan_tiles([(la, lb) for la in range(30) for lb in range(30)], d, d, bound, reserve_bytes=work)
    n_pairs = len(passes[0])
    estimate = n_pairs * per_pair + work
    print(f"\n2. memory (MB = 2^20 bytes): bytes_per_pair {per_pair / MB:.1f} MB, working_bytes {work / MB:.1f} MB; "
          f"bound {bound / MB:.0f} MB -> plan_tiles: {n_pairs} pairs per pass, {len(passes)} passes for 30 x 30 "
          f"layer pairs; plan's estimate {estimate / MB:.1f} MB")
    if device.type == "cuda":
        probes = {"torch.cuda.max_memory_allocated": {}}
    else:  # glibc keeps freed batch temporaries in its heap unless large blocks always use mmap
        probes = {"RSS, glibc defaults": {}, "RSS, MALLOC_MMAP_THRESHOLD_=128k (~live bytes)":
                  {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    for how, env in probes.items():
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(n_pairs), "--d", str(d), "--batch", str(n),
             "--device", args.device],
            capture_output=True, text=True, check=True, env={**os.environ, **env},
        )
        delta = json.loads(out.stdout.strip().splitlines()[-1])["delta_bytes"]
        print(f"   peak of one {n_pairs}-pair pass, {how}: {delta / MB:.1f} MB -> "
              f"{delta / (n_pairs * per_pair):.2f}x the accumulators ({n_pairs} x bytes_per_pair), "
              f"{delta / estimate:.2f}x the plan's estimate, {delta / bound:.2f}x the bound")


if __name__ == "__main__":
    main()
