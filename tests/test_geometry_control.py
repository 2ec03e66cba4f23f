"""The geometry control, end to end on one synthetic layer (`layer.analyse_layer`, no model).

A geometry-only neuron fires by its read-in direction alone: a = GELU(2 z - 1 + noise) with
z = x . w on isotropic vectors, no categories. Its top tokens share the component along w, so the
plain permutation null calls its top segment homogeneous most of the time. With w projected out
of the vectors, or judged against pseudo-neurons (random directions through the same pipeline), it
is flagged at the stated rate. Planted neurons, whose activation is ordered by three embedding-space
categories, are still found by the controlled statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from intraneuron.analyses.two_fold.aggregate import aggregate_layer, geometry_excess
from intraneuron.analyses.two_fold.core_tokens import CoreTokens
from intraneuron.analyses.two_fold.geometry import project_out
from intraneuron.analyses.two_fold.layer import analyse_layer
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron

ALPHA = 0.05
VOCAB, D, N_CORE = 3000, 64, 100
N_GEOMETRY, N_PSEUDO, N_PLANTED = 80, 120, 12
N_PER_CATEGORY = 34  # three planted categories fill the 100 core tokens
MIN_NULL = 20  # the geometry null's minimum size here (default 200): 120 pseudo-neurons, fewer with K >= 2


def _gelu(x):
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _tolerance(n, alpha=ALPHA):
    return alpha + 2.5 * np.sqrt(alpha * (1 - alpha) / n)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(VOCAB, D)).astype(np.float32)  # isotropic token vectors
    # three planted categories: tight clusters around random centres (tokens 0 .. 3 * 34 - 1)
    centres = rng.normal(size=(3, D)) * 1.2
    for c in range(3):
        members = slice(c * N_PER_CATEGORY, (c + 1) * N_PER_CATEGORY)
        E[members] = centres[c] + rng.normal(size=(N_PER_CATEGORY, D))
    return rng, E


def _directions(rng, n):
    W = rng.normal(size=(n, D))
    return W / np.linalg.norm(W, axis=1, keepdims=True)  # [n, D]


def _geometry_cores(rng, E, W, first_neuron=0):
    """Neurons that read direction W[j]: activation a function of x . w alone, over the tokens
    outside the planted categories (isotropic vectors: no categories to find)."""
    cores = []
    uncategorised = np.arange(3 * N_PER_CATEGORY, VOCAB)
    for j, w in enumerate(W):
        z = E[uncategorised] @ w
        acts = np.full(VOCAB, -np.inf)
        acts[uncategorised] = _gelu(2 * z - 1 + 0.3 * rng.normal(size=z.size))
        top = np.argsort(-acts)[:N_CORE]
        cores.append(CoreTokens(first_neuron + j, top, acts[top].astype(np.float64)))
    return cores


def _planted_cores(rng, W, first_neuron):
    """Neurons whose activation is ordered by category (3 > 2 > 1), whatever their read-in direction."""
    cores = []
    truth = np.repeat(np.arange(3), N_PER_CATEGORY)
    for j in range(len(W)):
        acts = _gelu(3.0 - truth + 0.35 * rng.normal(size=truth.size))
        order = np.argsort(-acts)[:N_CORE]
        cores.append(CoreTokens(first_neuron + j, order, acts[order].astype(np.float64)))
    return cores


def _rows(cores, E, W, project, neuron, stream=()):
    read_in = (lambda j: W[j][None]) if project else None
    return analyse_layer(
        0, cores, lambda ids: (E[ids], np.ones(len(ids), dtype=bool)), neuron,
        read_in=read_in, seed=0, stream=stream, n_jobs=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def neuron():
    return TwoFoldNeuron(n_permutations=200, max_permutations=2000, n_mantel_permutations=0)


@pytest.fixture(scope="module")
def layer(world, neuron):
    """Geometry-only neurons, planted neurons and pseudo-neurons, with and without the projection."""
    rng, E = world
    W = _directions(rng, N_GEOMETRY + N_PLANTED)
    cores = _geometry_cores(rng, E, W[:N_GEOMETRY]) + _planted_cores(rng, W[N_GEOMETRY:], N_GEOMETRY)
    W_pseudo = _directions(rng, N_PSEUDO)
    pseudo_cores = _geometry_cores(rng, E, W_pseudo)
    out = {}
    for project in (False, True):
        rows = _rows(cores, E, W, project, neuron)["neurons"]
        pseudo = _rows(pseudo_cores, E, W_pseudo, project, neuron, stream=(1,))["neurons"]
        out[project] = (rows, pseudo)
    return out


def _geometry_only(rows):
    return rows[rows["neuron"] < N_GEOMETRY]


def _planted(rows):
    return rows[rows["neuron"] >= N_GEOMETRY]


def test_projection_removes_exactly_the_read_in_directions():
    rng = np.random.default_rng(1)
    X, W = rng.normal(size=(50, 16)), rng.normal(size=(2, 16))
    P = project_out(X, W)
    np.testing.assert_allclose(P @ W.T, 0, atol=1e-10)
    Q, _ = np.linalg.qr(W.T)
    np.testing.assert_allclose(P, X - X @ Q @ Q.T, atol=1e-10)
    np.testing.assert_allclose(project_out(P, W), P, atol=1e-10)  # idempotent


def test_geometry_only_neurons_fool_the_plain_null(layer):
    """The bug: without a control most geometry-only neurons get a 'homogeneous' top segment."""
    rows, _ = layer[False]
    assert (_geometry_only(rows)["p_top"] < ALPHA).mean() > 0.5


def test_geometry_only_neurons_are_not_flagged_once_the_read_in_direction_is_projected_out(layer):
    rows, _ = layer[True]
    flagged = (_geometry_only(rows)["p_top"] < ALPHA).mean()
    assert flagged <= _tolerance(N_GEOMETRY), flagged
    trend = _geometry_only(rows)["trend_rho"].median()
    assert abs(trend) < 0.25, trend


def test_geometry_only_neurons_sit_in_the_pseudo_neuron_null(layer):
    """Judged against pseudo-neurons (random directions, same pipeline), geometry-only neurons are
    calibrated even without the projection: their p against the null is about uniform."""
    rows, pseudo = layer[False]
    judged = geometry_excess(_geometry_only(rows), pseudo, min_null=MIN_NULL)
    p = judged["z_top_p_geometry"].to_numpy()
    assert (p < ALPHA).mean() <= _tolerance(N_GEOMETRY)
    metrics = aggregate_layer(judged, ALPHA, pseudo, min_null=MIN_NULL)
    assert metrics["geometry/z_top_sig_frac_bh"] <= 0.05


def test_planted_categories_are_found_by_the_controlled_statistics(layer):
    rows, pseudo = layer[True]
    planted = geometry_excess(_planted(rows), pseudo, min_null=MIN_NULL)
    assert (planted["kruskal_p"] < ALPHA).mean() >= 0.9  # differentiation
    assert (planted["p_top"] < ALPHA).mean() >= 0.9  # homogeneous top segment
    assert (planted["n_categories"] == 3).mean() >= 0.8  # K chosen at the planted K
    # geometry alone gives no pseudo-neuron categories here (K = 1 for all 120): the K = 1 share
    # sets the planted neurons apart, and ARI, judged among neurons with K >= 2, has no null
    assert (pseudo["n_categories"] == 1).all()
    assert planted["ari_p_geometry"].isna().all() and (planted["ari_n_null"] == 0).all()
    assert planted["ari"].median() > 0.2


def test_the_k_curve_peaks_at_the_planted_k(world, neuron):
    rng, E = world
    W = _directions(rng, 4)
    tables = _rows(_planted_cores(rng, W, 0), E, W, True, neuron)
    curve = tables["k_curve"]
    for _, one in curve.groupby("neuron"):
        one = one.set_index("k")
        assert one["chosen"].idxmax() == 3 and one["chosen"].sum() == 1  # the gap statistic's K
        assert one["silhouette"].idxmax() == 3  # the categories' own cohesion peaks there too
        # splitting a category by its vectors adds nothing the activations know of
        assert one.loc[3, "epsilon2"] >= 0.9 * one["epsilon2"].max()
        assert one.loc[3, "epsilon2"] > one.loc[2, "epsilon2"]


def test_layer_metrics_report_the_pseudo_null(layer):
    rows, pseudo = layer[True]
    metrics = aggregate_layer(geometry_excess(rows, pseudo, min_null=MIN_NULL), ALPHA, pseudo, min_null=MIN_NULL)
    assert metrics["geometry/n_pseudo"] == N_PSEUDO
    assert np.isfinite(metrics["geometry/z_top_excess_median"])
    assert 0 <= metrics["bottomup/top_sig_frac_pseudo"] <= _tolerance(N_PSEUDO)
