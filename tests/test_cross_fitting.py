"""Core tokens chosen on one half of the corpus and measured on the other, selectivity, special tokens
and merged occurrence repeats: against brute-force references on synthetic profiles, and the
winner's curse and the occurrence-unit false-positive rate they remove."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from intraneuron.analyses.two_fold.core_tokens import CoreTokensConfig
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron
from intraneuron.errors import ConfigError


class SplitProfile:
    """What `CoreTokensConfig.select` reads of an ActivationProfile, from per-half type tables."""

    def __init__(self, type_ids, counts, means, act_mean=None, act_var=None):
        self.type_ids, self.counts, self.means = type_ids, counts, means  # [T], [2, T], [2, T, D]
        total = counts.sum(axis=0)
        with np.errstate(invalid="ignore"):
            pooled = np.nansum(means * counts[:, :, None], axis=0) / total[:, None]
        D = means.shape[2]
        self.tensors = {
            "type_ids": type_ids,
            "type_count": total,
            "type_mean": pooled.astype(np.float32),
            "act_mean": np.zeros(D) if act_mean is None else act_mean,
            "act_var": np.ones(D) if act_var is None else act_var,
        }

    def numpy(self, name):
        return np.asarray(self.tensors[name])

    def split_type_stats(self):
        return self.type_ids, self.counts, self.means


def _split_profile(rng, n_types=400, n_neurons=6, noise=1.0):
    type_ids = np.sort(rng.choice(5000, n_types, replace=False))
    counts = rng.integers(1, 40, size=(2, n_types))
    truth = rng.normal(size=(n_types, n_neurons))
    # a half's mean is the true mean plus noise shrinking with the half's count
    means = truth[None] + noise * rng.normal(size=(2, n_types, n_neurons)) / np.sqrt(counts)[:, :, None]
    return SplitProfile(type_ids, counts, means.astype(np.float32)), truth


def test_cross_fitted_tokens_are_chosen_on_one_half_and_measured_on_the_other():
    rng = np.random.default_rng(0)
    profile, _ = _split_profile(rng)
    config = CoreTokensConfig(n=30, min_count=5, min_selectivity=0)
    neurons = np.array([0, 3, 5])
    cores = config.select(profile, neurons)
    valid = (profile.counts >= 5).all(axis=0)
    for core, neuron in zip(cores, neurons, strict=True):
        chosen = np.argsort(-np.where(valid, profile.means[0][:, neuron], -np.inf), kind="stable")[:30]
        assert set(core.token_ids) == set(profile.type_ids[chosen])
        position = np.searchsorted(profile.type_ids, core.token_ids)
        np.testing.assert_allclose(core.acts, profile.means[1][position, neuron])
        assert np.all(np.diff(core.acts) <= 0)  # highest measured activation first
        replicated = np.argsort(-np.where(valid, profile.means[1][:, neuron], -np.inf), kind="stable")[:30]
        assert core.core_overlap == pytest.approx(len(np.intersect1d(chosen, replicated)) / 30)
        rho = stats.spearmanr(profile.means[0][chosen, neuron], profile.means[1][chosen, neuron])[0]
        assert core.core_reliability == pytest.approx(rho)


def test_choosing_and_measuring_on_the_same_data_inflates_the_core_activation():
    """The winner's curse: the measured means of the chosen tokens are biased up unless measured on
    the other half; the cross-fitted means are unbiased for the true means."""
    rng = np.random.default_rng(1)
    profile, truth = _split_profile(rng, n_types=2000, n_neurons=20, noise=3.0)
    position = {t: i for i, t in enumerate(profile.type_ids)}
    same, crossed = [], []
    for cross_fit, out in ((False, same), (True, crossed)):
        config = CoreTokensConfig(n=50, min_count=5, min_selectivity=0, cross_fit=cross_fit)
        for core in config.select(profile, np.arange(20)):
            rows = [position[t] for t in core.token_ids]
            out.append(np.mean(core.acts - truth[rows, core.neuron]))
    assert np.mean(same) > 0.2  # chosen on the data it is measured on: biased up
    assert abs(np.mean(crossed)) < 0.05


def test_an_unselective_or_dead_neuron_is_skipped_with_its_reason():
    rng = np.random.default_rng(2)
    profile, _ = _split_profile(rng, n_neurons=3)
    profile.tensors["act_mean"] = np.array([0.0, 10.0, 0.0])  # neuron 1: core below its corpus mean
    profile.tensors["act_var"] = np.array([1.0, 1.0, 0.0])  # neuron 2: constant (dead)
    cores = CoreTokensConfig(n=20, min_selectivity=1.0).select(profile, np.arange(3))
    assert cores[0].skipped == "" and cores[0].selectivity > 1.0
    assert cores[1].skipped.startswith("selectivity") and "core_tokens.min_selectivity=1" in cores[1].skipped
    assert cores[2].skipped == "constant activation over the corpus (dead neuron)"


def test_special_tokens_are_never_core_tokens():
    texts = ["<bos>", " the", " cat", "<eos>", " dog"]
    keep = CoreTokensConfig().keep_mask(texts, special_ids=[0, 3])
    assert keep.tolist() == [False, True, True, False, True]
    assert CoreTokensConfig(drop_special=False).keep_mask(texts, special_ids=[0, 3]) is None


class TopKProfile:
    def __init__(self, token_ids, values):
        D = token_ids.shape[0]
        self.tensors = {"topk_token_ids": token_ids, "topk_values": values,
                        "act_mean": np.zeros(D), "act_var": np.ones(D)}  # fmt: skip

    def numpy(self, name):
        return np.asarray(self.tensors[name])


def test_merged_occurrences_are_one_core_token_per_type_at_its_mean_activation():
    token_ids = np.array([[7, 3, 7, 9, 3, 7]])
    values = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, -np.inf]])  # the last slot was never filled
    config = CoreTokensConfig(unit="occurrence", n=10, min_selectivity=0)
    (core,) = config.select(TopKProfile(token_ids, values), np.array([0]))
    assert core.token_ids.tolist() == [7, 3, 9]
    np.testing.assert_allclose(core.acts, [5.0, 3.5, 3.0])
    (kept,) = CoreTokensConfig(unit="occurrence", n=10, min_selectivity=0, repeats="keep").select(
        TopKProfile(token_ids, values), np.array([0])
    )
    assert kept.token_ids.tolist() == [7, 3, 7, 9, 3]


def test_occurrence_null_neurons_are_calibrated_once_repeats_merge():
    """Null neurons whose top occurrences repeat token types (activation independent of the vectors):
    kept apart, the repeats' self-similarity makes the top segment look homogeneous far more often
    than alpha; merged, the false-positive rate is alpha within binomial tolerance."""
    rng = np.random.default_rng(3)
    n_neurons, vocab, d, K = 200, 300, 32, 100
    E = rng.normal(size=(vocab, d))
    token_ids = np.empty((n_neurons, K), dtype=np.int64)
    values = np.empty((n_neurons, K))
    for j in range(n_neurons):
        # Zipf-like repeats: a few types fill many of the top occurrences
        types = rng.choice(vocab, 40, replace=False)
        weights = 1.0 / np.arange(1, 41)
        ids = rng.choice(types, K, p=weights / weights.sum())
        # activations depend on the token type (as for a real neuron) but not on its vector
        level = dict(zip(types, rng.normal(size=40), strict=True))
        acts = np.array([level[t] for t in ids]) + 0.3 * rng.normal(size=K)
        order = np.argsort(-acts)  # top-k slots are sorted by activation
        token_ids[j], values[j] = ids[order], acts[order]
    profile = TopKProfile(token_ids, values)
    neuron = TwoFoldNeuron(n_permutations=200, n_mantel_permutations=0, min_tokens=10)
    rates = {}
    for repeats in ("keep", "merge"):
        config = CoreTokensConfig(unit="occurrence", n=100, min_selectivity=0, repeats=repeats)
        p = [neuron.analyse(c.acts, E[c.token_ids], seed=(0, c.neuron)).row["p_top"]
             for c in config.select(profile, np.arange(n_neurons))]  # fmt: skip
        rates[repeats] = float(np.mean(np.asarray(p) < 0.05))
    assert rates["keep"] > 0.12, rates  # anti-conservative
    assert rates["merge"] <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / n_neurons), rates


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"min_selectivity": -1.0}, "core_tokens.min_selectivity"), ({"repeats": "drop"}, "core_tokens.repeats")],
)
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        CoreTokensConfig(**overrides).validate()
