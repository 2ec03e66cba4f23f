"""The memory plan: layers split into passes under `extraction.memory_gb` give the profiles of one
pass; a layer that cannot fit is refused in one line before any forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from intraneuron.errors import ConfigError
from intraneuron.extraction import STAT_NAMES, ExtractionConfig, extract_profiles
from intraneuron.extraction.cache import CachedProfile, ProfileCache
from intraneuron.extraction.memory import (
    GB,
    layer_footprint,
    plan_extraction,
    plan_passes,
    weight_bytes_up_to,
)
from intraneuron.extraction.stats import resolve_stats

LAYERS = [0, 1, 2]
SETTINGS = ExtractionConfig(top_k=5, batch_size=8, hist_min=-1.0, hist_max=1.0, hist_bins=16, progress=False,
                            input_site="hook_resid_mid", skip_first_positions=1, pseudo_neurons=16,
                            pseudo_calibration_windows=8)  # fmt: skip
SPEC = resolve_stats(STAT_NAMES, SETTINGS)


@pytest.fixture(autouse=True)
def steady_process_size(monkeypatch):
    """The plan counts what the process holds (its RSS), which moves between two calls of a test:
    a fixed 1 GB keeps the budgets below exact."""
    monkeypatch.setattr("intraneuron.extraction.memory.held_bytes", lambda: GB)
    monkeypatch.setattr("intraneuron.extraction.memory.weight_bytes_up_to", lambda handle, layer: 0)


def budget_for(handle, windows, layers_per_pass: int) -> float:
    """memory_gb that fits exactly `layers_per_pass` layers beside the model."""
    plan, _ = plan_extraction(handle, windows, LAYERS, SETTINGS, SPEC)
    per_layer = plan.per_layer[LAYERS[0]]
    return (plan.fixed + per_layer * (layers_per_pass + 0.5)) / GB


def count_forwards(handle):
    calls = []
    hook = handle.model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, hook


def test_plan_passes_is_greedy_in_layer_order():
    per_layer = {0: 3, 5: 3, 2: 3, 9: 3}
    plan = plan_passes([9, 0, 5, 2], per_layer, fixed=1, memory_gb=7.5 / GB)  # 1 + 2 * 3 <= 7.5 < 1 + 3 * 3
    assert plan.passes == [[0, 2], [5, 9]]
    assert plan_passes([0, 2], per_layer, fixed=1, memory_gb=100 / GB).passes == [[0, 2]]
    assert "2 passes" in plan.describe()


def test_the_footprint_is_sized_by_the_corpus_types_not_the_vocabulary():
    settings = dataclasses.replace(SETTINGS, pseudo_neurons=256, top_k=100, hist_bins=200)
    small = layer_footprint(SPEC, settings, d_mlp=1536, d_model=576, n_types=21_195, n_folds=35_915)
    dense = layer_footprint(SPEC, settings, d_mlp=1536, d_model=576, n_types=49_152, n_folds=98_304)
    assert small.tables < 0.4 * dense.tables
    # one fold table (sum float64 + max float32), not a fold table and a per-type table
    assert small.tables >= 35_915 * 1536 * 12


@pytest.mark.parametrize("cached", [False, True])
def test_a_small_budget_splits_the_layers_into_passes_equal_to_one_pass(tiny_gpt2, small_windows, tmp_path,
                                                                         cached, caplog):  # fmt: skip
    calls, hook = count_forwards(tiny_gpt2)
    try:
        one = extract_profiles(tiny_gpt2, small_windows, LAYERS, SETTINGS, cache=None, stats=SPEC)
    finally:
        hook.remove()
    forwards_of_one_pass = len(calls)
    settings = dataclasses.replace(SETTINGS, memory_gb=budget_for(tiny_gpt2, small_windows, 1))
    calls, hook = count_forwards(tiny_gpt2)
    caplog.set_level("INFO", logger="intraneuron.extraction")
    try:
        split = extract_profiles(tiny_gpt2, small_windows, LAYERS, settings,
                                 cache=ProfileCache(tmp_path) if cached else None, stats=SPEC)  # fmt: skip
    finally:
        hook.remove()
    assert "3 passes" in caplog.text and "pass 3 of 3" in caplog.text
    assert len(calls) == 3 * forwards_of_one_pass  # one pass per layer
    for layer in LAYERS:
        assert isinstance(split[layer], CachedProfile) == cached  # a saved layer is read back when used
        assert sorted(split[layer].tensors) == sorted(one[layer].tensors)
        for key, value in one[layer].tensors.items():
            assert torch.equal(split[layer][key], value), (layer, key)

    two = dataclasses.replace(SETTINGS, memory_gb=budget_for(tiny_gpt2, small_windows, 2))
    plan, _ = plan_extraction(tiny_gpt2, small_windows, LAYERS, two, SPEC)
    assert plan.passes == [[0, 1], [2]]


def test_blocked_halves_fill_the_tables_the_plan_sized_and_split_passes_equal_one(tiny_gpt2, small_windows,
                                                                                  monkeypatch):  # fmt: skip
    """The plan's keys and the pass's fold keys follow one block size: no table grows during the
    pass (a grown table is memory the plan did not count), and three passes give one pass's numbers."""
    from intraneuron.extraction.type_tables import TokenTypeTable

    blocked = dataclasses.replace(SETTINGS, fold_block_windows=6)
    one = extract_profiles(tiny_gpt2, small_windows, LAYERS, blocked, cache=None, stats=SPEC)

    def refuse(table, keys):
        raise AssertionError(f"a type table grew during the pass by {keys.numel()} keys")

    monkeypatch.setattr(TokenTypeTable, "_grow", refuse)
    split = extract_profiles(tiny_gpt2, small_windows, LAYERS, dataclasses.replace(
        blocked, memory_gb=budget_for(tiny_gpt2, small_windows, 1)), cache=None, stats=SPEC)  # fmt: skip
    for layer in LAYERS:
        assert sorted(split[layer].tensors) == sorted(one[layer].tensors)
        for key, value in one[layer].tensors.items():
            assert torch.equal(split[layer][key], value), (layer, key)
    _, counts, _ = one[0].split_type_stats()  # [2, T]: blocks of 6 of the 64 windows, 31 tokens kept each
    assert counts.sum(1).tolist() == [34 * 31, 30 * 31]


def test_a_layer_that_cannot_fit_is_refused_before_any_forward(tiny_gpt2, small_windows):
    settings = dataclasses.replace(SETTINGS, memory_gb=1.0)  # all of it held already
    calls, hook = count_forwards(tiny_gpt2)
    try:
        with pytest.raises(ConfigError, match=r"extraction\.memory_gb.*at least .* GB: layer 0 alone needs") as err:
            extract_profiles(tiny_gpt2, small_windows, LAYERS, settings, cache=None, stats=SPEC)
    finally:
        hook.remove()
    assert calls == [] and "\n" not in str(err.value)


def test_type_tables_stay_on_the_accelerator_only_when_they_fit(monkeypatch):
    from intraneuron.extraction.memory import table_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GB, 80 * GB))
    cuda = torch.device("cuda:0")
    assert table_device(cuda, 4 * GB) == cuda
    assert table_device(cuda, 9 * GB) == torch.device("cpu")  # beyond the share of free memory kept free
    assert table_device(torch.device("cpu"), 10**15) == torch.device("cpu")


def test_tables_keyed_by_the_corpus_keys_equal_tables_keyed_by_the_vocabulary(tiny_gpt2, small_windows):
    """The engine's sizing (TypeKeys of the windows) against dense vocabulary-sized tables: the same
    numbers, bit for bit, from a fraction of the rows."""
    from intraneuron.extraction.stats import CombinedStat
    from intraneuron.extraction.types import TypeKeys

    ids = torch.from_numpy(small_windows.ids[:, 1:].reshape(-1).astype("int64"))
    acts = torch.randn(ids.numel(), 6, generator=torch.Generator().manual_seed(1))
    windows = torch.arange(small_windows.ids.shape[0]).repeat_interleave(small_windows.window_len - 1)
    keys = TypeKeys.of_windows(small_windows.ids, range(small_windows.ids.shape[0]), 1)
    spec = ("fold_token_types", "token_types")
    keyed = CombinedStat.build(spec, d_mlp=6, d_model=4, keys=keys, config=SETTINGS, table_device="cpu")
    dense = CombinedStat.build(spec, d_mlp=6, d_model=4, vocab_size=tiny_gpt2.vocab_size, config=SETTINGS)
    for start in range(0, ids.numel(), 500):
        part = slice(start, start + 500)
        for stat in (keyed, dense):
            stat.add(acts[part], None, ids[part], torch.arange(ids.numel())[part], windows[part])
    assert keyed.stats["fold_token_types"].sum.shape[0] == keys.folds.numel() < 2 * tiny_gpt2.vocab_size
    a, b = keyed.state_dict(), dense.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_plan_counts_the_weights_up_to_the_deepest_layer(tiny_gpt2):
    every = sum(p.numel() * p.element_size() for p in tiny_gpt2.model.parameters())
    sizes = [weight_bytes_up_to(tiny_gpt2, layer) for layer in range(tiny_gpt2.n_layers)]
    assert sizes == sorted(set(sizes)) and sizes[-1] == every
    block = sum(p.numel() * p.element_size() for p in tiny_gpt2.model.transformer.h[1].parameters())
    assert sizes[1] - sizes[0] == block
