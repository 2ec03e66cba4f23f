"""Per-layer figures of the confidence analysis; each carries its numbers as `fig.intraneuron_data`."""

from __future__ import annotations

import numpy as np
import pandas as pd


def layer_figures(table: pd.DataFrame, S, k: int, layer: int, model: str, noise_floor: float | None = None) -> dict:
    from intraneuron.analyses.confidence.entropy_stats import (
        norm_vs_logitvar_figure,
        spectrum_figure,
    )

    figures = {
        "unembedding_spectrum": spectrum_figure(S, k, f"{model}: singular values of W_U", noise_floor),
        "norm_vs_logit_var": norm_vs_logitvar_figure(table, layer),
        "rho_distribution": rho_distribution(table, layer),
    }
    if table["role"].ne("").any() and "ln_mediated" in table:
        figures["ablation_effects"] = ablation_effects(table, layer)
    return figures


def rho_distribution(table: pd.DataFrame, layer: int):
    """rho over the layer's neurons against the level of a random direction."""
    from matplotlib import pyplot as plt

    rho = table["rho"].dropna().to_numpy(float)
    level = float(table["rho_random_level"].iloc[0])
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    ax.hist(rho, bins=40, color="tab:blue")
    ax.axvline(level, color="k", ls="--", lw=1, label=f"random direction ({level:.3f})")
    ax.set(xlabel=f"rho: fraction of w_out in W_U's last k={int(table['k'].iloc[0])} directions", ylabel="neurons")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.suptitle(f"layer {layer}: {len(rho)} neurons, max rho {rho.max():.3f}")
    fig.intraneuron_data = {"rho": rho, "random_level": level}
    plt.close(fig)
    return fig


def ablation_effects(table: pd.DataFrame, layer: int):
    """Candidates against random neurons: the share of the loss effect that goes through the final
    norm (1 - |DE| / |TE|) and the entropy change under mean ablation."""
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    data = {}
    roles = [("candidate", "tab:red"), ("random", "0.5")]
    if (table["role"] == "known").any():  # the literature's neurons, when the config names them
        roles.append(("known", "tab:green"))
    for i, (role, colour) in enumerate(roles):
        rows = table[table["role"] == role]
        mediated, entropy = rows["ln_mediated"].to_numpy(float), rows["mean_dentropy_te"].to_numpy(float)
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(rows))
        left.scatter(i + jitter, mediated, color=colour, s=14)
        if "ln_mediated_lo" in rows:  # the bootstrap intervals over windows
            lo, hi = rows["ln_mediated_lo"].to_numpy(float), rows["ln_mediated_hi"].to_numpy(float)
            left.errorbar(i + jitter, mediated, yerr=[mediated - lo, hi - mediated], fmt="none", color=colour, lw=0.8)
            data[f"{role}.ln_mediated_lo"], data[f"{role}.ln_mediated_hi"] = lo, hi
        right.scatter(rows["rho"], entropy, color=colour, s=14, label=f"{role} ({len(rows)})")
        data[f"{role}.neuron"], data[f"{role}.ln_mediated"] = rows["neuron"].to_numpy(), mediated
        data[f"{role}.mean_dentropy_te"] = entropy
    left.set_xticks(range(len(roles)), [{"candidate": "candidates"}.get(r, r) for r, _ in roles])
    left.axhline(0, color="k", lw=0.8)
    left.set(ylabel="final-norm-mediated share 1 - |dL_DE| / |dL_TE|"
             + (" (95% CI over windows)" if "ln_mediated_lo" in table else ""))
    right.axhline(0, color="k", lw=0.8)
    right.set(xlabel="rho", ylabel="entropy change under mean ablation (nats)")
    right.legend(fontsize=8)
    fig.suptitle(f"layer {layer}: mean ablation, total vs direct effect")
    fig.intraneuron_data = data
    plt.close(fig)
    return fig
