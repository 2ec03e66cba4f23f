"""Confidence regulation neurons (Stolfo et al. 2024) behind the Analysis seam.

Per layer (the paper studies the last): every neuron's weight statistics (||w_out||, LogitVar,
the fraction rho of w_out in the unembedding's null space against the random-direction level,
the alignment of its direct logit effect with the corpus's log-frequency direction), then the
causal test for the top candidates by rho and for random neurons of the same layer: mean
ablation with the final norm recomputed (total effect) against the norm scale frozen (direct
effect), so the share of the loss effect that goes through the final norm is measured, and the
same with the frequency direction frozen. Final-layer effects are analytic (r' = r + (mean - a)
w_out, exact, many neurons per step); other layers rerun the model through write hooks. The
effects get 95% percentile intervals from a bootstrap over windows (bootstrap.py), and W_U's
bottom singular values are compared with simulated Q8_0 de-quantisation noise (quantisation.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from intraneuron.analyses.base import Analysis, Job, LayerResult, Requirements
from intraneuron.errors import ConfigError

SELECTIONS = ("rho", "norm_over_logit_var")
FREQUENCY = ("corpus", "counts_file", "none")


class ConfidenceAnalysis(Analysis):
    """Entropy and token-frequency neurons: w_out in the unembedding's null space, mean ablations (Stolfo et al. 2024).

    `analysis=confidence`: the null-space dimension, candidates, ablation sample and frequency source.
    """

    name = "confidence"
    headline = {
        "rho_random_level": "rho/random_level",
        "top_rho": "rho/max",
        "candidates_rho_median": "candidates/rho/median",
        "candidates_ln_mediated_median": "candidates/ln_mediated/median",
        "random_ln_mediated_median": "random/ln_mediated/median",
        "candidates_entropy_change_median": "candidates/mean_dentropy_te/median",
        "random_entropy_change_median": "random/mean_dentropy_te/median",
        "top_frequency_alignment": "freq_projection/max_abs",
        "candidates_freq_mediated_median": "candidates/freq_mediated/median",
        "known_neurons_rho_rank_median": "known/rho_rank_median",
    }
    main_headline = "top_rho"  # the layer's strongest entropy-neuron candidate (null-space fraction)
    rank_by = ("rho", "ln_mediated", "w_out_norm", "mean_abs_dentropy_te", "freq_projection")

    def __init__(
        self,
        k: int | None = None,
        processed: bool = True,
        selection: str = "rho",
        candidates: int = 10,
        random_neurons: int = 10,
        n_windows: int = 16,
        skip_first: int = 3,
        frequency: str = "corpus",
        counts_file: str | None = None,
        known_neurons: list[int] | None = None,
        bootstrap: int = 1000,
        noise_draws: int = 3,
        seed: int = 0,
    ):
        self.k = k
        self.processed = processed
        self.selection = selection
        self.candidates = candidates
        self.random_neurons = random_neurons
        self.n_windows = n_windows
        self.skip_first = skip_first
        self.frequency = frequency
        self.counts_file = counts_file
        self.known_neurons = known_neurons
        self.bootstrap = bootstrap
        self.noise_draws = noise_draws
        self.seed = seed
        if k is not None and k < 1:
            raise ConfigError("analysis.k", k, "null (the paper's k, else 1% of d_model) or an integer >= 1")
        if selection not in SELECTIONS:
            raise ConfigError("analysis.selection", selection, SELECTIONS)
        for key in ("candidates", "random_neurons", "n_windows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"analysis.{key}", getattr(self, key), "an integer >= 1")
        if bootstrap != 0 and bootstrap < 100:  # fewer leave a 2.5% tail of two or three replicates
            raise ConfigError("analysis.bootstrap", bootstrap, "0 (no intervals) or an integer >= 100")
        if noise_draws < 0:
            raise ConfigError("analysis.noise_draws", noise_draws, "0 (no check) or an integer >= 1")
        if skip_first < 0:
            raise ConfigError("analysis.skip_first", skip_first, "an integer >= 0")
        if frequency not in FREQUENCY:
            raise ConfigError("analysis.frequency", frequency, FREQUENCY)
        if known_neurons is not None and any(n < 0 for n in known_neurons):
            raise ConfigError("analysis.known_neurons", known_neurons, "neuron indices >= 0")
        if counts_file is not None:
            from pathlib import Path

            from intraneuron.analyses.confidence.frequency import COUNT_FORMATS

            if frequency != "counts_file":
                raise ConfigError("analysis.frequency", frequency, "counts_file when analysis.counts_file is set")
            if Path(counts_file).suffix not in COUNT_FORMATS or not Path(counts_file).is_file():
                raise ConfigError("analysis.counts_file", counts_file, f"an existing file ending in one of {COUNT_FORMATS}")
        elif frequency == "counts_file":
            raise ConfigError("analysis.counts_file", None, "a count file when analysis.frequency=counts_file")

    def requirements(self, run) -> Requirements:
        # topk and histogram serve the cards; the ablations run their own passes (write hooks)
        return Requirements(stats=frozenset({"topk", "histogram", "moments"}), passes="intervene")

    def setting(self, run) -> str:
        return f"{'processed' if self.processed else 'raw'} weights, candidates by {self.selection}"

    def check(self, run) -> None:
        if self.skip_first >= run.corpus.window_len - 1:
            raise ConfigError("analysis.skip_first", self.skip_first, f"< corpus.window_len - 1 = {run.corpus.window_len - 1}")

    def check_model(self, run, handle) -> None:
        from intraneuron.models.weights import weight_layout

        layout = weight_layout(handle)  # raises for an architecture without weight access
        if layout.final_norm is None:
            raise ConfigError("model.source", run.model.source, "a decoder with a final norm and an unembedding")
        if self.processed and not layout.processable:
            raise ConfigError("analysis.processed", True, f"false for {handle.config.model_type}")
        if self.k is not None and self.k >= handle.d_model:
            raise ConfigError("analysis.k", self.k, f"< d_model={handle.d_model}")
        if self.known_neurons and max(self.known_neurons) >= handle.d_mlp:
            raise ConfigError("analysis.known_neurons", self.known_neurons, f"neuron indices < d_mlp={handle.d_mlp}")
        wanted = self.candidates + self.random_neurons
        if wanted > handle.d_mlp:
            raise ConfigError("analysis.candidates", self.candidates,
                              f"candidates + random_neurons <= d_mlp={handle.d_mlp}")  # fmt: skip

    def prepare(self, job: Job) -> None:
        """The unembedding, its spectrum and the frequency direction: shared by every layer."""
        from intraneuron.analyses.confidence.entropy_stats import paper_k, unembedding_spectrum
        from intraneuron.models.weights import unembedding

        self.unembed_ = unembedding(job.handle, self.processed)
        self.U_, self.S_ = unembedding_spectrum(self.unembed_.W_U)
        self.k_ = self.k if self.k is not None else paper_k(job.handle.model_id, job.handle.d_model)
        self.noise_ = None
        if self.noise_draws:
            from intraneuron.analyses.confidence.quantisation import null_space_under_noise

            raw = unembedding(job.handle, processed=False, n_vocab=self.unembed_.n_vocab)
            self.noise_ = null_space_under_noise(raw.W_U, raw.norm if self.processed else None, self.k_,
                                                 self.noise_draws, self.seed)  # fmt: skip
        self.log_p_freq_ = self.u_ = None
        if self.frequency != "none":
            from intraneuron.analyses.confidence.frequency import (
                counts_from_file,
                counts_from_windows,
                frequency_direction,
                unigram_distribution,
            )

            vocab = self.unembed_.n_vocab
            counts = (counts_from_windows(np.asarray(job.windows.ids), vocab) if self.frequency == "corpus"
                      else counts_from_file(self.counts_file, vocab))  # fmt: skip
            p_freq = unigram_distribution(counts)
            self.log_p_freq_ = p_freq.log().float()
            self.u_ = frequency_direction(p_freq)

    def analyse_layer(self, job: Job, layer: int, profile) -> LayerResult:
        from intraneuron.analyses.confidence.entropy_stats import entropy_table
        from intraneuron.analyses.confidence.figures import layer_figures
        from intraneuron.models.weights import neuron_weights

        weights = neuron_weights(job.handle, layer, self.processed)
        table = entropy_table(weights, self.unembed_.W_U, self.U_, self.k_)
        if self.u_ is not None:
            from intraneuron.analyses.confidence.frequency import frequency_projection

            table["freq_projection"] = frequency_projection(weights.w_out, self.unembed_.W_U, self.u_).numpy()
        roles = self._select(table, layer)
        for neuron in self.known_neurons or []:  # the literature's entropy neurons get ablated too
            roles.setdefault(int(neuron), "known")
        effects, replicates = self._effects(job, layer, roles)
        table["role"] = table["neuron"].map(roles).fillna("")
        table["known"] = table["neuron"].isin(self.known_neurons or [])
        table = table.merge(effects, on="neuron", how="left")
        metrics = layer_metrics(table)
        if replicates:
            metrics |= role_intervals(replicates, effects["neuron"].to_numpy(), table)
        floor = None
        if self.noise_ is not None:
            metrics |= self.noise_.metrics
            floor = self.noise_.metrics["unembedding_noise/noise_floor"]
        figures = layer_figures(table, self.S_, self.k_, layer, job.run.model.name, floor)
        # how the weights were read (raw, or which TL processing steps), for the record
        steps = pd.DataFrame({"object": ["neuron weights"] * len(weights.steps) + ["unembedding"] * len(self.unembed_.steps),
                              "step": [*weights.steps, *self.unembed_.steps]})  # fmt: skip
        tables = {"neurons": table, "weight_processing": steps}
        if self.noise_ is not None:
            tables["unembedding_noise"] = self.noise_.table
        return LayerResult(tables=tables, metrics=metrics, figures=figures, reasons=layer_reasons(table, metrics))

    def _select(self, table: pd.DataFrame, layer: int) -> dict[int, str]:
        """neuron -> "candidate" (top by the selection rule) or "random" (the baseline)."""
        if self.selection == "rho":
            score = table["rho"]
        else:  # the paper's figure: large norm, small LogitVar
            score = np.log(table["w_out_norm"]) - np.log(table["logit_var"].clip(lower=1e-30))
        order = score.fillna(-np.inf).sort_values(ascending=False, kind="stable").index
        candidates = table.loc[order[: self.candidates], "neuron"].tolist()
        rest = np.setdiff1d(table["neuron"].to_numpy(), candidates)
        rng = np.random.default_rng((self.seed, layer))
        randoms = sorted(rng.choice(rest, size=min(self.random_neurons, rest.size), replace=False).tolist())
        return {**{int(n): "candidate" for n in candidates}, **{int(n): "random" for n in randoms}}

    def _effects(self, job: Job, layer: int, roles: dict[int, str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """One row per ablated neuron (sorted) with its effects and their intervals; the bootstrap
        replicates, name -> [R, m] in the rows' order (empty with analysis.bootstrap=0)."""
        from intraneuron.analyses.confidence.effects import final_layer_effects, rerun_effects
        from intraneuron.analyses.confidence.forward import (
            clean_pass,
            drop_token_ids,
            token_filter,
        )
        from intraneuron.models.weights import neuron_weights, unembedding

        handle = job.handle
        ids = torch.from_numpy(np.asarray(job.windows.ids[: self.n_windows], dtype=np.int64))  # [B, T]
        neurons = torch.tensor(sorted(roles), dtype=torch.long)
        clean = clean_pass(handle, ids, layer, neurons)  # one full pass serves the means and the effects
        # the ablation value: each neuron's mean over every token of the sample, before any filter
        means = clean.acts.double().mean((0, 1)).float()  # [m]
        mask = token_filter(ids, self.skip_first, drop_token_ids(handle.tokenizer))
        freq = {"freq_direction": self.u_, "log_p_freq": self.log_p_freq_}
        if layer == handle.n_layers - 1:
            w_out = neuron_weights(handle, layer, processed=False).w_out[neurons]
            raw = unembedding(handle, processed=False, n_vocab=self.unembed_.n_vocab)
            effects = final_layer_effects(clean, w_out, raw, means, mask=mask, **freq)
        else:
            effects = rerun_effects(handle, ids, layer, neurons, means, mask=mask, clean=clean, **freq)
        out = effects.table().drop(columns=["layer"])
        replicates = {}
        if self.bootstrap:
            from intraneuron.analyses.confidence.bootstrap import (
                interval_columns,
                window_replicates,
            )

            replicates = window_replicates(effects, self.bootstrap, seed=(self.seed, layer))
            out = out.assign(**interval_columns(replicates))
        out["ablation_value"] = means.numpy()
        out["ablation_tokens"] = effects.n_tokens
        return out, replicates


def layer_metrics(table: pd.DataFrame) -> dict[str, float]:
    from intraneuron.stats.summary import distribution

    metrics = {
        "rho/random_level": float(table["rho_random_level"].iloc[0]),
        "rho/max": float(table["rho"].max()),
        "k": float(table["k"].iloc[0]),
    }
    for stat, value in distribution(table["rho"]).items():
        metrics[f"rho/{stat}"] = value
    if "freq_projection" in table:
        metrics["freq_projection/max_abs"] = float(table["freq_projection"].abs().max())
    known = table[table["known"]]
    if len(known):  # do the literature's entropy neurons come out on top here?
        metrics["known/rho_rank_median"] = float(known["rho_rank"].median())
        metrics["known/in_candidates_frac"] = float((known["role"] == "candidate").mean())
        metrics["known/ln_mediated_median"] = float(known["ln_mediated"].median())
    for role, prefix in (("candidate", "candidates"), ("random", "random")):
        rows = table[table["role"] == role]
        for column in ("rho", "w_out_norm", "ln_mediated", "freq_mediated", "mean_dentropy_te",
                       "mean_abs_dloss_te", "argmax_change_rate"):  # fmt: skip
            if column in rows:
                for stat, value in distribution(rows[column]).items():
                    metrics[f"{prefix}/{column}/{stat}"] = value
    return metrics


def role_intervals(replicates: dict[str, np.ndarray], neurons: np.ndarray, table: pd.DataFrame) -> dict[str, float]:
    """The bootstrap intervals of the per-role medians (candidates, random, known): metrics
    <prefix>/<effect>/median_lo and _hi. neurons [m]: the replicates' columns."""
    from intraneuron.analyses.confidence.bootstrap import median_intervals

    rows = table.set_index("neuron")
    out: dict[str, float] = {}
    for role, prefix in (("candidate", "candidates"), ("random", "random"), ("known", "known")):
        chosen = rows["known"] if role == "known" else rows["role"] == role
        columns = np.flatnonzero(np.isin(neurons, chosen[chosen].index.to_numpy()))
        out |= median_intervals(replicates, columns, prefix)
    return out


def layer_reasons(table: pd.DataFrame, metrics: dict[str, float]) -> dict[str, str]:
    """Why a layer metric is NaN: a mediated share (1 - |direct| / |total|) is undefined for
    neurons whose ablation changes no loss at all (e.g. dead ones)."""
    from intraneuron.analyses.reasons import counted, nan_reasons

    rules = []
    for role, prefix in (("candidate", "candidates"), ("random", "random"), ("known", "known")):
        rows = table[table["known"]] if role == "known" else table[table["role"] == role]
        if "mean_abs_dloss_te" in rows and len(rows) and (rows["mean_abs_dloss_te"] == 0).all():
            why = "no loss effect: " + counted(["ablation changes no loss"] * len(rows), len(rows), f"{role} neurons")
            rules += [(f"{prefix}/ln_mediated", why), (f"{prefix}/freq_mediated", why)]
    return nan_reasons(metrics, rules)
