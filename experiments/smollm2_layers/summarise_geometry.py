"""Tables and figures of the geometry-controlled rerun, read back from MLflow (nothing is recomputed).

    python experiments/smollm2_layers/summarise_geometry.py --parent RUN_ID [--parent RUN_ID ...]

One parent per sweep (sweep=smollm2_geometry for layers 0 and 1, sweep=smollm2_geometry_late for
layer 24). Writes, next to this file: results_geometry.md (layer metrics per job),
geometry_excess.png (per layer and job: the share of neurons whose statistic exceeds the
pseudo-neuron null, and the pseudo-neurons' own share of "significant" top segments) and
geometry_null.png (z_top of neurons against pseudo-neurons, per layer, projected vectors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from intraneuron.reports.artifacts import load_summary, load_table  # noqa: E402

HERE = Path(__file__).resolve().parent
COLUMNS = {  # layer aggregate (summary table) -> column title
    "neurons/analysed": "neurons analysed",
    "core_tokens/overlap_median": "core overlap (split-half)",
    "core_tokens/reliability_median": "core reliability",
    "topdown/n_categories/median": "K (median)",
    "neurons/topdown_skipped_frac": "K = 1 share",
    "topdown/kruskal_sig_frac_bh": "differentiated (KW, BH)",
    "topdown/epsilon2/median": "epsilon^2 (median)",
    "topdown/interleaving_mean/median": "rank interleaving",
    "topdown/interleaving_z/median": "interleaving z vs null",
    "bottomup/top_sig_frac": "top p < .05",
    "bottomup/top_sig_frac_pseudo": "pseudo top p < .05",
    "bottomup/top_sig_frac_bh": "top homogeneous (BH)",
    "bottomup/top_pi0": "pi0 (top)",
    "geometry/z_top_sig_frac_bh": "top z above geometry (BH)",
    "geometry/z_top_excess_median": "z_top excess (median)",
    "geometry/h_top_minus_rest_sig_frac_bh": "H_top-H_rest above geometry (BH)",
    "geometry/epsilon2_sig_frac_bh": "epsilon^2 above geometry (BH)",
    "geometry/ari_sig_frac_bh": "ARI above geometry (BH)",
    "bottomup/trend_rho/median": "trend rho",
    "homomorphism/ari/median": "ARI",
}
EXCESS = {  # bars of geometry_excess.png
    "bottomup/top_sig_frac": "neurons: top p < .05",
    "bottomup/top_sig_frac_pseudo": "pseudo-neurons: top p < .05",
    "geometry/z_top_sig_frac_bh": "neurons: top z above geometry (BH)",
    "geometry/epsilon2_sig_frac_bh": "neurons: epsilon^2 above geometry (BH)",
}


def job_label(run) -> str:
    params = run.data.params
    projected = "projected" if params.get("embedding.project_read_in", "").lower() == "true" else "raw"
    return f"{params['embedding.source']} / {projected}"


def _max_tokens(run) -> str:
    value = run.data.params.get("corpus.max_tokens", "null")
    return "all (1.5M)" if value in ("null", "None", "") else f"{int(value):,}"


def finished_children(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted((r for r in children if r.info.status == "FINISHED"), key=job_label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--experiment", default="intraneuron")
    parser.add_argument("--parent", action="append", required=True)
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    jobs = []  # (run, layer)
    for parent in args.parent:
        for run in finished_children(client, experiment.experiment_id, parent):
            for layer in sorted(int(v) for v in run.data.params["layer"].strip("[]").split(",")):
                jobs.append((run, layer))
    layers = sorted({layer for _, layer in jobs})
    labels = sorted({job_label(run) for run, _ in jobs})

    rows, summaries = [], {}
    for run, layer in jobs:
        metrics = load_summary(client, run.info.run_id, layer)
        for key in COLUMNS:  # a median the run's code did not aggregate yet: from the neurons table
            if key not in metrics and key.endswith("/median"):
                neurons = load_table(client, run.info.run_id, layer, "neurons")
                column = key.split("/")[1]
                analysed = neurons[neurons["skipped"].fillna("") == ""]
                metrics[key] = float(analysed[column].median()) if column in neurons else np.nan
        summaries[(job_label(run), layer)] = metrics
        rows.append({"job (embedding / vectors)": job_label(run), "layer": layer,
                     "tokens": _max_tokens(run)}
                    | {title: metrics.get(key) for key, title in COLUMNS.items()})  # fmt: skip
    results = pd.DataFrame(rows).sort_values(["layer", "job (embedding / vectors)"])
    header = (
        f"Sweep parent runs {', '.join(f'`{p}`' for p in args.parent)}. Fractions are over analysed "
        "neurons; medians are over neurons; 'above geometry' = BH at 0.05 over each neuron's p against "
        "the layer's 256 pseudo-neurons.\n\n"
    )
    (HERE / "results_geometry.md").write_text(header + results.to_markdown(index=False, floatfmt=".3f") + "\n")

    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False, sharey=True)
    width = 0.8 / len(EXCESS)
    for col, layer in enumerate(layers):
        ax = axes[0, col]
        x = np.arange(len(labels))
        for i, (key, name) in enumerate(EXCESS.items()):
            values = [summaries.get((label, layer), {}).get(key, np.nan) for label in labels]
            ax.bar(x + (i - (len(EXCESS) - 1) / 2) * width, values, width, label=name)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"layer {layer}")
        ax.axhline(0.05, color="grey", lw=0.6, ls=":")
    axes[0, 0].set_ylabel("share of neurons")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "geometry_excess.png", dpi=110)

    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.4), squeeze=False)
    for col, layer in enumerate(layers):
        ax = axes[0, col]
        for run, run_layer in jobs:
            if run_layer != layer or not job_label(run).endswith("projected"):
                continue
            neurons = load_table(client, run.info.run_id, layer, "neurons")
            pseudo = load_table(client, run.info.run_id, layer, "pseudo_neurons")
            edges = np.linspace(-4, 8, 49)
            source = job_label(run).split(" / ")[0]
            ax.hist(pseudo["z_top"].dropna(), bins=edges, density=True, histtype="step", ls="--",
                    label=f"pseudo-neurons, {source}")  # fmt: skip
            ax.hist(neurons["z_top"].dropna(), bins=edges, density=True, histtype="step",
                    label=f"neurons, {source}")  # fmt: skip
        ax.set_title(f"layer {layer} (read-in projected out)")
        ax.set_xlabel("top-segment homogeneity z")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "geometry_null.png", dpi=110)
    print((HERE / "results_geometry.md").read_text())


if __name__ == "__main__":
    main()
