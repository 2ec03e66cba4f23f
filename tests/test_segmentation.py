"""Activation segments (step 7): every scheme against a simple reference."""

import itertools

import numpy as np
import pytest

from intraneuron.analyses.two_fold.segmentation import (
    SCHEMES,
    equal_count_segments,
    equal_width_segments,
    jenks_segments,
    kmeans_segments,
    segment,
    top_segments,
    within_segment_sse,
)
from intraneuron.errors import ConfigError


def _acts(n, seed=0):
    return np.random.default_rng(seed).normal(size=n)


def _best_contiguous_split(values, n_groups):
    """Brute force: the least within-SSE split of the descending-sorted values into n_groups
    contiguous non-empty runs, over every choice of break positions. -> (sse, labels by token)."""
    order = np.argsort(-values, kind="stable")
    ranked = values[order]
    best_sse, best_labels = np.inf, None
    for breaks in itertools.combinations(range(1, values.size), n_groups - 1):
        runs = np.split(ranked, breaks)
        sse = sum(np.sum((run - run.mean()) ** 2) for run in runs)
        if sse < best_sse:
            sorted_labels = np.repeat(np.arange(n_groups), [run.size for run in runs])
            best_sse, best_labels = sse, np.empty(values.size, dtype=int)
            best_labels[order] = sorted_labels
    return best_sse, best_labels


def test_equal_count_on_a_sorted_array_is_consecutive_blocks():
    ranked = np.linspace(10.0, 1.0, 100)  # descending
    np.testing.assert_array_equal(equal_count_segments(ranked, 10), np.repeat(np.arange(10), 10))


def test_equal_count_labels_follow_the_tokens_when_shuffled():
    acts = _acts(100)
    perm = np.random.default_rng(1).permutation(100)
    np.testing.assert_array_equal(
        equal_count_segments(acts[perm], 10), equal_count_segments(acts, 10)[perm]
    )


@pytest.mark.parametrize(("n", "s"), [(23, 10), (100, 7), (9, 4), (5, 5)])
def test_equal_count_sizes_differ_by_at_most_one_and_segments_are_ordered(n, s):
    acts = _acts(n, seed=n)
    labels = equal_count_segments(acts, s)
    sizes = np.bincount(labels, minlength=s)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and sizes.min() >= 1
    for upper, lower in zip(range(s - 1), range(1, s), strict=True):
        assert acts[labels == upper].min() > acts[labels == lower].max()


def test_equal_count_ties_keep_token_order():
    acts = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 0.0])
    # descending stable order: tokens 1, 4, 0, 2, 3, 5 -> three segments of two
    np.testing.assert_array_equal(equal_count_segments(acts, 3), [1, 0, 1, 2, 0, 2])


def _equal_width_reference(acts, s):
    """Loop over bins (top - (k+1) w, top - k w]; the minimum goes in the last bin."""
    top, width = acts.max(), (acts.max() - acts.min()) / s
    labels = np.full(acts.size, s - 1)
    for i, a in enumerate(acts):
        for k in range(s):
            if top - (k + 1) * width < a <= top - k * width:
                labels[i] = k
                break
    return labels


@pytest.mark.parametrize("acts", [_acts(200, seed=2), np.arange(11.0), np.exp(_acts(50, seed=3))])
def test_equal_width_matches_a_bin_loop(acts):
    np.testing.assert_array_equal(equal_width_segments(acts, 10), _equal_width_reference(acts, 10))


def test_equal_width_constant_activations_are_one_segment():
    np.testing.assert_array_equal(equal_width_segments(np.full(7, 3.0), 5), np.zeros(7))


@pytest.mark.parametrize(("n", "s", "seed"), [(9, 3, 0), (10, 4, 1), (12, 5, 2), (8, 2, 3)])
def test_jenks_is_the_brute_force_least_squares_split(n, s, seed):
    acts = np.round(np.exp(_acts(n, seed=seed)), 3)
    best_sse, best_labels = _best_contiguous_split(acts, s)
    labels = jenks_segments(acts, s)
    assert within_segment_sse(acts, labels) == pytest.approx(best_sse, abs=1e-9)
    np.testing.assert_array_equal(labels, best_labels)  # the optimum is unique for these data


def test_jenks_with_fewer_tokens_than_segments_gives_each_token_its_own_segment():
    acts = np.array([0.5, 3.0, 1.0])
    np.testing.assert_array_equal(jenks_segments(acts, 5), [2, 0, 1])


@pytest.mark.parametrize(("n", "s", "seed"), [(9, 3, 4), (10, 4, 5), (11, 3, 6)])
def test_kmeans_within_sse_is_no_worse_than_the_brute_force_optimum(n, s, seed):
    # Any k-means partition of a line is contiguous, so the brute-force split is the optimum.
    acts = _acts(n, seed=seed)
    best_sse, _ = _best_contiguous_split(acts, s)
    labels = kmeans_segments(acts, s, seed=0)
    assert within_segment_sse(acts, labels) <= best_sse + 1e-9


def test_kmeans_segments_are_numbered_by_centre_descending():
    acts = np.concatenate([_acts(20, 1) * 0.3 + 10, _acts(20, 2) * 0.3, _acts(20, 3) * 0.3 + 5])
    labels = kmeans_segments(acts, 3)
    np.testing.assert_array_equal(labels, np.repeat([0, 2, 1], 20))


def test_kmeans_with_fewer_distinct_values_than_segments():
    labels = kmeans_segments(np.array([1.0, 1.0, 2.0, 2.0, 2.0]), 4)
    np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kmeans_segments(np.ones(4), 3), np.zeros(4))


@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])  # all-negative: the threshold is the max
def test_top_segment_holds_tokens_at_or_above_the_fraction_of_the_max(shift):
    acts = _acts(50, seed=7) + shift
    labels = top_segments(acts, 0.9)
    threshold = min(0.9 * acts.max(), acts.max())
    expected = [0 if a >= threshold else 1 for a in acts]
    np.testing.assert_array_equal(labels, expected)
    assert labels[np.argmax(acts)] == 0


def test_within_segment_sse_matches_a_loop():
    acts, labels = _acts(30), np.random.default_rng(1).integers(0, 4, 30)
    expected = sum(np.sum((acts[labels == s] - acts[labels == s].mean()) ** 2) for s in set(labels))
    assert within_segment_sse(acts, labels) == pytest.approx(expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_segment_dispatches_to_the_named_scheme_with_zero_as_the_top(scheme):
    acts = _acts(40, seed=8)
    labels = segment(acts, scheme, n_segments=4, top_fraction=0.5, seed=1)
    direct = {
        "equal_count": lambda: equal_count_segments(acts, 4),
        "equal_width": lambda: equal_width_segments(acts, 4),
        "jenks": lambda: jenks_segments(acts, 4),
        "kmeans": lambda: kmeans_segments(acts, 4, seed=1),
        "top_fraction": lambda: top_segments(acts, 0.5),
    }[scheme]()
    np.testing.assert_array_equal(labels, direct)
    assert labels[np.argmax(acts)] == 0
    assert labels.shape == acts.shape and labels.dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"scheme": "quantile"}, "segmentation.scheme"),
        ({"n_segments": 1}, "segmentation.n_segments"),
        ({"n_segments": 2.5}, "segmentation.n_segments"),
        ({"top_fraction": 1.0}, "segmentation.top_fraction"),
    ],
)
def test_bad_segmentation_settings_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        segment(_acts(10), **kwargs)


@pytest.mark.parametrize("acts", [np.array([]), np.array([1.0, np.nan]), np.ones((2, 2))])
def test_bad_activations_raise_value_error(acts):
    with pytest.raises(ValueError, match="activations"):
        segment(acts)
