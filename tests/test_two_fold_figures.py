"""The per-layer figures of the two-fold analysis, on tables made by the real per-layer code.

Planted layer: each neuron's 10 highest core tokens come from one tight cluster of vectors, its
other 90 are random vectors with lower activations, so only the top segment is homogeneous (the
paper's claim, in its strong form). Null layer: clustered vectors, activations independent of them.
The figures' `intraneuron_data` is checked against the tables recomputed with pandas.
"""

from io import BytesIO

import numpy as np
import pandas as pd
import pytest

from intraneuron.analyses.two_fold.core_tokens import CoreTokens
from intraneuron.analyses.two_fold.figures import DISTRIBUTIONS, P_BINS, P_VALUES, layer_figures
from intraneuron.analyses.two_fold.layer import TABLES, analyse_layer
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron
from tests.figure_checks import assert_closed_png_with_data

ALPHA = 0.05
LAYER = 3
N_TOKENS, TOP, D = 100, 10, 32
NAMES = {"homogeneity_by_segment", "neuron_distributions", "top_segment_p_values", "k_curve"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_layer(cores: list[CoreTokens], vectors: np.ndarray) -> dict[str, pd.DataFrame]:
    def embed(ids):
        return vectors[ids], np.ones(ids.size, dtype=bool)

    neuron = TwoFoldNeuron(n_permutations=49, n_mantel_permutations=49)
    return analyse_layer(LAYER, cores, embed, neuron, seed=11)


def _core(neuron: int, ids: np.ndarray, acts: np.ndarray) -> CoreTokens:
    order = np.argsort(-acts, kind="stable")
    return CoreTokens(neuron, ids[order], acts[order])


def planted_layer() -> dict[str, pd.DataFrame]:
    """12 planted neurons and one with too few core tokens (skipped)."""
    rng = np.random.default_rng(0)
    n = 12
    vectors = rng.normal(size=(n * N_TOKENS + 5, D))
    cores = []
    for j in range(n):
        ids = np.arange(j * N_TOKENS, (j + 1) * N_TOKENS)
        vectors[ids[:TOP]] = rng.normal(size=D) + rng.normal(scale=0.3, size=(TOP, D))
        acts = np.concatenate([5 + rng.random(TOP), 4 * rng.random(N_TOKENS - TOP)])
        cores.append(_core(j, ids, acts))
    cores.append(_core(n, np.arange(n * N_TOKENS, n * N_TOKENS + 5), rng.random(5)))
    return _run_layer(cores, vectors)


def null_layer() -> dict[str, pd.DataFrame]:
    """30 neurons: 4 clusters of 25 vectors each, activations drawn independently."""
    rng = np.random.default_rng(1)
    n = 30
    truth = np.repeat(np.arange(4), N_TOKENS // 4)
    vectors = np.concatenate(
        [
            rng.normal(size=(4, D))[truth] + rng.normal(scale=0.3, size=(N_TOKENS, D))
            for _ in range(n)
        ]
    )
    cores = [
        _core(j, np.arange(j * N_TOKENS, (j + 1) * N_TOKENS), rng.normal(size=N_TOKENS))
        for j in range(n)
    ]
    return _run_layer(cores, vectors)


@pytest.fixture(scope="module")
def planted_tables():
    return planted_layer()


@pytest.fixture(scope="module")
def null_tables():
    return null_layer()


@pytest.fixture(scope="module", params=["planted", "null"])
def tables(request):
    return request.getfixturevalue(f"{request.param}_tables")


def _analysed(tables):
    rows = tables["neurons"]
    return rows[rows["skipped"] == ""]


def test_every_figure_is_returned_closed_and_saves_as_a_png(tables):
    figures = layer_figures(tables, LAYER, ALPHA)
    assert set(figures) == NAMES
    for name, fig in figures.items():
        assert_closed_png_with_data(fig, name, f"layer {LAYER}")


def test_titles_count_the_neurons(planted_tables):
    figures = layer_figures(planted_tables, LAYER, ALPHA)
    assert "12 neurons" in figures["homogeneity_by_segment"].get_suptitle()
    title = figures["neuron_distributions"].get_suptitle()
    assert "12 analysed neurons" in title and "1 skipped" in title


def test_homogeneity_data_is_the_segment_table_averaged_over_neurons(tables):
    data = layer_figures(tables, LAYER, ALPHA)["homogeneity_by_segment"].intraneuron_data
    segments = tables["segments"]
    means = segments.groupby("segment")[["homogeneity", "null_mean", "null_sd"]].mean()
    tested = segments.dropna(subset=["p"])
    significant = tested.groupby("segment")["p"].apply(lambda p: (p < ALPHA).mean())
    np.testing.assert_array_equal(data["segment"], means.index.to_numpy())
    for column in ("homogeneity", "null_mean", "null_sd"):
        np.testing.assert_allclose(data[column], means[column].to_numpy(), rtol=1e-12)
    np.testing.assert_array_equal(
        data["n_neurons"], segments.groupby("segment")["homogeneity"].count()
    )
    np.testing.assert_array_equal(data["n_tested"], tested.groupby("segment")["p"].size())
    np.testing.assert_allclose(data["significant_fraction"], significant.to_numpy(), rtol=1e-12)
    for k in (1, 2):
        np.testing.assert_allclose(
            data[f"null_plus_{k}sd"], means["null_mean"] + k * means["null_sd"]
        )
        np.testing.assert_allclose(
            data[f"null_minus_{k}sd"], means["null_mean"] - k * means["null_sd"]
        )
    assert data["alpha"].tolist() == [ALPHA]


def test_a_planted_top_segment_stands_above_the_null_band_and_only_it(planted_tables):
    data = layer_figures(planted_tables, LAYER, ALPHA)["homogeneity_by_segment"].intraneuron_data
    assert data["homogeneity"][0] > data["null_plus_2sd"][0]
    assert data["significant_fraction"][0] == 1.0  # every planted neuron: p_top = 1/50
    rest = slice(1, None)
    assert np.all(data["homogeneity"][rest] < data["null_plus_2sd"][rest])
    assert np.all(data["homogeneity"][rest] > data["null_minus_2sd"][rest])


def test_a_null_top_segment_lies_inside_the_null_band(null_tables):
    data = layer_figures(null_tables, LAYER, ALPHA)["homogeneity_by_segment"].intraneuron_data
    assert data["null_minus_1sd"][0] < data["homogeneity"][0] < data["null_plus_1sd"][0]
    assert data["significant_fraction"][0] < 0.2


def test_distribution_data_are_the_finite_values_of_the_analysed_neurons(tables):
    data = layer_figures(tables, LAYER, ALPHA)["neuron_distributions"].intraneuron_data
    analysed = _analysed(tables)
    for column, (_, reference, _) in DISTRIBUTIONS.items():
        expected = analysed[column].dropna().to_numpy(dtype=np.float64)
        assert expected.size > 0, column
        np.testing.assert_array_equal(data[column], expected)
        assert data[f"{column}.reference"].tolist() == [reference]


def test_p_value_data_are_the_finite_p_values_and_their_counts(tables):
    data = layer_figures(tables, LAYER, ALPHA)["top_segment_p_values"].intraneuron_data
    analysed = _analysed(tables)
    edges = np.linspace(0, 1, P_BINS + 1)
    np.testing.assert_allclose(data["bin_edges"], edges)
    for column in P_VALUES:
        expected = analysed[column].dropna().to_numpy(dtype=np.float64)
        np.testing.assert_array_equal(data[column], expected)
        np.testing.assert_array_equal(
            data[f"{column}.counts"], np.histogram(expected, bins=edges)[0]
        )
        assert data[f"{column}.counts"].sum() == len(expected)
        assert data[f"{column}.uniform"].tolist() == [len(expected) / P_BINS]


def test_empty_tables_give_no_figures():
    assert layer_figures({name: pd.DataFrame() for name in TABLES}, LAYER, ALPHA) == {}
    assert layer_figures({}, LAYER, ALPHA) == {}


def test_a_layer_of_skipped_neurons_gives_no_figures():
    rng = np.random.default_rng(2)
    cores = [_core(j, np.arange(5 * j, 5 * j + 5), rng.random(5)) for j in range(3)]
    tables = _run_layer(cores, rng.normal(size=(15, D)))
    assert (tables["neurons"]["skipped"] != "").all()
    assert layer_figures(tables, LAYER, ALPHA) == {}


def test_missing_tables_and_columns_drop_only_what_they_feed(planted_tables):
    tables = {**planted_tables, "segments": pd.DataFrame()}
    assert set(layer_figures(tables, LAYER, ALPHA)) == NAMES - {"homogeneity_by_segment"}

    # no categories anywhere: the top-down panels are empty, the bottom-up ones still drawn
    rows = planted_tables["neurons"].copy()
    rows[["epsilon2", "interleaving_mean", "ari", "kruskal_p"]] = np.nan
    figures = layer_figures({**planted_tables, "neurons": rows}, LAYER, ALPHA)
    assert set(figures) == NAMES
    assert figures["neuron_distributions"].intraneuron_data["epsilon2"].size == 0
    assert figures["top_segment_p_values"].intraneuron_data["kruskal_p"].size == 0
    assert figures["top_segment_p_values"].intraneuron_data["p_top"].size == 12
    figures["neuron_distributions"].savefig(BytesIO(), format="png")


def test_k_curve_data_is_the_silhouette_table_summarised_over_neurons(tables):
    data = layer_figures(tables, LAYER, ALPHA)["k_curve"].intraneuron_data
    by_k = tables["k_curve"].dropna().groupby("k")["silhouette"]
    np.testing.assert_array_equal(data["k"], by_k.median().index.to_numpy())
    np.testing.assert_allclose(data["median"], by_k.median().to_numpy())
    np.testing.assert_allclose(data["q75"], by_k.quantile(0.75).to_numpy())
    chosen = _analysed(tables)["n_categories"].to_numpy()
    assert data["chosen_count"].sum() == np.sum(chosen >= 1)  # K = 1: the gap found no categories
    by_gap = tables["k_curve"].dropna(subset=["gap"]).groupby("k")["gap"]  # the criterion, K = 1 included
    np.testing.assert_array_equal(data["gap_k"], by_gap.median().index.to_numpy())
    np.testing.assert_allclose(data["gap_median"], by_gap.median().to_numpy())
    np.testing.assert_allclose(data["gap_q25"], by_gap.quantile(0.25).to_numpy())


def test_k_curve_peaks_at_the_number_of_planted_vector_clusters(null_tables):
    # every null neuron's core-token vectors form 4 tight clusters (its activations ignore them)
    data = layer_figures(null_tables, LAYER, ALPHA)["k_curve"].intraneuron_data
    assert data["k"][np.argmax(data["median"])] == 4
    assert data["chosen_count"][list(data["chosen_k"]).index(4)] >= 0.9 * data["chosen_count"].sum()
    assert (null_tables["k_curve"].groupby("neuron").size() == 8).all()  # K = 1..8 for each neuron (gap)


def test_geometry_null_plots_each_statistic_of_neurons_against_the_pseudo_neurons(planted_tables, null_tables):
    """With pseudo-neurons (here the null layer's neurons stand in for them) the layer gets the
    geometry_null figure, whose data are the analysed neurons' and pseudo-neurons' finite values."""
    from intraneuron.analyses.two_fold.figures import GEOMETRY_NULL

    tables = {**planted_tables, "pseudo_neurons": null_tables["neurons"]}
    figures = layer_figures(tables, LAYER, ALPHA)
    assert set(figures) == NAMES | {"geometry_null"}
    fig = figures["geometry_null"]
    assert_closed_png_with_data(fig, "geometry_null", f"layer {LAYER}: neurons against the pseudo-neuron")
    data = fig.intraneuron_data
    analysed = planted_tables["neurons"][planted_tables["neurons"]["skipped"] == ""]
    pseudo = null_tables["neurons"][null_tables["neurons"]["skipped"] == ""]
    for column in GEOMETRY_NULL:
        if column not in data:
            assert analysed[column].isna().all() or pseudo[column].isna().all(), column
            continue
        np.testing.assert_array_equal(data[column], analysed[column].dropna().to_numpy(dtype=float))
        np.testing.assert_array_equal(data[f"{column}.pseudo"], pseudo[column].dropna().to_numpy(dtype=float))
    assert "z_top" in data and data["z_top"].mean() > data["z_top.pseudo"].mean()  # planted tops stand out
    assert "geometry_null" not in layer_figures(planted_tables, LAYER, ALPHA)  # no pseudo-neurons, no figure
