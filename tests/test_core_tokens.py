"""Core-token selection against a full sort per neuron, and the token filter."""

import numpy as np
import pytest

from intraneuron.analyses.two_fold import core_tokens
from intraneuron.analyses.two_fold.core_tokens import select_core_tokens, token_filter_mask
from intraneuron.errors import ConfigError


def _values(n_candidates=500, n_neurons=40, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n_candidates, n_neurons))
    values[rng.random(values.shape) < 0.01] = np.nan
    values[:, 3] = -np.abs(values[:, 3]) - 0.1  # a neuron that is never positive
    valid = rng.random(n_candidates) > 0.2
    return values, valid


def _reference(values, valid, keep_rule, cap):
    """Full stable sort per neuron, then the rule's filter, then the cap."""
    out = []
    for j in range(values.shape[1]):
        column = values[:, j]
        usable = np.flatnonzero(valid & np.isfinite(column))
        ranked = usable[np.argsort(-column[usable], kind="stable")]
        kept = ranked[keep_rule(column[ranked], column[usable])]
        out.append(kept[:cap] if cap is not None else kept)
    return out


def _assert_same(selected, expected):
    assert len(selected) == len(expected)
    for got, want in zip(selected, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_top_n_matches_full_sort():
    values, valid = _values()
    expected = _reference(values, valid, lambda ranked, usable: slice(None), cap=25)
    _assert_same(select_core_tokens(values, valid, "top_n", n=25), expected)


def test_top_n_with_fewer_valid_candidates_returns_all_of_them():
    values, _ = _values(n_candidates=30)
    valid = np.zeros(30, dtype=bool)
    valid[:7] = True
    selected = select_core_tokens(values, valid, "top_n", n=10)
    expected = _reference(values, valid, lambda ranked, usable: slice(None), cap=10)
    _assert_same(selected, expected)
    assert all(len(s) <= 7 for s in selected)


def test_fraction_of_max_matches_brute_force_and_empty_when_max_not_positive():
    values, valid = _values()
    tau = 0.6

    def rule(ranked, usable):
        peak = usable.max()
        return ranked >= tau * peak if peak > 0 else np.zeros(ranked.size, dtype=bool)

    selected = select_core_tokens(values, valid, "fraction_of_max", tau=tau)
    _assert_same(selected, _reference(values, valid, rule, cap=None))
    assert selected[3].size == 0


def test_quantile_and_positive_match_brute_force_with_cap():
    values, valid = _values()
    quantile_rule = lambda ranked, usable: ranked >= np.quantile(usable, 0.9)  # noqa: E731
    _assert_same(
        select_core_tokens(values, valid, "quantile", q=0.9),
        _reference(values, valid, quantile_rule, cap=None),
    )
    _assert_same(
        select_core_tokens(values, valid, "positive", max_tokens=12),
        _reference(values, valid, lambda ranked, usable: ranked > 0, cap=12),
    )


def test_blocks_of_neurons_give_the_same_result(monkeypatch):
    values, valid = _values(n_candidates=200, n_neurons=23)
    whole = select_core_tokens(values, valid, "top_n", n=15)
    monkeypatch.setattr(core_tokens, "_BLOCK_VALUES", 200 * 4)  # 4 neurons per block
    _assert_same(select_core_tokens(values, valid, "top_n", n=15), whole)


def test_ties_are_ordered_by_candidate_index():
    values = np.array([[1.0], [3.0], [3.0], [2.0], [3.0]])
    np.testing.assert_array_equal(select_core_tokens(values, rule="positive")[0], [1, 2, 4, 3, 0])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rule": "best"}, "core_tokens.rule"),
        ({"n": 1}, "core_tokens.n"),
        ({"tau": 0.0}, "core_tokens.tau"),
        ({"tau": 1.5}, "core_tokens.tau"),
        ({"q": 1.0}, "core_tokens.q"),
        ({"max_tokens": 1}, "core_tokens.max_tokens"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        select_core_tokens(np.zeros((5, 2)), **kwargs)


def test_token_filter_mask():
    tokens = [" the", "...", " ", "\ufffd", "caf\u00e9", b"\xe2\x80", "\udce2", "42", "\n"]
    keep_all = token_filter_mask(tokens, False, False)
    assert keep_all.all()
    np.testing.assert_array_equal(
        token_filter_mask(tokens, drop_whitespace_punct=True, drop_byte_fragments=False),
        [True, False, False, False, True, False, False, True, False],
    )
    np.testing.assert_array_equal(
        token_filter_mask(tokens, drop_whitespace_punct=False, drop_byte_fragments=True),
        [True, True, True, False, True, False, False, True, True],
    )
