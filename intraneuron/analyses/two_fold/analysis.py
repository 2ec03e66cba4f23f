"""The two-fold intra-neuronal analysis of Pichat et al. (2025) behind the Analysis seam.

Per layer: the selected neurons' core tokens, their vectors, then per neuron the top-down
(categories and how their activations differ and interleave) and bottom-up (activation segments and
their homogeneity against a permutation null) analyses, and the layer aggregates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from tqdm.auto import tqdm

from intraneuron.analyses.base import Analysis, Job, LayerResult, NeuronView, Requirements
from intraneuron.analyses.merge import check_disjoint, concat_by_neuron, same_table, shard_metric
from intraneuron.analyses.neurons import NeuronsConfig
from intraneuron.analyses.two_fold.clustering import ClusteringConfig
from intraneuron.analyses.two_fold.core_tokens import CoreTokensConfig
from intraneuron.analyses.two_fold.geometry_null import MIN_NULL, SELECTIVITY_MATCH
from intraneuron.analyses.two_fold.intervals import companion_metrics, timed_layer_intervals
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron
from intraneuron.analyses.two_fold.segmentation import SegmentationConfig
from intraneuron.analyses.two_fold.variants import VariantUnits, variant_keys, word_pool
from intraneuron.embeddings.config import EmbeddingConfig
from intraneuron.errors import ConfigError
from intraneuron.extraction.engine import progress_interval

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class TwoFoldAnalysis(Analysis):
    """Top-down categories and bottom-up activation segments of each neuron's core tokens (Pichat et al. 2025).

    `analysis=two_fold`: homogeneity null, permutations, alpha, seed, workers and the geometry
    null's minimum size and selectivity matching.
    """

    name = "two_fold"
    groups: ClassVar = {
        "neurons": NeuronsConfig,
        "core_tokens": CoreTokensConfig,
        "embedding": EmbeddingConfig,
        "clustering": ClusteringConfig,
        "segmentation": SegmentationConfig,
    }
    headline = {
        "neurons_analysed": "neurons/analysed",
        "core_tokens_mean": "core_tokens/n_mean",
        "differentiated_frac": "topdown/kruskal_sig_frac_bh",  # categories differ in activation (BH)
        "differentiation_effect_median": "topdown/epsilon2/median",
        "interleaving_median": "topdown/interleaving_mean/median",
        "top_segment_homogeneous_frac": "bottomup/top_sig_frac_bh",  # top segment above its null (BH)
        "top_segment_above_null_p": "bottomup/sign_test_p",  # the layer: top above its null median?
        "top_minus_rest_homogeneity_median": "bottomup/h_top_minus_rest/median",
        "category_segment_ari_median": "homomorphism/ari/median",
        "activation_cosine_mantel_frac": "homomorphism/mantel_sig_frac_bh",
        # against the layer's pseudo-neurons (geometry alone) rather than each neuron's own null
        "no_categories_frac": "neurons/topdown_skipped_frac",  # K = 1 (gap statistic) or too few tokens
        "top_segment_above_geometry_frac": "geometry/z_top_sig_frac_bh",
        "differentiation_above_geometry_frac": "geometry/epsilon2_sig_frac_bh",
    }

    main_headline = "differentiated_frac"
    companions = companion_metrics(headline)  # pseudo value, excess and intervals of the headlines

    # neurons-table columns a card selection ranks by (report.top_by); the first is the default:
    # how strongly the categories differ in activation
    rank_by = ("epsilon2", "h_top_minus_rest", "z_top", "mantel_rho", "silhouette", "act_max", "n_tokens")

    def __init__(
        self,
        homogeneity: str = "pairwise",
        n_permutations: int = 1000,
        max_permutations: int = 100_000,
        n_mantel_permutations: int = 999,
        mantel_distance: str = "rank",
        alpha: float = 0.05,
        seed: int = 0,
        n_jobs: int = -1,
        min_pseudo_neurons: int = MIN_NULL,
        selectivity_match: int = SELECTIVITY_MATCH,
        interval_blocks: int = 10,
        interval_neurons: int = 64,
    ):
        self.homogeneity = homogeneity
        self.n_permutations = n_permutations
        self.max_permutations = max_permutations
        self.n_mantel_permutations = n_mantel_permutations
        self.mantel_distance = mantel_distance
        self.alpha = alpha
        self.seed = seed
        self.n_jobs = n_jobs
        self.min_pseudo_neurons = min_pseudo_neurons
        self.selectivity_match = selectivity_match
        self.interval_blocks = interval_blocks
        self.interval_neurons = interval_neurons
        # the per-neuron settings are checked where they are used, once, with their config keys
        TwoFoldNeuron(homogeneity=homogeneity, n_permutations=n_permutations,
                      max_permutations=max_permutations,
                      n_mantel_permutations=n_mantel_permutations, mantel_distance=mantel_distance,
                      alpha=alpha)  # fmt: skip
        if n_jobs == 0 or n_jobs < -1:
            raise ConfigError("analysis.n_jobs", n_jobs, "an integer >= 1, or -1 for all cores")
        if not _integer(min_pseudo_neurons) or min_pseudo_neurons < 20:
            # below 19 draws no empirical p reaches 0.05
            raise ConfigError("analysis.min_pseudo_neurons", min_pseudo_neurons, "an integer >= 20")
        if not _integer(selectivity_match) or 0 < selectivity_match < min_pseudo_neurons or selectivity_match < 0:
            raise ConfigError("analysis.selectivity_match", selectivity_match,
                              f"0 (all pseudo-neurons) or an integer >= analysis.min_pseudo_neurons ({min_pseudo_neurons})")  # fmt: skip
        if not _integer(interval_blocks) or interval_blocks < 0 or interval_blocks == 1:
            raise ConfigError("analysis.interval_blocks", interval_blocks, "0 (no intervals) or an integer >= 2")
        if not _integer(interval_neurons) or interval_neurons < 2:
            raise ConfigError("analysis.interval_neurons", interval_neurons, "an integer >= 2")

    def requirements(self, run) -> Requirements:
        # Every statistic the two-fold analysis can read, whatever this run's options: one cached
        # profile then serves a sweep over core-token rules, cross-fitting, embeddings and clusterers.
        from intraneuron.extraction import STAT_NAMES

        stats = set(STAT_NAMES)
        if run.extraction.input_site is None:
            stats.discard("input_token_types")
        if not run.extraction.pseudo_neurons:
            stats.discard("pseudo_neurons")
        return Requirements(stats=frozenset(stats), blocks=self.interval_blocks)

    def check(self, run) -> None:
        run.groups["core_tokens"].check_against_top_k(run.extraction.top_k)
        if self.interval_blocks and run.extraction.corpus_shards > 1:  # one job extracts every block
            raise ConfigError("analysis.interval_blocks", self.interval_blocks,
                              "0 with extraction.corpus_shards > 1 (corpus intervals need the whole corpus in one job)")  # fmt: skip
        if run.groups["embedding"].per_layer and run.extraction.input_site is None:
            raise ConfigError(
                "embedding.source", "layer_input", "another source while extraction.input_site is null"
            )

    def prepare(self, job: Job) -> None:
        """The neuron settings, clusterer, filters, WordNet labels and (unless per layer) the
        vectors: everything that can fail on a missing file or checkpoint, before the pass."""
        groups = job.run.groups
        if self.interval_blocks > (n_windows := int(job.windows.ids.shape[0])):
            raise ConfigError("analysis.interval_blocks", self.interval_blocks,
                              f"at most the corpus's {n_windows} windows, or 0 (no intervals)")  # fmt: skip
        clustering, segmentation = groups["clustering"], groups["segmentation"]
        self.neuron_ = TwoFoldNeuron(
            make_clusterer=clustering.factory() if clustering.categories == "clusterer" else None,
            normalize=clustering.normalize,
            n_categories=clustering.n_categories,
            k_range=tuple(clustering.k_range),
            k_choice=clustering.k_choice,
            n_references=clustering.n_references,
            reference=clustering.reference,
            mantel_distance=self.mantel_distance,
            scheme=segmentation.scheme,
            n_segments=segmentation.n_segments,
            top_fraction=segmentation.top_fraction,
            homogeneity=self.homogeneity,
            n_permutations=self.n_permutations,
            max_permutations=self.max_permutations,
            n_mantel_permutations=self.n_mantel_permutations,
            alpha=self.alpha,
            min_tokens=groups["core_tokens"].min_core_tokens,
        )
        core_tokens, tokenizer = groups["core_tokens"], job.handle.tokenizer
        words = None
        if core_tokens.pool == "words":
            pieces = tokenizer.convert_ids_to_tokens(list(range(job.handle.vocab_size)))
            words = word_pool(job.token_texts, pieces, job.windows.ids)
        self.keep_ = core_tokens.keep_mask(job.token_texts, getattr(tokenizer, "all_special_ids", ()), words)
        self.variants_ = variant_keys(job.token_texts) if core_tokens.merge_variants else None
        self.label_ = clustering.labeller(job.token_texts)
        self.category_names_ = clustering.category_names()
        embedding = groups["embedding"]
        self.vectors_ = None if embedding.per_layer else embedding.build(job.handle)

    def analyse_layer(self, job: Job, layer: int, profile) -> LayerResult:
        started = time.perf_counter()
        groups = job.run.groups
        neurons = groups["neurons"].indices(job.handle.d_mlp)
        tables = self._analyse(job, layer, profile, neurons, progress_label=f"analyse layer {layer}")
        if (pseudo := profile.pseudo()) is not None:
            # the layer's geometry null: random read-in directions through the same pipeline
            pseudo_tables = self._analyse(job, layer, pseudo, np.arange(pseudo.d_mlp), pseudo=True,
                                          progress_label=f"pseudo-neurons layer {layer}")  # fmt: skip
            tables["pseudo_neurons"] = pseudo_tables["neurons"]
        metrics = self._layer_metrics(tables, labelled=self.label_ is not None)
        metrics["analysis_seconds"] = time.perf_counter() - started
        if blocks := job.blocks.get(layer):
            metrics.update(self._intervals(job, layer, blocks, tables, metrics))
        rows = tables["neurons"]
        for skipped in rows.loc[rows["skipped"] != "", ["neuron", "skipped"]].head(5).itertuples():
            log.info("layer %d neuron %d skipped: %s", layer, skipped.neuron, skipped.skipped)
        return self._result(layer, tables, metrics)

    def _intervals(self, job: Job, layer: int, blocks: Sequence, tables: dict, metrics: dict) -> dict[str, float]:
        """The headline fractions' corpus intervals (intervals.py) and what they cost."""
        def analyse(profile, ids, pseudo):
            label = f"{'pseudo-neurons' if pseudo else 'neurons'} layer {layer}, interval replicate"
            return self._analyse(job, layer, profile, ids, pseudo=pseudo, progress_label=label)["neurons"]

        return timed_layer_intervals(analyse, blocks, tables["neurons"], tables.get("pseudo_neurons"), metrics,
                                     n=self.interval_neurons, seed=self.seed, layer=layer, alpha=self.alpha,
                                     min_null=self.min_pseudo_neurons, match=self.selectivity_match)  # fmt: skip

    def merge_layer(self, run, layer: int, shards: list[dict[str, pd.DataFrame]]) -> LayerResult:
        """One layer from shard jobs over disjoint neuron sets: their per-neuron tables
        concatenated (by neuron), the pseudo-neurons' table (the same in every shard: the same
        seeded directions and pipeline) once, and the neurons' geometry excess and the layer
        metrics recomputed from them by the code `analyse_layer` runs, so the result is the one
        job's. analysis_seconds: the shards' sum."""
        from intraneuron.analyses.two_fold.layer import TABLES

        check_disjoint(shards)
        tables = {name: concat_by_neuron([shard.get(name) for shard in shards]) for name in TABLES}
        pseudo = [shard.get("pseudo_neurons") for shard in shards]
        if any(p is not None for p in pseudo):
            tables["pseudo_neurons"] = same_table(pseudo, "pseudo_neurons")
        labelled = run.groups["clustering"].categories == "wordnet"
        metrics = self._layer_metrics(tables, labelled=labelled)
        metrics["analysis_seconds"] = float(sum(shard_metric(shard, "analysis_seconds") for shard in shards))
        return self._result(layer, tables, metrics)

    def _result(self, layer: int, tables: dict[str, pd.DataFrame], metrics: dict[str, float]) -> LayerResult:
        """The LayerResult of the layer's tables and metrics: its figures and why a metric is NaN."""
        from intraneuron.analyses.two_fold.figures import layer_figures
        from intraneuron.analyses.two_fold.reasons import layer_reasons

        reasons = layer_reasons(tables["neurons"], tables.get("pseudo_neurons"), metrics,
                                mantel=self.n_mantel_permutations > 0, min_null=self.min_pseudo_neurons)  # fmt: skip
        return LayerResult(tables=tables, metrics=metrics, figures=layer_figures(tables, layer, self.alpha),
                           reasons=reasons)  # fmt: skip

    def missing_reason(self, row, column: str) -> str:
        from intraneuron.analyses.two_fold.reasons import neuron_reason

        return neuron_reason(row, column, self.min_pseudo_neurons)

    def _layer_metrics(self, tables: dict[str, pd.DataFrame], *, labelled: bool) -> dict[str, float]:
        """The layer metrics (and, in place, the neurons table's geometry excess against the
        pseudo-neurons when `tables` has them) from the per-neuron tables of the layer's neurons;
        one code path for one job (`analyse_layer`) and for merged shards (`merge_layer`).
        labelled: categories are WordNet labels (label coverage is then a metric)."""
        from intraneuron.analyses.two_fold.aggregate import aggregate_layer, geometry_excess

        rows, pseudo_rows = tables["neurons"], tables.get("pseudo_neurons")
        null = {"min_null": self.min_pseudo_neurons, "match": self.selectivity_match}
        if pseudo_rows is not None:
            rows = tables["neurons"] = geometry_excess(rows, pseudo_rows, **null)
        metrics = aggregate_layer(rows, self.alpha, pseudo_rows, **null, judged=pseudo_rows is not None)
        metrics["core_tokens/n_mean"] = float(rows["n_core"].mean()) if len(rows) else np.nan
        metrics["core_tokens/overlap_median"] = float(rows["core_overlap"].median()) if len(rows) else np.nan
        metrics["core_tokens/reliability_median"] = float(rows["core_reliability"].median()) if len(rows) else np.nan
        metrics["core_tokens/unselective_frac"] = (
            float(rows["skipped"].str.startswith(("selectivity", "constant")).mean()) if len(rows) else np.nan
        )
        metrics["embedding/unembedded_frac"] = _ratio(rows, "n_unembedded", "n_core")
        if labelled:
            metrics["categories/label_coverage_mean"] = float(rows["label_coverage"].mean())
        return metrics

    def _analyse(self, job: Job, layer: int, profile, neurons: np.ndarray, *, pseudo: bool = False,
                 progress_label: str = "") -> dict:  # fmt: skip
        """The per-neuron tables of `neurons` of `profile` (the layer's, or its pseudo-neurons')."""
        from intraneuron.analyses.two_fold.layer import analyse_layer

        groups = job.run.groups
        vectors = self._vectors(job, layer, profile if not pseudo else None)
        units = self._units(profile)
        cores = groups["core_tokens"].select(profile, neurons, self.keep_, units)
        embed, decode = self._unit_embed_decode(job, units, vectors)
        bar = tqdm(total=len(cores), unit="neuron", desc=progress_label,
                   disable=not job.run.extraction.progress, mininterval=progress_interval())  # fmt: skip
        tables = analyse_layer(
            layer, cores, embed, self.neuron_,
            label=self.label_,
            decode=decode,
            read_in=self._read_in(job, layer, pseudo),
            seed=self.seed,
            stream=(1,) if pseudo else (),
            n_jobs=self.n_jobs,
            progress=bar.update,
        )  # fmt: skip
        bar.close()
        return tables

    def _units(self, profile) -> VariantUnits | None:
        """The profile's variant units (core_tokens.merge_variants), or None when they stay apart."""
        return None if self.variants_ is None else VariantUnits.from_profile(self.variants_, profile, self.keep_)

    def _unit_embed_decode(self, job: Job, units: VariantUnits | None, vectors):
        """(embed, decode) of core-token ids: over the forms of each unit when variants merge."""
        texts = job.token_texts
        if units is None:
            return vectors.embed, lambda ids: [texts[i] for i in ids]
        return units.embed(vectors.embed), units.describe(texts)

    def _read_in(self, job: Job, layer: int, pseudo: bool):
        """neuron -> its read-in directions [r, d_model], or None when the projection is off."""
        if not job.run.groups["embedding"].project_read_in:
            return None
        key = (layer, pseudo)
        if getattr(self, "read_in_", (None,))[0] != key:  # one layer at a time, for the cards too
            from intraneuron.analyses.two_fold.geometry import read_in_directions

            if pseudo:
                from intraneuron.extraction.pseudo import pseudo_read_in

                extraction = job.run.extraction
                pseudo = pseudo_read_in(job.handle, layer, extraction.pseudo_neurons, extraction.pseudo_seed)
                directions = pseudo.directions.numpy()  # [n, r, d_model]
            else:
                directions = read_in_directions(job.handle, layer)
            self.read_in_ = (key, directions)
        directions = self.read_in_[1]
        return lambda neuron: directions[neuron]

    def _vectors(self, job: Job, layer: int, profile):
        """The layer's vectors (profile None: the ones already built for this layer; pseudo-neurons
        embed their tokens with the layer's real input means)."""
        if self.vectors_ is not None:
            return self.vectors_
        if profile is None:
            return self.layer_vectors_[1]
        if getattr(self, "layer_vectors_", (None,))[0] != layer:  # built once per layer, for the cards too
            self.layer_vectors_ = (layer, job.run.groups["embedding"].build(job.handle, profile))
        return self.layer_vectors_[1]

    def setting(self, run) -> str:
        return f"{run.groups['clustering'].label()}, {run.groups['core_tokens'].label()}"

    def neuron_view(self, job: Job, layer: int, profile, neuron: int) -> NeuronView:
        """The neuron's core tokens by category (as its row of the tables was computed: same
        tokens, vectors, categories and seed) and its activation-by-category, homogeneity-by-segment
        and 2-D projection figures."""
        from intraneuron.analyses.two_fold.geometry import project_out
        from intraneuron.analyses.two_fold.neuron_figures import neuron_figures
        from intraneuron.reports.cards import category_summary

        groups, units = job.run.groups, self._units(profile)
        contrast = groups["core_tokens"].versus_contexts()
        core = groups["core_tokens"].select(profile, np.array([neuron]), self.keep_, units)[0]
        embed, decode = self._unit_embed_decode(job, units, self._vectors(job, layer, profile))
        if core.skipped:
            tokens = list(zip(decode(core.token_ids), core.acts.tolist(), strict=True))
            return NeuronView({"core tokens": tokens}, note=core.skipped, summary=f"skipped: {core.skipped}",
                              contrast=contrast)  # fmt: skip
        X, valid = embed(core.token_ids)
        ids, acts, X = core.token_ids[valid], core.acts[valid], X[valid]
        texts = dict(zip(ids.tolist(), decode(ids), strict=True))
        if (read_in := self._read_in(job, layer, pseudo=False)) is not None:
            X = project_out(X, read_in(neuron))
        labels = self.label_(ids) if self.label_ is not None else None
        result = self.neuron_.analyse(acts, X, labels, seed=(self.seed, layer, neuron))
        if result.token_labels is None:  # skipped: too few core tokens
            tokens = [(texts[i], float(a)) for i, a in zip(ids, acts, strict=True)]
            skipped = str(result.row["skipped"])
            return NeuronView({"core tokens": tokens}, note=skipped, summary=f"skipped: {skipped}", contrast=contrast)
        names = self._category_names(result.token_labels)
        by_mean = sorted(names, key=lambda c: (c < 0, -acts[result.token_labels == c].mean()))
        token_groups = {}
        for c in by_mean:
            members = np.flatnonzero(result.token_labels == c)
            members = members[np.argsort(-acts[members], kind="stable")]
            token_groups[names[c]] = [(texts[ids[i]], float(acts[i])) for i in members]
        how = "WordNet supersenses" if self.label_ is not None else f"clusters of {groups['embedding'].source} vectors"
        note = f"core tokens ({groups['core_tokens'].rule}) grouped by {how}, categories by mean activation"
        figures = neuron_figures(acts, X, result, layer, neuron, category_names=names, alpha=self.alpha)
        row = result.row
        categories = {t: g for c, t in names.items() if c >= 0 and (g := token_groups.get(t))}
        summary = (category_summary(categories, f"differentiated p={row['kruskal_p']:.2g} (Kruskal-Wallis, "
                                                f"epsilon2 {row['epsilon2']:.2f})")
                   if row.get("topdown_skipped", "") == "" else f"no categories: {row['topdown_skipped']}")  # fmt: skip
        return NeuronView(token_groups, figures, note, summary=summary, contrast=contrast)

    def _category_names(self, labels: np.ndarray) -> dict[int, str]:
        names = {}
        for c in np.unique(labels).tolist():
            if c < 0:
                names[c] = "uncovered (no category)"
            elif self.category_names_ is not None:
                names[c] = self.category_names_[c]
            else:
                names[c] = f"category {c}"
        return names


def _integer(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _ratio(rows, numerator: str, denominator: str) -> float:
    total = rows[denominator].sum() if len(rows) else 0
    return float(rows[numerator].sum() / total) if total else np.nan
