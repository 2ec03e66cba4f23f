"""The streaming extraction engine against brute force on the full activation matrix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from intraneuron.errors import ConfigError
from intraneuron.extraction import ExtractionConfig, extract_profiles
from intraneuron.extraction.cache import ProfileCache
from intraneuron.extraction.reducers import Histogram, Moments, TopK
from intraneuron.extraction.type_tables import TokenTypeTable
from tests.test_stats import feed

SETTINGS = ExtractionConfig(top_k=7, batch_size=5, hist_min=-1.0, hist_max=1.0, hist_bins=16, progress=False)


def full_activations(handle, windows, layer: int):
    """Brute force: every activation of the layer and its input, by an independent hook + hidden states."""
    acts = []
    module = handle.model.transformer.h[layer].mlp.act  # tiny GPT-2: read GELU's output directly
    hook = module.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
    ids = torch.from_numpy(np.asarray(windows.ids, dtype=np.int64))
    with torch.no_grad():
        out = handle.model(ids, output_hidden_states=True)
    hook.remove()
    A = acts[0].reshape(-1, handle.d_mlp).double()  # [n_tokens, d_mlp]
    R = out.hidden_states[layer].reshape(-1, handle.d_model).double()  # [n_tokens, d_model]
    return A, R, ids.reshape(-1)


@pytest.fixture(scope="module")
def profile_and_reference(tiny_gpt2, small_windows):
    profiles = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache=None)
    return profiles[1], full_activations(tiny_gpt2, small_windows, 1)


def test_topk_equals_full_sort(profile_and_reference):
    profile, (A, _, ids) = profile_and_reference
    order = torch.sort(A, dim=0, descending=True, stable=True)
    assert torch.allclose(profile["topk_values"].double(), order.values[:7].T, atol=1e-6)
    # positions may differ only between exactly tied values; check they point at those values
    gathered = A.gather(0, profile["topk_positions"].T)
    assert torch.allclose(gathered, order.values[:7], atol=1e-6)
    assert torch.equal(profile["topk_token_ids"], ids[profile["topk_positions"]])


def test_per_type_tables_equal_brute_force(profile_and_reference):
    profile, (A, R, ids) = profile_and_reference
    types, counts = torch.unique(ids, return_counts=True)
    assert torch.equal(profile["type_ids"], types)
    assert torch.equal(profile["type_count"], counts)
    assert torch.equal(profile["resid_ids"], types)
    assert torch.equal(profile["resid_count"], counts)
    onehot = (ids[None, :] == types[:, None]).double()  # [T, N]
    assert torch.allclose(profile["type_mean"].double(), onehot @ A / counts[:, None], atol=1e-6)
    assert torch.allclose(profile["resid_mean"].double(), onehot @ R / counts[:, None], atol=1e-5)
    ref_max = torch.stack([A[ids == t].max(0).values for t in types])
    assert torch.allclose(profile["type_max"].double(), ref_max, atol=1e-6)


def test_moments_and_histogram_equal_brute_force(profile_and_reference):
    profile, (A, _, _) = profile_and_reference
    a = A.numpy()
    assert profile["act_count"].item() == a.shape[0]
    np.testing.assert_allclose(profile.numpy("act_mean"), a.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(profile.numpy("act_var"), a.var(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(profile.numpy("act_skew"), stats.skew(a, 0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(profile.numpy("act_kurt"), stats.kurtosis(a, 0, fisher=False), rtol=1e-3)
    np.testing.assert_allclose(profile.numpy("act_frac_positive"), (a > 0).mean(0), atol=1e-7)
    edges = profile.numpy("hist_edges").astype(np.float64)
    inner = np.stack([np.histogram(col, bins=edges)[0] for col in a.T.astype(np.float32)])
    counts = profile.numpy("hist_counts")
    under, over = (a < edges[0]).sum(0), (a >= edges[-1]).sum(0)
    np.testing.assert_array_equal(counts[:, 0], under)
    np.testing.assert_array_equal(counts[:, -1], over)
    # np.histogram closes its last bin on the right; ours sends the right edge to overflow
    np.testing.assert_array_equal(counts[:, 1:-2], inner[:, :-1])
    assert counts.sum(1).tolist() == [a.shape[0]] * a.shape[1]


def test_reducers_merge_across_shards_like_one_pass():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(300, 6, generator=g) * 3 + 1
    ids = torch.randint(0, 11, (300,), generator=g)
    pos = torch.arange(300)
    whole = [TopK(5, 6), TokenTypeTable(11, 6), Moments(6), Histogram(torch.linspace(-2, 4, 9), 6)]
    halves = [
        [TopK(5, 6), TokenTypeTable(11, 6), Moments(6), Histogram(torch.linspace(-2, 4, 9), 6)]
        for _ in range(2)
    ]
    for r in whole:
        feed(r, acts, ids, pos)
    for part, sl in zip(halves, (slice(0, 137), slice(137, 300)), strict=True):
        for r in part:
            feed(r, acts[sl], ids[sl], pos[sl])
    for merged, other, reference in zip(halves[0], halves[1], whole, strict=True):
        merged.merge(other)
        a, b = merged.state_dict(), reference.state_dict()
        assert a.keys() == b.keys()
        for key in b:
            assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5), key


def test_early_exit_never_runs_later_layers(tiny_gpt2, small_windows):
    model = tiny_gpt2.model
    calls = {"later": 0, "head": 0, "reached": 0}
    hooks = [
        model.transformer.h[1].register_forward_hook(lambda *_: calls.__setitem__("later", calls["later"] + 1)),
        model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1)),
        model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.__setitem__("reached", calls["reached"] + 1)),
    ]
    try:
        extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache=None)
    finally:
        for h in hooks:
            h.remove()
    assert calls["reached"] > 0
    assert calls["later"] == 0 and calls["head"] == 0


def test_cache_hit_skips_forward_and_corruption_is_rebuilt(tiny_gpt2, small_windows, tmp_path, caplog):
    cache = ProfileCache(tmp_path)
    forwards = []
    hook = tiny_gpt2.model.transformer.wte.register_forward_hook(lambda *_: forwards.append(1))
    try:
        first = extract_profiles(tiny_gpt2, small_windows, [0, 1], SETTINGS, cache)
        n_first = len(forwards)
        second = extract_profiles(tiny_gpt2, small_windows, [0, 1], SETTINGS, cache)
        assert len(forwards) == n_first > 0  # second run: no forward pass at all
        for layer in (0, 1):
            for key, value in first[layer].tensors.items():
                assert torch.equal(value, second[layer][key]), key
        # an analysis-only difference (batch size) must hit the same entries
        other_batching = dataclasses.replace(SETTINGS, batch_size=3)
        extract_profiles(tiny_gpt2, small_windows, [1], other_batching, cache)
        assert len(forwards) == n_first

        entries = sorted(cache.root.iterdir())
        assert len(entries) == 2
        tensor_file = entries[0] / "profile.safetensors"
        data = bytearray(tensor_file.read_bytes())
        data[-10] ^= 0xFF  # flip bits inside the tensor data
        tensor_file.write_bytes(bytes(data))
        third = extract_profiles(tiny_gpt2, small_windows, [0, 1], SETTINGS, cache)
        assert len(forwards) > n_first  # rebuilt, not trusted
        assert "corrupt" in caplog.text
        for layer in (0, 1):
            assert torch.allclose(third[layer]["type_mean"], first[layer]["type_mean"])
        assert not any(p.name.startswith(".tmp") for p in cache.root.iterdir())
    finally:
        hook.remove()


def test_truncated_entry_is_rebuilt(tiny_gpt2, small_windows, tmp_path):
    cache = ProfileCache(tmp_path)
    extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    (entry,) = cache.root.iterdir()
    (entry / "manifest.json").write_text("{")  # a partial write
    rebuilt = extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    assert rebuilt[0]["topk_values"].shape == (tiny_gpt2.d_mlp, 7)
    assert (entry / "manifest.json").read_text().startswith("{\n")


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (ExtractionConfig(top_k=0), "extraction.top_k"),
        (ExtractionConfig(batch_size=0), "extraction.batch_size"),
        (ExtractionConfig(hist_min=1.0, hist_max=0.0), "extraction.hist_min"),
        (ExtractionConfig(hist_bins=0), "extraction.hist_bins"),
        (ExtractionConfig(site="mlp.hook_out"), "extraction.site"),
        (ExtractionConfig(input_site="hook_resid_post"), "extraction.input_site"),
        (ExtractionConfig(skip_first_positions=32), "extraction.skip_first_positions"),
    ],
)
def test_bad_settings_fail_before_any_forward(tiny_gpt2, small_windows, settings, key):
    with pytest.raises(ConfigError, match=key):
        extract_profiles(tiny_gpt2, small_windows, [0], settings, cache=None)


def test_layer_out_of_range_names_the_key(tiny_gpt2, small_windows):
    with pytest.raises(ConfigError, match="layer"):
        extract_profiles(tiny_gpt2, small_windows, [tiny_gpt2.n_layers], SETTINGS, cache=None)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "bert"])
def test_other_architectures_match_an_independent_hook(arch, tiny_model_dirs, small_windows):
    """The engine's top-k over the adapter's site equals a plain hook on the same neurons."""
    from intraneuron.models.loading import load_model

    handle = load_model(str(tiny_model_dirs[arch]))
    vocab = handle.vocab_size
    ids = np.asarray(small_windows.ids, dtype=np.int64) % vocab  # BERT's vocab is smaller than GPT-2's
    windows = type(small_windows)(
        path=small_windows.path, ids=ids.astype(np.uint32), window_len=small_windows.window_len,
        content_hash=f"{small_windows.content_hash}-mod{vocab}",
    )
    layer = 1
    profile = extract_profiles(handle, windows, [layer], SETTINGS, cache=None)[layer]
    module = _independent_neuron_module(handle.model, arch, layer)
    captured = []
    if arch == "llama":  # neurons are the INPUT of down_proj
        h = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        h = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        handle.model(torch.from_numpy(ids))
    h.remove()
    A = captured[0].reshape(-1, handle.d_mlp)
    assert torch.allclose(profile["topk_values"], A.topk(7, dim=0).values.T, atol=1e-5)
    assert torch.allclose(profile["act_mean"].double(), A.double().mean(0), atol=1e-5)


def _independent_neuron_module(model, arch, layer):
    if arch == "gpt_neox":
        return model.gpt_neox.layers[layer].mlp.act
    if arch == "llama":
        return model.model.layers[layer].mlp.down_proj
    return model.base_model.encoder.layer[layer].intermediate


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"top_k": True}, "extraction.top_k"),
        ({"site": "mlp.hook_out"}, "extraction.site"),
        ({"input_site": "hook_resid_post"}, "extraction.input_site"),
        ({"track_type_max": "yes"}, "extraction.track_type_max"),
        ({"hist_min": float("nan")}, "extraction.hist_min"),
        ({"hist_max": float("inf")}, "extraction.hist_max"),
        ({"hist_min": 10.0}, "extraction.hist_min"),
        ({"hist_bins": 2.5}, "extraction.hist_bins"),
        ({"skip_first_positions": -1}, "extraction.skip_first_positions"),
        ({"batch_size": 0}, "extraction.batch_size"),
        ({"device": "gpu 0"}, "extraction.device"),
        ({"progress": 1}, "extraction.progress"),
        ({"memory_gb": 0}, "extraction.memory_gb"),
        ({"memory_gb": "8GB"}, "extraction.memory_gb"),
        ({"pseudo_calibration_windows": 0}, "extraction.pseudo_calibration_windows"),
    ],
)
def test_validate_names_the_exact_key(change, key):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(ExtractionConfig(), **change).validate()
    assert err.value.key == key
    ExtractionConfig(input_site=None, site="mlp.hook_pre", device="cuda:1").validate()
    assert "batch_size" not in ExtractionConfig().key_fields()


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, intraneuron.extraction.config; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_smaller_spec_keeps_the_same_numbers(tiny_gpt2, small_windows, tmp_path):
    full = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache=None)[1]
    cache = ProfileCache(tmp_path)
    part = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache, stats={"topk", "histogram"})[1]
    assert set(part.tensors) == {"topk_values", "topk_positions", "topk_token_ids", "hist_edges", "hist_counts"}
    for key, value in part.tensors.items():
        assert torch.equal(value, full[key]), key
    assert part.input_site is None
    # only the layer input: the neuron site is not read at all
    inputs = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache, stats=["input_token_types"])[1]
    assert set(inputs.tensors) == {"resid_ids", "resid_count", "resid_mean"}
    assert torch.equal(inputs["resid_mean"], full["resid_mean"])
    assert len(list(cache.root.iterdir())) == 2


def test_input_stat_without_input_site_fails_before_any_forward(tiny_gpt2, small_windows):
    no_input = dataclasses.replace(SETTINGS, input_site=None)
    profile = extract_profiles(tiny_gpt2, small_windows, [0], no_input, cache=None)[0]  # default: skip it
    assert "resid_mean" not in profile.tensors and profile.input_site is None
    with pytest.raises(ConfigError) as err:
        extract_profiles(tiny_gpt2, small_windows, [0], no_input, cache=None, stats=["input_token_types"])
    assert err.value.key == "extraction.input_site"
