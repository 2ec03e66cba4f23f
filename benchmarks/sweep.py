"""A sweep over analysis-only keys extracts once: total sweep time vs one extraction + N analyses.

Runs a real multirun through the CLI (basic launcher, one process) on SmolLM2 with an empty
extraction cache, then reads every job's own timings back from MLflow:

    extraction_seconds   the job's extraction (the first job pays it; the others read the cache)
    analysis_seconds     the job's per-layer analysis

and prints the sweep's wall time against (one extraction + the N analyses) and against what N
independent extractions would have cost.

Usage: python benchmarks/sweep.py [--tokens 262144] [--neurons 256] [--layer 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from intraneuron.reports.artifacts import load_summary

REPO = Path(__file__).resolve().parents[1]
SWEPT = {
    "core_tokens": "top100,fraction_of_max",
    "clustering": "ward,kmeans",
    "segmentation": "equal_count,jenks",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--layer", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="intraneuron-sweep-bench-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        cache.mkdir()
        shared = REPO / ".cache"
        for reused in ("vendor", "models", "hashes", "gpt2-tokenizer"):  # not what is measured
            if (shared / reused).exists():
                (cache / reused).symlink_to(shared / reused)
        env = {**os.environ, "INTRANEURON_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable, "-m", "intraneuron", "--multirun",
            f"layer={args.layer}", f"corpus.max_tokens={args.tokens}",
            "neurons=range", f"neurons.stop={args.neurons}", "extraction.progress=false",
            *(f"{group}={options}" for group, options in SWEPT.items()),
            "tracking.tracking_uri=sqlite:///store/mlflow.db", "tracking.experiment=sweep-bench",
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])

        client = MlflowClient(f"sqlite:///{work}/store/mlflow.db")
        experiment = client.get_experiment_by_name("sweep-bench")
        runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''")
        runs = sorted(runs, key=lambda r: int(r.data.tags["hydra.job_num"]))
        extraction = [r.data.metrics["extraction_seconds"] for r in runs]
        analysis = [load_summary(client, r.info.run_id, args.layer)["analysis_seconds"] for r in runs]
        setup = [r.data.metrics["setup_seconds"] for r in runs]
        n_profiles = len([p for p in (cache / "profiles").iterdir() if not p.name.startswith(".")])

    n = len(runs)
    one_extraction = max(extraction)
    ideal = one_extraction + sum(analysis)
    naive = n * one_extraction + sum(analysis)
    print(f"SmolLM2-135M, layer {args.layer}, {args.tokens:,} tokens, {args.neurons} neurons, "
          f"{n} jobs ({' x '.join(SWEPT)}), basic launcher, empty extraction cache")  # fmt: skip
    print(f"profile cache entries written      {n_profiles}")
    print(f"extraction per job (s)             {', '.join(f'{e:.1f}' for e in extraction)}")
    print(f"analysis per job (s)               {', '.join(f'{a:.1f}' for a in analysis)}")
    print(f"model+corpus set-up per job (s)    {', '.join(f'{s:.1f}' for s in setup)}")
    print(f"sweep wall time                    {wall:8.1f} s")
    print(f"one extraction + {n} analyses       {ideal:8.1f} s   (sweep / this = {wall / ideal:.2f}x)")
    print(f"{n} extractions + {n} analyses        {naive:8.1f} s   (what the cache saves: "
          f"{naive - ideal:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
