"""The delete-one-block jackknife of a layer fraction from a subsample of its units
(stats/jackknife.py): against explicit loops, and its coverage on simulated blocked corpora."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from intraneuron.stats.jackknife import (
    FractionReplicates,
    extrapolated_variance,
    fraction_intervals,
    jackknife_covariance,
)


def test_covariance_and_extrapolation_equal_explicit_loops():
    rng = np.random.default_rng(0)
    G, n, N = 7, 5, 40
    x = rng.integers(0, 2, (G, n)).astype(float)
    c = jackknife_covariance(x)
    for i in range(n):
        for j in range(n):
            mean_i, mean_j = x[:, i].mean(), x[:, j].mean()
            want = (G - 1) / G * sum((x[g, i] - mean_i) * (x[g, j] - mean_j) for g in range(G))
            assert c[i, j] == pytest.approx(want)
    diag = sum(c[i, i] for i in range(n)) / n
    off = sum(c[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert extrapolated_variance(c, N) == pytest.approx(max(diag / N + (N - 1) / N * off, diag / N))
    # every unit of the layer in the "subsample": the jackknife variance of the layer's mean itself
    layer = x.mean(1)  # [G]
    brute = (G - 1) / G * sum((layer[g] - layer.mean()) ** 2 for g in range(G))
    assert extrapolated_variance(c, n) == pytest.approx(max(brute, diag / n))


def test_excess_interval_equals_explicit_loops():
    rng = np.random.default_rng(1)
    G, n = 6, 4
    u_r, u_p = rng.integers(0, 2, (G, n)), rng.integers(0, 2, (G, n))
    a_r = np.maximum(u_r, rng.integers(0, 2, (G, n)))
    a_p = np.ones((G, n))
    real = FractionReplicates(0.4, 0.7, 30, u_r, a_r)
    pseudo = FractionReplicates(0.2, 1.0, 50, u_p, a_p)
    got = fraction_intervals(real, pseudo)
    z_r, z_p = (u_r - 0.4 * a_r) / 0.7, (u_p - 0.2 * a_p) / 1.0
    mean_r, mean_p = z_r.mean(0), z_p.mean(0)

    def cov(za, ma, i, zb, mb, j):
        return (G - 1) / G * sum((za[g, i] - ma[i]) * (zb[g, j] - mb[j]) for g in range(G))

    def layer_var(z, m, N):
        d = sum(cov(z, m, i, z, m, i) for i in range(n)) / n
        o = sum(cov(z, m, i, z, m, j) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return max(d / N + (N - 1) / N * o, d / N), d / N

    (v_r, d_r), (v_p, d_p) = layer_var(z_r, mean_r, 30), layer_var(z_p, mean_p, 50)
    draw = 0.2 * 0.8 / 50
    cross = sum(cov(z_r, mean_r, i, z_p, mean_p, j) for i in range(n) for j in range(n)) / n**2
    t = stats.t.ppf(0.975, G - 1)
    v_e = max(v_r + v_p + draw - 2 * cross, d_r + d_p + draw)
    assert got["value"] == pytest.approx((max(0, 0.4 - t * v_r**0.5), min(1, 0.4 + t * v_r**0.5)))
    assert got["pseudo"] == pytest.approx((max(0, 0.2 - t * (v_p + draw) ** 0.5), min(1, 0.2 + t * (v_p + draw) ** 0.5)))
    assert got["excess"] == pytest.approx((0.2 - t * v_e**0.5, 0.2 + t * v_e**0.5))


def blocked_corpus(rng, mu, c, G, shared):
    """Unit i's block values x [N, G]: its own noise plus a block effect shared by all units."""
    return mu[:, None] + rng.standard_normal((mu.size, G)) + shared * rng.standard_normal(G)[None, :]


def test_the_interval_covers_the_layer_fraction_at_its_level_on_simulated_corpora():
    """N = 2,000 units, a subsample of n = 64 replicated over G = 10 blocks: unit i has the
    property when the mean over blocks of its values exceeds its threshold c_i; units share a weak
    block effect. The layer's expected fraction is known in closed form; over 300 corpora the 95%
    interval covers it in 90-99% of draws (binomial sd at 95% over 300 draws: 1.3 points, so the
    band is about 4 sd wide on each side), the plain (unfloored) extrapolation and the subsample's
    own interval do not."""
    rng = np.random.default_rng(3)
    N, n, G, shared, draws = 2000, 64, 10, 0.1, 300
    c, mu = rng.normal(0, 2.0, N), rng.normal(0, 0.5, N)
    truth = stats.norm.sf((c - mu) / np.sqrt((1 + shared**2) / G)).mean()
    t = stats.t.ppf(0.975, G - 1)
    covered = plain = own = 0
    for _ in range(draws):
        x = blocked_corpus(rng, mu, c, G, shared)
        value = float((x.mean(1) > c).mean())
        sub = rng.choice(N, n, replace=False)
        u = np.stack([np.delete(x[sub], g, 1).mean(1) > c[sub] for g in range(G)]).astype(float)  # [G, n]
        low, high = fraction_intervals(FractionReplicates(value, 1.0, N, u, np.ones_like(u)))["value"]
        covered += low <= truth <= high
        cov = jackknife_covariance(u - value)
        d, o = np.mean(np.diag(cov)), (cov.sum() - np.trace(cov)) / (n * (n - 1))
        plain += abs(value - truth) <= t * np.sqrt(max(d / N + (N - 1) / N * o, 0))
        own_value = float((x[sub].mean(1) > c[sub]).mean())
        own += abs(own_value - truth) <= t * np.sqrt(max(d / n + (n - 1) / n * o, 0))
    assert 0.90 <= covered / draws <= 0.99
    assert plain / draws < 0.80  # noise of the off-diagonal mean: negative about half the time
    assert own / draws < 0.87  # the subsample's binomial noise is not in its jackknife


def test_a_fraction_without_replicates_or_population_has_no_interval():
    empty = FractionReplicates(np.nan, 0.0, 10, np.zeros((0, 0)), np.zeros((0, 0)))
    assert all(np.isnan(v) for pair in fraction_intervals(empty, empty).values() for v in pair)
