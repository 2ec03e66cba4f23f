"""Pseudo-neurons (random read-ins through the layer's own nonlinearity) and hook_resid_mid,
against brute force on tiny GPT-2 and Llama models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from intraneuron.errors import ConfigError
from intraneuron.extraction import ExtractionConfig, extract_profiles, pseudo_read_in
from intraneuron.extraction import pseudo as pseudo_module
from intraneuron.extraction.cache import ProfileCache
from intraneuron.extraction.engine import profile_key_fields
from intraneuron.extraction.hooks import capture_sites
from intraneuron.extraction.pseudo import Calibration, PseudoNeurons
from intraneuron.models.weights import read_norm, weight_layout

LAYER, N, SKIP, BATCH, CALIBRATION = 1, 24, 1, 16, 8
SETTINGS = ExtractionConfig(top_k=5, batch_size=BATCH, progress=False, skip_first_positions=SKIP,
                            pseudo_neurons=N, pseudo_seed=3, pseudo_calibration_windows=CALIBRATION)  # fmt: skip
SPEC = ("moments", "pseudo_neurons", "token_types", "topk")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def handle(request, tiny_model_dirs, tiny_gpt2):
    if request.param == "gpt2":
        return tiny_gpt2
    from intraneuron.models.loading import load_model

    return load_model(str(tiny_model_dirs["llama"]))


def capture(handle, windows, names):
    """The named sites over every window in one pass: name -> [W, T, width]."""
    ids = torch.from_numpy(np.asarray(windows.ids, dtype=np.int64))
    sites = [handle.site(n) for n in names]
    with torch.no_grad(), capture_sites(handle.module, sites, stop_early=False) as got:
        handle.model(input_ids=ids, use_cache=False)
        return {n: got[n] for n in names}


def act_fn(handle):
    if handle.adapter.name == "gpt2":
        return ACT2FN[handle.config.activation_function]
    return F.silu


def sample_windows(n_windows, count=CALIBRATION):
    """The documented calibration sample: `count` windows evenly strided over the corpus."""
    return sorted({round(i * (n_windows - 1) / (count - 1)) for i in range(count)})


def brute_force_pseudo(handle, windows, layer=LAYER, n=N, seed=3, skip=SKIP):
    """[W, T - skip, n] pseudo activations by the documented formula, and the calibration."""
    x = capture(handle, windows, [f"blocks.{layer}.ln2.hook_normalized"])[f"blocks.{layer}.ln2.hook_normalized"]
    x = x[:, skip:].double()  # [W, T', M]
    r = pseudo_read_in(handle, layer, n, seed)
    pre = torch.einsum("wtm,jrm->wtrj", x, r.weights.double()) + r.bias.T.double()  # [W, T', r, n]
    real = torch.einsum("wtm,jrm->wtrj", x, r.source_weights.double()) + r.bias.T.double()
    sample = sample_windows(x.shape[0])
    first, first_real = pre[sample].reshape(-1, *pre.shape[2:]), real[sample].reshape(-1, *pre.shape[2:])
    m, s = first.mean(0), first.std(0, correction=0)
    mr, sr = first_real.mean(0), first_real.std(0, correction=0)
    cal = (pre - m) / s * sr + mr
    act = act_fn(handle)(cal[..., 0, :])
    if r.gated:
        act = act * cal[..., 1, :]
    return act, (m, s, mr, sr)


@pytest.fixture(scope="module")
def profile(handle, small_windows):
    return extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]


def test_pseudo_stats_equal_brute_force(handle, small_windows, profile):
    act, (m, s, mr, sr) = brute_force_pseudo(handle, small_windows)
    pseudo = profile.pseudo()
    assert pseudo is not None and pseudo.d_mlp == N
    A = act.reshape(-1, N)  # [N_tokens, n]
    top = torch.sort(A, 0, descending=True).values[:5].T
    np.testing.assert_allclose(pseudo.numpy("topk_values"), top.numpy(), atol=1e-4)
    ids = torch.from_numpy(np.asarray(small_windows.ids, dtype=np.int64))[:, SKIP:].reshape(-1)
    types = torch.unique(ids)
    onehot = (ids[None] == types[:, None]).double()
    np.testing.assert_allclose(pseudo.numpy("type_mean"), (onehot @ A / onehot.sum(1, keepdim=True)).numpy(),
                               atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(pseudo.numpy("act_mean"), A.mean(0).numpy(), atol=1e-4)
    # topk_token_ids filled, at the top positions
    positions = pseudo.numpy("topk_positions")
    assert np.array_equal(pseudo.numpy("topk_token_ids"), np.asarray(small_windows.ids).reshape(-1)[positions])
    assert (positions % small_windows.window_len >= SKIP).all()
    for name, ref in zip(("pseudo_mean", "pseudo_sd", "real_mean", "real_sd"), (m, s, mr, sr), strict=True):
        np.testing.assert_allclose(pseudo.numpy(f"calib_{name}"), ref.numpy(), rtol=1e-4, atol=1e-5)
    assert pseudo.numpy("rotation_seed").tolist() == [3, LAYER]
    assert np.array_equal(pseudo.numpy("source_neurons"), pseudo_read_in(handle, LAYER, N, 3).source_neurons)
    # the real neurons' stats are untouched by the pseudo ones
    assert profile.d_mlp == handle.d_mlp and "pseudo.type_mean" in profile.tensors


def test_identity_rotation_and_calibration_reproduce_the_source_neurons(handle, small_windows, monkeypatch):
    def identity(pseudo_pre, real_pre):
        shape = pseudo_pre.shape[1:]
        return Calibration(torch.zeros(shape), torch.ones(shape), torch.zeros(shape), torch.ones(shape))

    monkeypatch.setattr(pseudo_module, "random_rotation", lambda d, rng: torch.eye(d))
    monkeypatch.setattr(pseudo_module, "calibrate", identity)
    settings = dataclasses.replace(SETTINGS, pseudo_neurons=handle.d_mlp // 2)
    stats = ("histogram", "moments", "pseudo_neurons", "token_types", "topk")
    prof = extract_profiles(handle, small_windows, [LAYER], settings, cache=None, stats=stats)[LAYER]
    pseudo, src = prof.pseudo(), prof.numpy("pseudo.source_neurons")
    assert len(set(src.tolist())) == src.size  # without replacement
    for name in ("topk_values", "act_mean", "act_var", "act_max"):
        np.testing.assert_allclose(pseudo.numpy(name), prof.numpy(name)[src], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pseudo.numpy("type_mean"), prof.numpy("type_mean")[:, src], atol=1e-5)
    assert np.array_equal(pseudo.numpy("type_ids"), prof.numpy("type_ids"))
    # pseudo-neurons get no histogram (only the real neurons' cards and tables read one)
    assert "hist_counts" in prof.tensors and "hist_counts" not in pseudo.tensors


def test_calibrated_pre_activations_match_the_source_on_the_calibration_sample(handle, small_windows):
    stat = PseudoNeurons.build(handle, LAYER, SPEC, SETTINGS, vocab_size=handle.vocab_size)
    x = capture(handle, small_windows, [f"blocks.{LAYER}.ln2.hook_normalized"])
    sample = sample_windows(small_windows.ids.shape[0])
    first = x[f"blocks.{LAYER}.ln2.hook_normalized"][sample, SKIP:].reshape(-1, handle.d_model)
    stat.calibrate(first)
    pseudo_pre, real_pre = stat.pre_activations(first), stat.source_pre_activations(first)
    calibrated = stat.calibration.apply(pseudo_pre).double()
    np.testing.assert_allclose(calibrated.mean(0), real_pre.double().mean(0), atol=1e-4)
    np.testing.assert_allclose(calibrated.std(0, correction=0), real_pre.double().std(0, correction=0), rtol=1e-4)


def test_deterministic_from_the_seed(handle, small_windows, profile):
    a, b = pseudo_read_in(handle, LAYER, N, 3), pseudo_read_in(handle, LAYER, N, 3)
    assert torch.equal(a.source_neurons, b.source_neurons) and torch.equal(a.weights, b.weights)
    c = pseudo_read_in(handle, LAYER, N, 4)
    (q,) = a.rotations  # n <= d_mlp: one rotation
    assert not torch.equal(q, c.rotations[0])
    assert not torch.equal(q, pseudo_read_in(handle, 0, N, 3).rotations[0])  # per layer
    assert torch.allclose(q @ q.T, torch.eye(handle.d_model), atol=1e-5)
    again = extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]
    for key, value in profile.tensors.items():
        assert torch.equal(value, again[key]), key


def test_more_pseudo_neurons_than_neurons_are_all_distinct(handle):
    """Beyond d_mlp a neuron is copied again under another rotation: no pseudo-neuron twice."""
    d = handle.d_mlp
    many = pseudo_read_in(handle, LAYER, 2 * d + 5, 0)
    assert many.n == 2 * d + 5 and many.rotations.shape == (3, handle.d_model, handle.d_model)
    for block in range(3):  # each block draws neurons without replacement
        sources = many.source_neurons[block * d : (block + 1) * d]
        assert sources.unique().numel() == sources.numel()
    weights = many.weights.reshape(many.n, -1)
    assert torch.unique(weights, dim=0).shape[0] == many.n  # no two alike
    first = pseudo_read_in(handle, LAYER, d, 0)  # the first block is the pseudo-neurons of n = d_mlp
    assert torch.equal(many.weights[:d], first.weights) and torch.equal(many.rotations[0], first.rotations[0])


def test_read_in_directions_reproduce_the_pass(handle, small_windows):
    """normalise(resid_mid) . direction + const = the pre-activation the pass uses."""
    r = pseudo_read_in(handle, LAYER, N, 3)
    names = [f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.ln2.hook_normalized"]
    got = capture(handle, small_windows, names)
    resid, x = (got[n].reshape(-1, handle.d_model).double() for n in names)
    layout = weight_layout(handle)
    block = handle.adapter.layer_path(LAYER)
    norm = read_norm(handle.module(f"{block}.{layout.mlp_norm}"), layout.norm_kind, layout.gain_offset)
    assert r.directions.shape == (N, 2 if r.gated else 1, handle.d_model)
    via_mlp_input = torch.einsum("nm,jrm->nrj", x, r.weights.double())
    via_residual = torch.einsum("nm,jrm->nrj", norm.normalise(resid).double(), r.directions.double())
    offset = torch.einsum("m,jrm->rj", norm.bias.double(), r.weights.double())  # LayerNorm's beta . w'
    np.testing.assert_allclose(via_residual + offset, via_mlp_input, atol=1e-4)
    if layout.norm_kind == "layernorm":
        np.testing.assert_allclose(r.directions.sum(-1), 0, atol=1e-5)


def test_cache_round_trips_pseudo(handle, small_windows, profile, tmp_path):
    cache = ProfileCache(tmp_path)
    first = extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache, stats=SPEC)[LAYER]
    loaded = extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache, stats=SPEC)[LAYER]
    assert loaded.pseudo() is not None
    for key, value in first.pseudo().tensors.items():
        assert torch.equal(value, loaded.pseudo()[key]), key
    assert loaded.pseudo().site.endswith(".pseudo")
    # the seed and count are in the key only when the stat is requested
    other = dataclasses.replace(SETTINGS, pseudo_seed=4)
    key = lambda s, spec: profile_key_fields(handle, small_windows, LAYER, s, spec)  # noqa: E731
    assert key(SETTINGS, SPEC) != key(other, SPEC)
    assert key(SETTINGS, ("topk",)) == key(other, ("topk",))
    assert "pseudo_neurons" not in key(SETTINGS, ("topk",))


def test_pseudo_stats_merge_and_need_a_neuron_stat(handle, small_windows):
    x = capture(handle, small_windows, [f"blocks.{LAYER}.ln2.hook_normalized"])[f"blocks.{LAYER}.ln2.hook_normalized"]
    x = x[:, SKIP:]
    ids = torch.from_numpy(np.asarray(small_windows.ids, dtype=np.int64))[:, SKIP:]
    T = small_windows.window_len
    pos = (torch.arange(x.shape[0])[:, None] * T + torch.arange(SKIP, T)[None]).reshape(-1)
    win = pos // T
    flat = x.reshape(-1, handle.d_model)
    ids = ids.reshape(-1)
    a = PseudoNeurons.build(handle, LAYER, SPEC, SETTINGS)
    a.add(flat[:300], ids[:300], pos[:300], win[:300])
    b = PseudoNeurons.build(handle, LAYER, SPEC, SETTINGS)
    b.calibration = a.calibration  # a second shard reuses the first's calibration
    b.add(flat[300:], ids[300:], pos[300:], win[300:])
    resumed = PseudoNeurons.load_state_dict(a.state_dict())
    resumed.merge(b)
    # one pass over everything, with the same calibration
    whole = PseudoNeurons.build(handle, LAYER, SPEC, SETTINGS)
    whole.calibration = a.calibration
    whole.add(flat, ids, pos, win)
    s, w = resumed.state_dict(), whole.state_dict()
    assert s.keys() == w.keys()
    for key in w:
        assert torch.allclose(s[key].double(), w[key].double(), atol=1e-5), key
    with pytest.raises(ValueError, match="pseudo_neurons"):
        extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache=None, stats=["pseudo_neurons"])


# ----------------------------------------------------------------------------- hook_resid_mid


def test_resid_mid_is_resid_pre_plus_attention(handle, small_windows):
    layer = LAYER
    attn_path = "attn" if handle.adapter.name == "gpt2" else "self_attn"
    block = handle.module(handle.adapter.layer_path(layer))
    outs = []
    hook = getattr(block, attn_path).register_forward_hook(lambda _m, _i, o: outs.append(o[0]))
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_mid"]
    try:
        got = capture(handle, small_windows, names)
    finally:
        hook.remove()
    torch.testing.assert_close(got[names[1]], got[names[0]] + outs[0], atol=1e-5, rtol=1e-5)
    # and the input stat reads it when asked
    settings = dataclasses.replace(SETTINGS, input_site="hook_resid_mid", skip_first_positions=0)
    prof = extract_profiles(handle, small_windows, [layer], settings, cache=None, stats=["input_token_types"])[layer]
    ids = torch.from_numpy(np.asarray(small_windows.ids, dtype=np.int64)).reshape(-1)
    R = got[names[1]].reshape(-1, handle.d_model).double()
    onehot = (ids[None] == prof["resid_ids"][:, None]).double()
    np.testing.assert_allclose(prof.numpy("resid_mean"), (onehot @ R / onehot.sum(1, keepdim=True)).numpy(),
                               atol=1e-5)  # fmt: skip
    assert prof.input_site == f"blocks.{layer}.hook_resid_mid"


def test_resid_mid_with_parallel_attention_is_the_block_input(tiny_model_dirs, small_windows):
    """GPT-NeoX runs attention and MLP in parallel: the MLP's norm reads the block's input, so
    hook_resid_mid (what the MLP reads) is hook_resid_pre there."""
    from intraneuron.models.loading import load_model

    neox = load_model(str(tiny_model_dirs["gpt_neox"]))
    profiles = {
        site: extract_profiles(neox, small_windows, [0], dataclasses.replace(SETTINGS, input_site=site),
                               cache=None, stats=["input_token_types"])[0]  # fmt: skip
        for site in ("hook_resid_mid", "hook_resid_pre")
    }
    np.testing.assert_array_equal(profiles["hook_resid_mid"].numpy("resid_mean"),
                                  profiles["hook_resid_pre"].numpy("resid_mean"))  # fmt: skip
    with pytest.raises(ConfigError, match="extraction.input_site"):
        ExtractionConfig(input_site="resid_mid").validate()


def test_the_calibration_sample_costs_no_forward_of_its_own(handle, small_windows):
    """A one-worker pass visits the sample's windows first and counts them there: every window is
    forwarded exactly once."""
    windows_forwarded = []

    def count(_module, args, kwargs):
        windows_forwarded.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    hook = handle.module(handle.adapter.layer_path(0)).register_forward_pre_hook(count, with_kwargs=True)
    try:
        extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)
    finally:
        hook.remove()
    assert sum(windows_forwarded) == small_windows.ids.shape[0]


def test_the_calibration_folded_into_the_read_in_gives_the_calibrated_activations(handle, small_windows):
    """activations() multiplies by the calibration-folded weights; the documented order (GEMM, then
    Calibration.apply, then the activation function) gives the same values up to float32 rounding."""
    stat = PseudoNeurons.build(handle, LAYER, SPEC, SETTINGS, vocab_size=handle.vocab_size)
    x = capture(handle, small_windows, [f"blocks.{LAYER}.ln2.hook_normalized"])
    mlp_in = x[f"blocks.{LAYER}.ln2.hook_normalized"][:, SKIP:].reshape(-1, handle.d_model)
    stat.calibrate(mlp_in[:200])
    assert not torch.allclose(stat.calibration.pseudo_sd, stat.calibration.real_sd)  # the fold does something
    pre = stat.calibration.apply(stat.pre_activations(mlp_in))  # [N, r, n]
    act = act_fn(handle)(pre[:, 0])
    expected = act * pre[:, 1] if pre.shape[1] == 2 else act
    np.testing.assert_allclose(stat.activations(mlp_in).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
