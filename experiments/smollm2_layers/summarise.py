"""Tables and figures of a finished sweep, read back from MLflow (nothing is recomputed).

    python experiments/smollm2_layers/summarise.py [--parent RUN_ID] [--tracking-uri URI]

Writes, next to this file: results.md (layer metrics per job), homogeneity_by_segment.png (mean
segment homogeneity and z against the permutation null, by activation segment, top = 1) and
interleaving.png. Without --parent, the latest sweep parent run in the experiment is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from intraneuron.reports.artifacts import load_summary, load_table  # noqa: E402

HERE = Path(__file__).resolve().parent
COLUMNS = {  # layer aggregate (summary table) -> column title
    "neurons/analysed": "neurons",
    "core_tokens/n_mean": "core tokens",
    "topdown/n_categories/median": "K (median)",
    "topdown/kruskal_sig_frac_bh": "differentiated (KW, BH)",
    "topdown/epsilon2/median": "epsilon^2 (median)",
    "topdown/low_mean_differ_more_frac": "low-mean pairs differ more",
    "topdown/overlap_frac_positive/median": "pairs overlapping",
    "topdown/interleaving_mean/median": "rank interleaving",
    "bottomup/h_top_minus_rest/median": "H_top - H_rest",
    "bottomup/top_sig_frac_bh": "top segment homogeneous (BH)",
    "bottomup/trend_rho/median": "trend rho",
    "homomorphism/ari/median": "ARI",
    "homomorphism/mantel_rho/median": "Mantel rho",
}


def job_label(run) -> str:
    params = run.data.params
    return f"{params['core_tokens.rule']} / {params['embedding.source']}"


def table(client: MlflowClient, run, layer: int, name: str) -> pd.DataFrame:
    return load_table(client, run.info.run_id, layer, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--experiment", default="intraneuron")
    parser.add_argument("--parent", default=None)
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    parent_id = args.parent or client.search_runs(
        [experiment.experiment_id], "tags.`mlflow.runName` LIKE 'sweep-%'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )[0].info.run_id  # fmt: skip
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    children = sorted((r for r in children if r.info.status == "FINISHED"), key=job_label)
    layers = sorted(int(v) for v in children[0].data.params["layer"].strip("[]").split(","))

    rows = []
    for run in children:
        for layer in layers:
            metrics = load_summary(client, run.info.run_id, layer)
            rows.append({"job (rule / embedding)": job_label(run), "layer": layer}
                        | {title: metrics.get(key) for key, title in COLUMNS.items()})  # fmt: skip
    results = pd.DataFrame(rows)
    first = children[0].data.params
    header = (
        f"Sweep parent run `{parent_id}`: model {first['model.name']}, corpus {first['corpus.name']} "
        f"(max_tokens {first['corpus.max_tokens']}), layers {layers}, clustering "
        f"{first['clustering.estimator._target_']}, segmentation {first['segmentation.scheme']} "
        f"x {first['segmentation.n_segments']}, {first['analysis.n_permutations']} permutations.\n\n"
        "Fractions are over analysed neurons; medians are over neurons.\n\n"
    )
    (HERE / "results.md").write_text(header + results.to_markdown(index=False, floatfmt=".3f") + "\n")

    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6.5), sharex=True, squeeze=False)
    fig_i, axes_i = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
    for run in children:
        for col, layer in enumerate(layers):
            segments = table(client, run, layer, "segments")
            by_segment = segments.groupby("segment")[["homogeneity", "z"]].mean()
            x = by_segment.index + 1
            axes[0, col].plot(x, by_segment["homogeneity"], marker="o", label=job_label(run))
            axes[1, col].plot(x, by_segment["z"], marker="o", label=job_label(run))
            neurons = table(client, run, layer, "neurons")
            axes_i[0, col].hist(neurons["interleaving_mean"].dropna(), bins=30, histtype="step",
                                label=job_label(run))  # fmt: skip
    for col, layer in enumerate(layers):
        axes[0, col].set_title(f"layer {layer}")
        axes[1, col].axhline(0, color="grey", lw=0.5)
        axes[1, col].set_xlabel("activation segment (1 = highest)")
        axes_i[0, col].set_title(f"layer {layer}")
        axes_i[0, col].set_xlabel("mean rank interleaving (0 = separated, 0.5 = mixed)")
    axes[0, 0].set_ylabel("mean homogeneity (cosine)")
    axes[1, 0].set_ylabel("mean z vs permutation null")
    axes[0, -1].legend(fontsize=7)
    axes_i[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "homogeneity_by_segment.png", dpi=110)
    fig_i.tight_layout()
    fig_i.savefig(HERE / "interleaving.png", dpi=110)
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
