"""The per-neuron figures of the two-fold analysis, on results made by the real per-neuron code.

Planted neuron: three tight clusters of core-token vectors, each at its own activation level
(categories separated by activation, and the top segment homogeneous). Null neuron: the same kind
of clusters, activations drawn independently of them. The figures' `intraneuron_data` is checked
against the neuron's tables and against an independent PCA; `token_labels` / `segment_labels`
against the tables they were counted into.
"""

from io import BytesIO

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from intraneuron.analyses.two_fold.neuron import NeuronResult, TwoFoldNeuron
from intraneuron.analyses.two_fold.neuron_figures import neuron_figures
from tests.figure_checks import assert_closed_png_with_data

LAYER, NEURON = 4, 17
ALPHA = 0.05
N_PER_CLUSTER, D = 30, 16
NAMES = {"activation_by_category", "homogeneity_by_segment", "projection"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """X [90, D]: three tight clusters; truth [90] their index."""
    truth = np.repeat(np.arange(3), N_PER_CLUSTER)
    X = rng.normal(size=(3, D))[truth] + rng.normal(scale=0.2, size=(truth.size, D))
    return X, truth


def _analyse(acts, X, labels=None):
    neuron = TwoFoldNeuron(n_permutations=149, n_mantel_permutations=0, alpha=ALPHA)
    return neuron.analyse(acts, X, labels, seed=(5, LAYER, NEURON))


def planted():
    rng = np.random.default_rng(0)
    X, truth = _clusters(rng)
    acts = np.array([0.5, 2.0, 4.0])[truth] + 0.3 * rng.random(truth.size)
    return acts, X, truth, _analyse(acts, X)


def null():
    rng = np.random.default_rng(1)
    X, truth = _clusters(rng)
    acts = rng.normal(size=truth.size)
    return acts, X, truth, _analyse(acts, X)


@pytest.fixture(scope="module", params=["planted", "null"])
def case(request):
    return {"planted": planted, "null": null}[request.param]()


@pytest.fixture(scope="module")
def planted_case():
    return planted()


def test_every_figure_is_returned_closed_and_saves_as_a_png(case):
    acts, X, _, result = case
    figures = neuron_figures(acts, X, result, LAYER, NEURON)
    assert set(figures) == NAMES
    for name, fig in figures.items():
        assert_closed_png_with_data(fig, name, f"layer {LAYER}, neuron {NEURON}")


def test_token_and_segment_labels_agree_with_the_tables(case):
    acts, _, _, result = case
    n = acts.size
    assert result.token_labels.shape == (n,) and result.segment_labels.shape == (n,)
    covered = result.token_labels[result.token_labels >= 0]
    categories, counts = np.unique(covered, return_counts=True)
    np.testing.assert_array_equal(categories, result.categories["category"])
    np.testing.assert_array_equal(counts, result.categories["size"])
    assert np.sum(result.token_labels < 0) == result.row["n_uncovered"]
    segments = result.segments
    sizes = np.bincount(result.segment_labels, minlength=len(segments))
    np.testing.assert_array_equal(sizes, segments["size"])
    for s, mean in zip(segments["segment"], segments["act_mean"], strict=True):
        np.testing.assert_allclose(acts[result.segment_labels == s].mean(), mean, rtol=1e-12)
    assert acts[result.segment_labels == 0].min() >= acts[result.segment_labels != 0].max()


def test_category_data_are_the_category_table_ordered_by_mean(case):
    acts, X, _, result = case
    data = neuron_figures(acts, X, result, LAYER, NEURON)["activation_by_category"].intraneuron_data
    table = result.categories.set_index("category").loc[data["category"]]
    assert np.all(np.diff(data["mean"]) >= 0)
    np.testing.assert_array_equal(data["mean"], table["mean"].to_numpy())
    np.testing.assert_array_equal(data["size"], table["size"].to_numpy())
    for c, mean in zip(data["category"], data["mean"], strict=True):
        values = data[f"activations.{c}"]
        np.testing.assert_array_equal(values, acts[result.token_labels == c])
        np.testing.assert_allclose(values.mean(), mean, rtol=1e-12)
    assert sum(data[f"activations.{c}"].size for c in data["category"]) == acts.size
    assert "activations.uncovered" not in data  # clustering covers every token


def test_planted_categories_are_the_clusters_in_their_activation_order(planted_case):
    acts, X, truth, result = planted_case
    fig = neuron_figures(acts, X, result, LAYER, NEURON)["activation_by_category"]
    assert adjusted_rand_score(truth, result.token_labels) == 1.0
    data = fig.intraneuron_data
    levels = [truth[result.token_labels == c][0] for c in data["category"]]
    assert levels == [0, 1, 2]  # lowest planted level first
    assert f"p = {result.row['kruskal_p']:.3g}" in fig.get_suptitle()
    assert f"ε² = {result.row['epsilon2']:.3g}" in fig.get_suptitle()


def test_homogeneity_data_are_the_segment_table_lowest_activation_first(case):
    acts, X, _, result = case
    fig = neuron_figures(acts, X, result, LAYER, NEURON, alpha=ALPHA)["homogeneity_by_segment"]
    data = fig.intraneuron_data
    table = result.segments.iloc[::-1]
    np.testing.assert_array_equal(data["segment"], table["segment"])
    assert np.all(np.diff(data["act_mean"]) > 0)
    for column in ("homogeneity", "null_mean", "null_sd", "z", "p", "size"):
        np.testing.assert_array_equal(data[column], table[column].to_numpy(), err_msg=column)
    for k in (1, 2):
        np.testing.assert_allclose(data[f"null_plus_{k}sd"], table["null_mean"] + k * table["null_sd"])
    np.testing.assert_array_equal(data["significant"], table["p"].to_numpy() < ALPHA)
    assert data["h_all"].tolist() == [result.row["h_all"]]
    assert "lowest → highest" in fig.axes[0].get_xlabel()


def test_a_planted_top_segment_is_marked_significant(planted_case):
    acts, X, _, result = planted_case
    data = neuron_figures(acts, X, result, LAYER, NEURON)["homogeneity_by_segment"].intraneuron_data
    assert data["segment"][-1] == 0 and data["significant"][-1]
    assert data["homogeneity"][-1] > data["null_plus_2sd"][-1]


def test_projection_is_a_pca_of_the_unit_vectors_sized_by_activation(case):
    acts, X, _, result = case
    fig = neuron_figures(acts, X, result, LAYER, NEURON)["projection"]
    data = fig.intraneuron_data
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    centred = unit - unit.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :2] * s[:2]
    assert data["coordinates"].shape == (acts.size, 2)
    for j in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(expected[:, j] @ data["coordinates"][:, j])
        np.testing.assert_allclose(data["coordinates"][:, j], sign * expected[:, j], atol=1e-10)
    np.testing.assert_allclose(data["explained_variance_ratio"], s[:2] ** 2 / np.sum(s**2))
    ax = fig.axes[0]
    assert f"{data['explained_variance_ratio'][0]:.1%}" in ax.get_xlabel()
    np.testing.assert_array_equal(data["labels"], result.token_labels)
    np.testing.assert_array_equal(data["activations"], acts)
    order = np.argsort(acts)
    assert np.all(np.diff(data["sizes"][order]) > 0)  # no tied activations here: strictly rising
    assert ax.collections[0].get_offsets().shape[0] == acts.size


def test_uncovered_tokens_form_their_own_group_and_names_are_shown(planted_case):
    acts, X, truth, _ = planted_case
    labels = truth.copy()
    labels[::7] = -1
    result = _analyse(acts, X, labels)
    names = {0: "noun.animal", 1: "noun.food", 2: "verb.motion"}
    figures = neuron_figures(acts, X, result, LAYER, NEURON, names)
    data = figures["activation_by_category"].intraneuron_data
    np.testing.assert_array_equal(data["activations.uncovered"], acts[labels < 0])
    ticks = [t.get_text() for t in figures["activation_by_category"].axes[0].get_xticklabels()]
    assert ticks[0].startswith("uncovered") and all(
        any(t.startswith(name) for t in ticks) for name in names.values()
    )
    legend = [t.get_text() for t in figures["projection"].axes[0].get_legend().get_texts()]
    assert legend[:4] == ["verb.motion", "noun.food", "noun.animal", "uncovered"]
    np.testing.assert_array_equal(figures["projection"].intraneuron_data["labels"], labels)


def test_a_neuron_without_categories_gets_the_bottom_up_figures_in_one_colour(planted_case):
    acts, X, _, _ = planted_case
    result = _analyse(acts, X, np.zeros(acts.size, dtype=np.int64))  # a single category
    assert result.row["topdown_skipped"] and result.categories.empty
    assert result.token_labels.shape == acts.shape
    figures = neuron_figures(acts, X, result, LAYER, NEURON)
    assert set(figures) == {"homogeneity_by_segment", "projection"}
    projection = figures["projection"]
    assert (projection.intraneuron_data["labels"] == -1).all()
    assert len({tuple(c) for c in projection.axes[0].collections[0].get_facecolors()}) == 1
    projection.savefig(BytesIO(), format="png")


def test_a_skipped_neuron_gets_no_figures():
    rng = np.random.default_rng(3)
    acts, X = rng.random(5), rng.normal(size=(5, D))
    result = _analyse(acts, X)
    assert result.row["skipped"]
    assert result.token_labels is None and result.segment_labels is None
    assert neuron_figures(acts, X, result, LAYER, NEURON) == {}


def test_a_result_made_without_token_labels_still_draws_the_rest(planted_case):
    acts, X, _, result = planted_case
    bare = NeuronResult(result.row, result.categories, result.segments, result.pairs)
    assert bare.token_labels is None and bare.segment_labels is None
    assert set(neuron_figures(acts, X, bare, LAYER, NEURON)) == NAMES - {"activation_by_category"}


def test_activations_that_do_not_match_the_result_are_refused(planted_case):
    acts, X, _, result = planted_case
    with pytest.raises(ValueError, match="token_labels"):
        neuron_figures(acts[:-1], X[:-1], result, LAYER, NEURON)
    with pytest.raises(ValueError, match="must agree"):
        neuron_figures(acts, X[:-1], result, LAYER, NEURON)


def test_degenerate_inputs_still_render():
    # equal activations (one marker size), one-dimensional vectors (one principal component)
    rng = np.random.default_rng(4)
    acts, X = np.ones(20), rng.normal(size=(20, 1))
    result = _analyse(acts, X, np.arange(20) % 3)
    figures = neuron_figures(acts, X, result, LAYER, NEURON)
    assert set(figures) == NAMES
    data = figures["projection"].intraneuron_data
    assert np.ptp(data["sizes"]) == 0 and (data["coordinates"][:, 1] == 0).all()
    np.testing.assert_allclose(data["explained_variance_ratio"], [1.0, 0.0])
    for fig in figures.values():
        fig.savefig(BytesIO(), format="png")
