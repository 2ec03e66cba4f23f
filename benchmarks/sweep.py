"""A sweep over analysis-only keys extracts once: total sweep time vs one extraction + N analyses.

Runs a real multirun through the CLI (basic launcher, one process) on SmolLM2 with an empty
extraction cache, then reads every job's own timings back from MLflow:

    extraction_seconds   the job's extraction (the first job pays it; the others read the cache)
    analysis_seconds     the job's per-layer analysis

and prints the sweep's wall time against (one extraction + the N analyses) and against what N
independent extractions would have cost.

Usage: python benchmarks/sweep.py [--tokens 262144] [--neurons 256] [--layer 3]

With --launchers it measures instead the launcher, on the tiny model (experiment=smoke): the same
8-job sweep (clustering x segmentation x layer, each job its own output folder and MLflow run in a
sqlite store of a temporary folder) once with hydra/launcher=parallel (joblib, n_jobs=2) and once
with hydra/launcher=ray on a local Ray cluster of 2 CPUs (one CPU per job) that the script starts
on 127.0.0.1 beforehand and stops by process id afterwards, twice: with the config's fresh worker
per job (max_calls=1) and with reused workers (max_calls=0). It prints the wall times and their
ratios to joblib's (one run of each; every job of every sweep must finish):

    python benchmarks/sweep.py --launchers
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
    "clustering": "ward,kmeans_silhouette",  # as measured in docs/performance.md (k-means by the gap: 50x Ward)
    "segmentation": "equal_count,jenks",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--launchers", action="store_true",
                        help="joblib vs Ray launcher wall time of an 8-job tiny-model sweep")  # fmt: skip
    args = parser.parse_args()
    if args.launchers:
        return compare_launchers()

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
        wall = timed_run(command, work, env, "sweep")

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


def timed_run(command: list[str], cwd: Path, env: dict[str, str], what: str) -> float:
    """Wall time of `command`; exits with its stderr's tail if it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


# the 8 jobs of the launcher comparison: 2 x 2 x 2 on the tiny model
LAUNCHER_SWEEP = ["clustering=ward,kmeans_silhouette", "segmentation=equal_count,jenks", "layer=0,2"]
SMALL = ["experiment=smoke", "neurons=range", "neurons.stop=32", "extraction.pseudo_neurons=16",
         "extraction.progress=false", "tracking.system_metrics=false"]  # fmt: skip


def launcher_sweep(work: Path, launcher: str, env: dict[str, str], *overrides: str) -> float:
    """Wall time of the 8-job sweep with `launcher`, in `work` (its own store, sweep folder)."""
    work.mkdir()
    command = [
        sys.executable, "-m", "intraneuron", "--multirun", *SMALL, *LAUNCHER_SWEEP,
        f"hydra/launcher={launcher}", *overrides, f"hydra.sweep.dir={work / 'multirun'}",
        "tracking.tracking_uri=sqlite:///store/mlflow.db", "tracking.experiment=launcher-bench",
    ]  # fmt: skip
    wall = timed_run(command, work, env, f"{launcher} sweep")
    client = MlflowClient(f"sqlite:///{work}/store/mlflow.db")
    experiment = client.get_experiment_by_name("launcher-bench")
    runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''")
    statuses = sorted(r.info.status for r in runs)
    if statuses != ["FINISHED"] * 8:
        sys.exit(f"{launcher} sweep: expected 8 FINISHED jobs, got {statuses}")
    return wall


def compare_launchers() -> None:
    sys.path.insert(0, str(REPO))
    from tests.servers import LocalRayCluster

    with tempfile.TemporaryDirectory(prefix="intraneuron-launcher-bench-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        cache.mkdir()
        shared = REPO / ".cache"
        reused_folders = ("vendor", "models", "hashes", "gpt2-tokenizer")
        for reused in reused_folders:  # not what is measured
            if (shared / reused).exists():
                (cache / reused).symlink_to(shared / reused)
        dropped = ("MLFLOW_", "HYDRA_", "RAY_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        base.update(INTRANEURON_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        # one untimed job first, so that both sweeps find the tiny model's token windows and profiles cached
        warm = [sys.executable, "-m", "intraneuron", *SMALL, "layer=[0,2]",
                "tracking.tracking_uri=sqlite:///store/mlflow.db", "tracking.experiment=warm-up"]  # fmt: skip
        (work / "warm").mkdir()
        done = subprocess.run(warm, cwd=work / "warm", env=base, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"warm-up job failed:\n{done.stderr[-3000:]}")

        joblib_wall = launcher_sweep(work / "joblib", "parallel", base)
        started = time.perf_counter()
        with LocalRayCluster(num_cpus=2, env=base) as cluster:
            ray_start = time.perf_counter() - started
            ray_env = {**base, **cluster.driver_env()}
            ray_wall = launcher_sweep(work / "ray", "ray", ray_env)
            reuse_wall = launcher_sweep(work / "ray_reuse", "ray", ray_env, "hydra.launcher.ray.remote.max_calls=0")
            started = time.perf_counter()
        ray_stop = time.perf_counter() - started

    print(f"8-job sweep of the tiny model ({' x '.join(LAUNCHER_SWEEP)}), {os.cpu_count()} CPUs, "
          "warm extraction cache, sqlite store; one run each")  # fmt: skip
    print(f"joblib launcher (hydra/launcher=parallel, n_jobs=2)  {joblib_wall:8.1f} s")
    print(f"ray launcher (hydra/launcher=ray, 2 CPUs, 1 per job) {ray_wall:8.1f} s   "
          f"(+ {ray_start:.1f} s cluster start, {ray_stop:.1f} s stop, not counted)")  # fmt: skip
    print(f"ray, workers reused (max_calls=0)                     {reuse_wall:8.1f} s")
    print(f"ray / joblib                                         {ray_wall / joblib_wall:8.2f}x")
    print(f"ray with reused workers / joblib                     {reuse_wall / joblib_wall:8.2f}x")


if __name__ == "__main__":
    main()
