"""The whole two-fold analysis of one neuron: a flat row of scalars plus small tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from intraneuron.analyses.two_fold.bottomup import (
    bottom_up,
    cosine_matrix,
    validate_max_permutations,
    validate_null,
)
from intraneuron.analyses.two_fold.clustering import (
    ClustererFactory,
    categories_from_labels,
    fit_categories,
    preset_factory,
    validate_k_choice,
)
from intraneuron.analyses.two_fold.homomorphism import (
    adjusted_rand,
    mantel_activation_cosine,
    partition_agreement,
    validate_mantel_distance,
)
from intraneuron.analyses.two_fold.segmentation import n_segments_of, segment, validate_segmentation
from intraneuron.analyses.two_fold.topdown import (
    interleaving_overlap_null,
    kruskal_epsilon2,
    top_down,
)
from intraneuron.errors import ConfigError
from intraneuron.stats.permutation import SeedLike, make_rng

# The top-down keys (steps 4-6): NaN when the neuron has no categories (row["topdown_skipped"]).
TOPDOWN_KEYS: tuple[str, ...] = (
    "n_categories", "n_uncovered", "silhouette",
    "kruskal_h", "kruskal_p", "epsilon2", "anova_f", "anova_p", "eta2",
    "n_pairs", "diff_rate", "level_rho", "level_p", "low_mean_delta_gap",
    "overlap_mean", "overlap_iqr_mean", "overlap_frac_positive", "interleaving_mean",
    "interleaving_null_mean", "interleaving_z", "interleaving_p_less",
    "overlap_null_mean", "overlap_z", "overlap_p_less",
)  # fmt: skip

# Every row has these keys, in this order, whatever was skipped (missing values are NaN), so rows
# of a layer stack into one rectangular table.
ROW_KEYS: tuple[str, ...] = (
    "skipped", "topdown_skipped", "n_tokens", "act_max", "act_min", "act_mean",
    *TOPDOWN_KEYS,
    # bottom-up (steps 7-8)
    "n_segments_used", "n_top", "h_all", "h_top", "h_rest", "h_top_minus_rest", "z_top", "p_top",
    "p_top_permutations", "p_top_method",
    "trend_rho", "trend_p",
    "successive_cos", "successive_null_mean", "successive_z", "successive_p_greater",
    "successive_p_less",
    # homomorphism (step 9)
    "ari", "ami", "mantel_rho", "mantel_p",
)  # fmt: skip


# Where each setting comes from in the config tree (error messages name these keys).
CONFIG_KEYS: dict[str, str] = {
    "make_clusterer": "clustering.estimator",
    "normalize": "clustering.normalize",
    "n_categories": "clustering.n_categories",
    "k_range": "clustering.k_range",
    "k_choice": "clustering.k_choice",
    "n_references": "clustering.n_references",
    "reference": "clustering.reference",
    "mantel_distance": "analysis.mantel_distance",
    "scheme": "segmentation.scheme",
    "n_segments": "segmentation.n_segments",
    "top_fraction": "segmentation.top_fraction",
    "homogeneity": "analysis.homogeneity",
    "n_permutations": "analysis.n_permutations",
    "max_permutations": "analysis.max_permutations",
    "n_mantel_permutations": "analysis.n_mantel_permutations",
    "alpha": "analysis.alpha",
    "min_tokens": "core_tokens.min_core_tokens",
}


@dataclass(frozen=True)
class NeuronResult:
    """row: flat scalars (ROW_KEYS); categories / pairs: top-down tables; segments: bottom-up;
    k_curve: one row per K of the K-curve (`k_curve_table`: k, gap, gap_sd, silhouette, epsilon2,
    kruskal_p, ari, chosen); empty for a fixed K, a clusterer that sets its own K or fixed labels.
    token_labels: [n_tokens] the category of each core token as the top-down analysis used it
    (-1 = uncovered), also when it was skipped for too few categories; segment_labels: [n_tokens]
    each token's activation segment (0 = highest). Both None for a skipped neuron; they let a
    neuron card redraw the tables' numbers token by token (`two_fold.neuron_figures`)."""

    row: dict[str, float | str]
    categories: pd.DataFrame
    segments: pd.DataFrame
    pairs: pd.DataFrame
    k_curve: pd.DataFrame = field(default_factory=pd.DataFrame)
    token_labels: np.ndarray | None = None
    segment_labels: np.ndarray | None = None


class TwoFoldNeuron(BaseEstimator):
    """Steps 4-9 of paper_methods.md 1.4 for one neuron at a time, with fixed settings.

    scikit-learn style: the constructor stores the settings and checks them once (a ConfigError
    names the config key that sets each one, see `CONFIG_KEYS`); `analyse` is then called per neuron.
    make_clusterer: k -> estimator with fit_predict (default: Ward on L2-normalised vectors, K by
    the gap statistic over K in 1 + k_range with n_references reference datasets drawn as
    `reference` says, or by the silhouette when k_choice="silhouette"; our default, not the
    paper's). K = 1 (no categorical
    structure) skips the top-down analysis. Interleaving and range overlap get a permutation null
    (n_permutations shuffles of the activations over fixed categories); the Mantel test uses
    mantel_distance ("rank": |rank_i - rank_j|, "absolute": |a_i - a_j|). Segments: `scheme` with n_segments
    (default 10 equal-count segments, our default); homogeneity null with n_permutations; Mantel
    test with n_mantel_permutations (0: rho only). A neuron with fewer than min_tokens core tokens
    is skipped (row["skipped"] says why); one with fewer than 2 categories gets bottom-up results
    only (row["topdown_skipped"]).
    """

    def __init__(
        self,
        make_clusterer: ClustererFactory | None = None,
        normalize: bool = True,
        n_categories: int | None = None,
        k_range: tuple[int, int] = (2, 8),
        k_choice: str = "gap",
        n_references: int = 10,
        reference: str = "sd_box",
        mantel_distance: str = "rank",
        scheme: str = "equal_count",
        n_segments: int = 10,
        top_fraction: float = 0.9,
        homogeneity: str = "pairwise",
        n_permutations: int = 1000,
        n_mantel_permutations: int = 999,
        alpha: float = 0.05,
        min_tokens: int = 10,
        max_permutations: int = 100_000,
    ):
        self.make_clusterer = make_clusterer
        self.normalize = normalize
        self.n_categories = n_categories
        self.k_range = k_range
        self.k_choice = k_choice
        self.n_references = n_references
        self.reference = reference
        self.mantel_distance = mantel_distance
        self.scheme = scheme
        self.n_segments = n_segments
        self.top_fraction = top_fraction
        self.homogeneity = homogeneity
        self.n_permutations = n_permutations
        self.n_mantel_permutations = n_mantel_permutations
        self.alpha = alpha
        self.min_tokens = min_tokens
        self.max_permutations = max_permutations
        self._validate()

    def _validate(self) -> None:
        validate_k_choice(
            self.n_categories, tuple(self.k_range), self.k_choice, self.n_references, self.reference
        )
        validate_mantel_distance(self.mantel_distance)
        validate_segmentation(self.scheme, self.n_segments, self.top_fraction)
        validate_null(self.homogeneity, self.n_permutations)
        validate_max_permutations(self.n_permutations, self.max_permutations)
        if not isinstance(self.n_mantel_permutations, int | np.integer) or self.n_mantel_permutations < 0:
            raise ConfigError(CONFIG_KEYS["n_mantel_permutations"], self.n_mantel_permutations, "an integer >= 0")
        validate_alpha(self.alpha)
        if not isinstance(self.min_tokens, int | np.integer) or self.min_tokens < 3:
            raise ConfigError(CONFIG_KEYS["min_tokens"], self.min_tokens, "an integer >= 3")

    def analyse(
        self, acts: np.ndarray, X: np.ndarray, labels: np.ndarray | None = None, seed: SeedLike = 0
    ) -> NeuronResult:
        """acts: [n_tokens] core-token activations; X: [n_tokens, d] their vectors; labels:
        [n_tokens] precomputed categories (-1 = uncovered) or None to cluster X.
        seed: anything np.random.default_rng takes; pass e.g. (run_seed, layer, neuron) so that
        neurons draw independent permutations."""
        acts = np.asarray(acts, dtype=np.float64)
        X = np.asarray(X)
        if acts.ndim != 1 or X.ndim != 2 or X.shape[0] != acts.size:
            raise ValueError(f"acts [n] and X [n, d] must agree, got {acts.shape} and {X.shape}")
        if labels is not None and np.shape(labels) != acts.shape:
            raise ValueError(f"labels must have shape {acts.shape}, got {np.shape(labels)}")
        if not np.isfinite(acts).all():
            raise ValueError("activations contain NaN or inf")

        row: dict[str, float | str] = dict.fromkeys(ROW_KEYS, np.nan)
        row.update(skipped="", topdown_skipped="", n_tokens=float(acts.size))
        empty = NeuronResult(row, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
        if acts.size < self.min_tokens:
            row["skipped"] = f"{acts.size} core tokens (< {CONFIG_KEYS['min_tokens']}={self.min_tokens})"
            return empty
        row.update(act_max=float(acts.max()), act_min=float(acts.min()), act_mean=float(acts.mean()))

        rng = make_rng(seed)
        kmeans_seed = int(rng.integers(2**31 - 1))  # 1-D k-means segmentation needs an int seed
        C = cosine_matrix(X)  # [n, n]
        segment_labels = segment(acts, self.scheme, self.n_segments, self.top_fraction, kmeans_seed)
        bottom = bottom_up(
            acts, C, segment_labels, n_segments_of(self.scheme, self.n_segments), self.homogeneity,
            self.n_permutations, rng, self.max_permutations,
        )  # fmt: skip
        row.update(bottom.summary)

        # children of the neuron's seed: the gap references and the top-down null draw their own
        # streams, so the bottom-up and Mantel numbers do not depend on them
        gap_rng, topdown_rng = rng.spawn(2)
        if labels is not None:
            fit = categories_from_labels(np.asarray(labels), cosine=C)
        else:
            make_clusterer, normalize = self.make_clusterer, self.normalize
            if make_clusterer is None:
                make_clusterer, normalize = preset_factory("ward")
            fit = fit_categories(
                X, make_clusterer, self.n_categories, tuple(self.k_range), normalize, cosine=C,
                k_choice=self.k_choice, n_references=self.n_references, seed=gap_rng,
                reference=self.reference,
            )  # fmt: skip
        row.update(
            n_categories=float(fit.k),
            n_uncovered=float(np.sum(fit.labels < 0)),
            silhouette=fit.silhouette,
        )
        categories, pairs = pd.DataFrame(), pd.DataFrame()
        if fit.skipped is not None:
            row["topdown_skipped"] = fit.skipped
            if fit.k == 1:  # one category agrees with no segmentation: chance level, not unknown
                row["ari"], row["ami"] = 0.0, 0.0
        else:
            top = top_down(acts, fit.labels, self.alpha)
            row.update(top.summary)
            observed = (top.summary["interleaving_mean"], top.summary["overlap_mean"])
            row.update(interleaving_overlap_null(acts, fit.labels, self.n_permutations, topdown_rng, observed=observed))
            row["ari"], row["ami"] = partition_agreement(fit.labels, segment_labels)
            categories, pairs = top.categories, top.pairs

        if self.n_mantel_permutations > 0:
            mantel = mantel_activation_cosine(
                acts, C, self.n_mantel_permutations, rng, distance=self.mantel_distance
            )
            row.update(mantel_rho=mantel.rho, mantel_p=mantel.p)
        else:
            row["mantel_rho"] = mantel_activation_cosine(acts, C, 1, rng, distance=self.mantel_distance).rho
        unexpected = set(row) - set(ROW_KEYS)
        assert not unexpected, f"row keys missing from ROW_KEYS: {sorted(unexpected)}"
        k_curve = k_curve_table(fit, acts, segment_labels)
        return NeuronResult(row, categories, bottom.segments, pairs, k_curve, fit.labels, segment_labels)


def k_curve_table(fit, acts: np.ndarray, segment_labels: np.ndarray) -> pd.DataFrame:
    """One row per K of the fit's K-curve: k, gap and gap_sd (k_choice="gap": K = 1 included),
    silhouette, epsilon2 and kruskal_p of the categories at that K, ari against the activation
    segments, chosen (the K the neuron's row reports). Empty for a fixed K or precomputed labels."""
    ks = sorted(set(fit.gap_by_k) | set(fit.labels_by_k))
    if not ks:
        return pd.DataFrame({"k": [], "silhouette": []})
    table: dict[str, list] = {"k": ks}
    if fit.gap_by_k:
        table["gap"] = [fit.gap_by_k.get(k, np.nan) for k in ks]
        table["gap_sd"] = [fit.gap_sd_by_k.get(k, np.nan) for k in ks]
    table["silhouette"] = [fit.silhouette_by_k.get(k, np.nan) for k in ks]
    epsilon2, kruskal_p, ari = [], [], []
    for k in ks:
        labels = fit.labels_by_k.get(k)
        tests = kruskal_epsilon2(acts, labels) if labels is not None else (np.nan, np.nan)
        epsilon2.append(tests[0])
        kruskal_p.append(tests[1])
        ari.append(adjusted_rand(labels, segment_labels) if labels is not None else np.nan)
    table.update(epsilon2=epsilon2, kruskal_p=kruskal_p, ari=ari, chosen=[k == fit.k for k in ks])
    return pd.DataFrame(table)


def validate_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(CONFIG_KEYS["alpha"], alpha, "a level in (0, 1)")


def analyse_neuron(
    acts: np.ndarray, X: np.ndarray, labels: np.ndarray | None = None, *, seed: SeedLike = 0, **settings
) -> NeuronResult:
    """One neuron with `TwoFoldNeuron(**settings)`: a convenience for scripts and tests."""
    return TwoFoldNeuron(**settings).analyse(acts, X, labels, seed)
