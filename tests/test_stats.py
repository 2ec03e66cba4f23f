"""Streaming stats against brute force on random matrices: batching, merging, saving and specs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats as sps

from intraneuron.errors import ConfigError
from intraneuron.extraction import (
    ALL_STATS,
    DEFAULT_STATS,
    STAT_NAMES,
    CombinedStat,
    ExtractionConfig,
    profile_key_fields,
)
from intraneuron.extraction.cache import cache_key
from intraneuron.extraction.reducers import Histogram, Moments, TopK
from intraneuron.extraction.stats import PREFIXES, resolve_stats
from intraneuron.extraction.type_tables import TokenTypeTable, TypesFromFolds

N, D, M, V, K = 300, 6, 4, 11, 5
EDGES = torch.linspace(-2, 4, 9)  # [B + 1], B = 8
CHUNKS = (slice(0, 50), slice(50, 137), slice(137, N))
CONFIG = ExtractionConfig(top_k=K, hist_min=-2.0, hist_max=4.0, hist_bins=8)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(N, D, generator=g) * 2 + 1  # [N, D]
    acts[: EDGES.numel(), 0] = EDGES  # values exactly on the edges, and one float32 step either side
    acts[: EDGES.numel(), 2] = torch.nextafter(EDGES, torch.tensor(-torch.inf))
    acts[EDGES.numel() : 2 * EDGES.numel(), 2] = torch.nextafter(EDGES, torch.tensor(torch.inf))
    acts[:, 1] = acts[:, 1].abs()  # a column that is never negative
    resid = torch.randn(N, M, generator=g)  # [N, M]
    ids = torch.randint(0, V, (N,), generator=g)  # [N]
    ids[ids == 7] = 8  # an unseen type inside the vocabulary
    return acts, resid, ids, torch.arange(N)


MAKERS = {
    "topk": lambda: TopK(K, D),
    "types": lambda: TokenTypeTable(V, D),
    "moments": lambda: Moments(D),
    "hist": lambda: Histogram(EDGES, D),
}


def feed(stat, acts, ids, pos):
    if isinstance(stat, TopK):
        stat.add(acts, pos)
    elif isinstance(stat, TokenTypeTable):
        stat.add(acts, ids)
    else:
        stat.add(acts)
    return stat


def reference(name: str, acts: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brute force on the full matrix, in the stat's export names."""
    A = acts.double()
    if name == "topk":
        order = torch.sort(A, dim=0, descending=True)
        return {"topk_values": order.values[:K].T, "topk_positions": order.indices[:K].T}
    if name == "types":
        types = ids.unique()
        rows = [A[ids == t] for t in types]
        return {
            "type_ids": types,
            "type_count": torch.tensor([len(r) for r in rows]),
            "type_mean": torch.stack([r.mean(0) for r in rows]),
            "type_max": torch.stack([r.max(0).values for r in rows]),
        }
    if name == "moments":
        a = A.numpy()
        return {
            "act_count": torch.tensor(N),
            "act_mean": torch.from_numpy(a.mean(0)),
            "act_var": torch.from_numpy(a.var(0)),
            "act_skew": torch.from_numpy(sps.skew(a, 0)),
            "act_kurt": torch.from_numpy(sps.kurtosis(a, 0, fisher=False)),
            "act_min": A.min(0).values,
            "act_max": A.max(0).values,
            "act_frac_positive": (A > 0).double().mean(0),
        }
    bins = torch.bucketize(acts, EDGES, right=True)  # [N, D] in 0..B+1
    counts = torch.stack([torch.bincount(bins[:, j], minlength=EDGES.numel() + 1) for j in range(D)])
    return {"hist_edges": EDGES, "hist_counts": counts}


def assert_states(a: dict, b: dict, exact: bool = False, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in b:
        if exact or not (a[key].is_floating_point() or b[key].is_floating_point()):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key].double(), b[key].double(), rtol=rtol, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_batched_equals_once_equals_brute_force(name, data):
    acts, _, ids, pos = data
    once = feed(MAKERS[name](), acts, ids, pos)
    batched = MAKERS[name]()
    for sl in CHUNKS:
        feed(batched, acts[sl], ids[sl], pos[sl])
    assert_states(batched.state_dict(), once.state_dict(), exact=name in ("topk", "hist"))
    assert_states(once.state_dict(), reference(name, acts, ids), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_merge_of_shards_equals_one_pass(name, data):
    acts, _, ids, pos = data
    whole = feed(MAKERS[name](), acts, ids, pos)
    left = feed(MAKERS[name](), acts[:137], ids[:137], pos[:137])
    right = feed(MAKERS[name](), acts[137:], ids[137:], pos[137:])
    left.merge(right)
    assert_states(left.state_dict(), whole.state_dict(), exact=name in ("topk", "hist"))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_round_trips_and_resumes(name, data):
    acts, _, ids, pos = data
    first = feed(MAKERS[name](), acts[:137], ids[:137], pos[:137])
    state = first.state_dict("saved")
    assert all(k.startswith("saved_") for k in state)
    rebuilt = type(first).load_state_dict(state, "saved")
    assert_states(rebuilt.state_dict("saved"), state, exact=True)

    # resume with add, and merge with a shard from elsewhere: both as if one pass
    whole = feed(MAKERS[name](), acts, ids, pos).state_dict()
    exact = name in ("topk", "hist")
    resumed = feed(type(first).load_state_dict(state, "saved"), acts[137:], ids[137:], pos[137:])
    assert_states(resumed.state_dict(), whole, exact=exact)
    merged = type(first).load_state_dict(state, "saved")
    merged.merge(feed(MAKERS[name](), acts[137:], ids[137:], pos[137:]))
    assert_states(merged.state_dict(), whole, exact=exact)


def test_rebuilt_type_table_grows_to_the_other_shards_vocabulary(data):
    acts, _, ids, _ = data
    low = ids < 5
    part = feed(TokenTypeTable(V, D), acts[low], ids[low], None)
    small = TokenTypeTable.load_state_dict(part.state_dict())  # vocabulary 0..4 only
    assert small.count.numel() == 5
    small.merge(feed(TokenTypeTable(V, D), acts[~low], ids[~low], None))
    assert_states(small.state_dict(), feed(TokenTypeTable(V, D), acts, ids, None).state_dict())


# every stat CombinedStat builds alone (pseudo_neurons needs a model: tests/test_extraction_pseudo.py)
BUILDABLE = ALL_STATS - {"pseudo_neurons"}


def test_combined_stat_keys_are_disjoint_and_prefixed(data):
    acts, resid, ids, pos = data
    combined = CombinedStat.build(BUILDABLE, d_mlp=D, d_model=M, vocab_size=V, config=CONFIG)
    combined.add(acts, resid, ids, pos, pos // 8)
    state = combined.state_dict()
    per_stat = {name: stat.state_dict(PREFIXES[name]) for name, stat in combined.stats.items()}
    # the regression: the layer-input table once wrote type_ids / type_count over the neurons'
    assert sum(len(s) for s in per_stat.values()) == len(state)
    for name, part in per_stat.items():
        assert all(k.startswith(PREFIXES[name] + "_") for k in part), name
    assert {"type_ids", "type_count", "resid_ids", "resid_count", "resid_mean"} <= state.keys()
    assert "resid_max" not in state
    ref = reference("types", resid, ids)
    torch.testing.assert_close(state["resid_mean"].double(), ref["type_mean"], rtol=1e-5, atol=1e-6)
    assert torch.equal(state["resid_count"], ref["type_count"])


def test_combined_stat_merges_and_round_trips(data):
    acts, resid, ids, pos = data

    def build(spec=BUILDABLE):
        return CombinedStat.build(spec, d_mlp=D, d_model=M, vocab_size=V, config=CONFIG)

    win = pos // 8
    whole = build()
    whole.add(acts, resid, ids, pos, win)
    left, right = build(), build()
    left.add(acts[:137], resid[:137], ids[:137], pos[:137], win[:137])
    right.add(acts[137:], resid[137:], ids[137:], pos[137:], win[137:])
    rebuilt = CombinedStat.load_state_dict(left.state_dict())
    assert rebuilt.spec == tuple(sorted(BUILDABLE))
    rebuilt.merge(right)
    assert_states(rebuilt.state_dict(), whole.state_dict())

    only = build({"moments", "topk"})
    only.add(acts, None, ids, pos)
    assert {k.split("_")[0] for k in only.state_dict()} == {"act", "topk"}
    with pytest.raises(ValueError, match="merge"):
        only.merge(whole)


def test_stat_names_and_spec_checks():
    assert STAT_NAMES[:5] == ("topk", "token_types", "moments", "histogram", "input_token_types")
    assert set(STAT_NAMES[5:]) == {"fold_token_types", "pseudo_neurons"}
    assert resolve_stats(["moments", "topk", "moments"], CONFIG) == ("moments", "topk")
    assert resolve_stats(None, CONFIG) == tuple(sorted(DEFAULT_STATS)) == tuple(sorted(STAT_NAMES[:5]))
    no_input = dataclasses.replace(CONFIG, input_site=None)
    assert "input_token_types" not in resolve_stats(None, no_input)
    with pytest.raises(ConfigError) as err:
        resolve_stats(["input_token_types"], no_input)
    assert err.value.key == "extraction.input_site"
    with pytest.raises(ValueError, match="stats=.*sparsity"):
        resolve_stats(["topk", "sparsity"], CONFIG)


def test_cache_key_follows_the_spec(tiny_gpt2, small_windows):
    def key(spec, config=CONFIG):
        return cache_key(profile_key_fields(tiny_gpt2, small_windows, 0, config, spec))

    assert key(["topk", "moments"]) == key(["moments", "topk"]) == key(("topk", "moments", "topk"))
    assert key(["topk", "moments"]) != key(["topk", "moments", "histogram"])
    assert key(None) == key(DEFAULT_STATS) != key(["topk"])
    # a setting only another stat reads does not split the cache
    assert key(["moments"]) == key(["moments"], dataclasses.replace(CONFIG, top_k=K + 1))
    assert key(["topk"]) != key(["topk"], dataclasses.replace(CONFIG, top_k=K + 1))
    fields = profile_key_fields(tiny_gpt2, small_windows, 0, CONFIG, ["topk", "moments"])
    assert fields["stats"] == ["moments", "topk"]


def test_type_table_keyed_by_the_types_that_occur_equals_the_dense_one(data):
    acts, _, ids, _ = data
    dense = TokenTypeTable(V, D)
    keyed = TokenTypeTable(ids.unique(), D)  # the engine's sizing: only the types the pass will see
    assert keyed.sum.shape == (ids.unique().numel(), D) and ids.unique().numel() < V
    half = TokenTypeTable(ids.unique()[::2], D)  # a key set missing types: grows when they come
    for sl in CHUNKS:
        for table in (dense, keyed, half):
            feed(table, acts[sl], ids[sl], None)
    assert_states(keyed.state_dict(), dense.state_dict(), exact=True)
    assert_states(half.state_dict(), dense.state_dict(), exact=True)
    assert torch.equal(half.keys, ids.unique())
    left, right = TokenTypeTable(ids[:137].unique(), D), TokenTypeTable(ids[137:].unique(), D)
    feed(left, acts[:137], ids[:137], None).merge(feed(right, acts[137:], ids[137:], None))
    assert_states(left.state_dict(), dense.state_dict())  # the union of two shards' key sets


def test_type_table_derived_from_the_fold_table_equals_its_own_table(data):
    acts, _, ids, _ = data
    window = torch.arange(N) // 7  # 7 tokens per window: halves of the corpus by window parity
    folds = TokenTypeTable((ids * 2 + window % 2).unique(), D)
    types = TokenTypeTable(ids.unique(), D)
    for sl in CHUNKS:
        folds.add(acts[sl], ids[sl] * 2 + window[sl] % 2)
        types.add(acts[sl], ids[sl])
    derived = TypesFromFolds(folds).state_dict()
    own = types.state_dict()
    for key in ("type_ids", "type_count", "type_max"):  # exact: counts add, maxima take the max
        assert torch.equal(derived[key], own[key]), key
    assert_states(derived, own, rtol=1e-6)  # sums in a different order
    assert_states(derived, reference("types", acts, ids), rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_topk_of_many_batches_equals_a_full_sort_by_value_then_position(tied):
    """Later batches take the candidates-only path (few values above the running K-th)."""
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(3000, D, generator=g)
    if tied:  # heavy ties: equal values keep the smallest positions
        acts = (acts * 3).round()
    positions = torch.arange(3000)
    stat = TopK(K, D)
    for start in range(0, 3000, 100):
        stat.add(acts[start : start + 100], positions[start : start + 100])
    by_position = torch.arange(3000)[:, None].expand_as(acts)
    order = torch.sort(acts, dim=0, descending=True, stable=True).indices[:K]  # ties: smaller position first
    assert torch.equal(stat.values, acts.gather(0, order))
    assert torch.equal(stat.positions, by_position.gather(0, order))


@pytest.mark.parametrize("track_max", [True, False])
def test_export_in_place_equals_state_dict_bit_for_bit(data, monkeypatch, track_max):
    """The end-of-pass export writes the means over the sums, derives the per-type table as it goes
    and gives pages back (extraction/table_export.py): the same numbers as the plain export, every
    block boundary crossed (3 float64 rows per block, so a type's two halves straddle blocks)."""
    from intraneuron.extraction import table_export
    from intraneuron.extraction.types import TypeKeys

    monkeypatch.setattr(table_export, "EXPORT_BLOCK_BYTES", 3 * 8 * D)
    acts, resid, ids, pos = data
    window = pos // 7
    keys = TypeKeys(ids.unique(), (ids * 2 + window % 2).unique())
    config = dataclasses.replace(CONFIG, track_type_max=track_max, input_site="hook_resid_pre")
    spec = ("fold_token_types", "token_types", "input_token_types", "moments")

    def filled() -> CombinedStat:
        stat = CombinedStat.build(spec, d_mlp=D, d_model=M, config=config, keys=keys)
        for sl in CHUNKS:
            stat.add(acts[sl], resid[sl], ids[sl], pos[sl], window[sl])
        return stat

    plain = filled().state_dict()
    stat = filled()
    folds = stat.stats["fold_token_types"]
    assert folds._mapping is not None  # the in-place path is the one under test
    sums_at = folds.sum.untyped_storage().data_ptr()
    exported = stat.export()
    assert exported["fold_mean"].untyped_storage().data_ptr() == sums_at  # written over the sums
    assert_states(exported, plain, exact=True)
    assert ("type_max" in exported) == track_max


def test_export_of_a_table_with_unseen_rows_is_the_plain_one(data):
    acts, _, ids, _ = data
    table = feed(TokenTypeTable(V, D), acts, ids, None)  # type 7 never occurs: not exported in place
    plain = table.state_dict()
    assert_states(table.export(), plain, exact=True)
