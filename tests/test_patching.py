"""Write hooks on tiny random models: exact writes, no-op identities, mean ablation by hand, cleanup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from intraneuron.errors import ConfigError
from intraneuron.extraction import Patch, patch_sites
from intraneuron.extraction.hooks import capture_sites
from intraneuron.models.adapters import Site

NEURONS = "blocks.1.mlp.hook_post"  # GPT-2: output of mlp.act; Llama: input of mlp.down_proj
CASES = [("gpt2", NEURONS), ("llama", NEURONS), ("gpt2", "blocks.1.hook_resid_pre"),
         ("llama", "blocks.2.hook_resid_pre")]


@pytest.fixture(scope="module")
def handles(tiny_model_dirs):
    from intraneuron.models.loading import load_model

    return {arch: load_model(str(tiny_model_dirs[arch])) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, T]


def logits(handle, ids) -> torch.Tensor:
    with torch.no_grad():
        return handle.model(input_ids=ids, use_cache=False).logits  # [B, T, V]


def read(handle, ids, site: str) -> torch.Tensor:
    with torch.no_grad(), capture_sites(handle.module, [handle.site(site)], stop_early=False) as got:
        handle.model(input_ids=ids, use_cache=False)
    return got[site]  # [B, T, d]


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(("arch", "site"), CASES)
def test_set_writes_exactly_and_leaves_other_units(handles, ids, arch, site):
    handle = handles[arch]
    before = read(handle, ids, site)
    pick = [2, 5]
    with patch_sites(handle, [Patch(site, "set", torch.tensor([0.25, -3.0]), neurons=pick)]):
        after = read(handle, ids, site)
    assert torch.equal(after[..., pick], torch.tensor([0.25, -3.0]).expand(*after.shape[:-1], 2))
    rest = [j for j in range(before.shape[-1]) if j not in pick]
    assert torch.equal(after[..., rest], before[..., rest])
    with patch_sites(handle, [Patch(site, "set", 1.5)]):
        assert torch.equal(read(handle, ids, site), torch.full_like(before, 1.5))


@pytest.mark.parametrize(("arch", "site"), CASES)
def test_identity_patches_keep_logits_bit_identical(handles, ids, arch, site):
    handle = handles[arch]
    original = logits(handle, ids)
    identities = [Patch(site, "scale", 1.0), Patch(site, "add", 0.0, neurons=[0, 3]),
                  Patch(site, "scale", torch.ones(2), neurons=torch.tensor([1, 4])), Patch(site, "add", 0.0)]
    with patch_sites(handle, identities):
        assert torch.equal(logits(handle, ids), original)
    with patch_sites(handle, [Patch(site, "add", 0.5, neurons=[3])]):
        assert not torch.allclose(logits(handle, ids), original)


def _hand_hook(handle, arch: str, neuron: int, value: float):
    """The same ablation written directly on the module, without the adapter or patching."""
    if arch == "gpt2":
        def hook(_m, _a, out):
            out = out.clone()
            out[..., neuron] = value
            return out
        return handle.model.transformer.h[1].mlp.act.register_forward_hook(hook)

    def pre_hook(_m, args):
        x = args[0].clone()
        x[..., neuron] = value
        return (x, *args[1:])
    return handle.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(pre_hook)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mean_ablation_equals_a_hand_written_hook(handles, ids, arch):
    handle = handles[arch]
    original = logits(handle, ids)
    mean = read(handle, ids, NEURONS).mean((0, 1))  # [d_mlp], like a profile's act_mean
    neuron = 7
    with patch_sites(handle, [Patch(NEURONS, "mean_ablate", mean, neurons=[neuron])]):
        patched = logits(handle, ids)
    hook = _hand_hook(handle, arch, neuron, float(mean[neuron]))
    try:
        by_hand = logits(handle, ids)
    finally:
        hook.remove()
    assert torch.equal(patched, by_hand)
    assert not torch.allclose(patched, original)


def test_llama_mean_ablation_equals_the_mlp_by_hand(handles, ids):
    handle = handles["llama"]
    mlp = handle.model.model.layers[1].mlp
    mean = read(handle, ids, NEURONS).mean((0, 1))  # [d_mlp]
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0])),
             mlp.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out))]
    try:
        with patch_sites(handle, [Patch(NEURONS, "mean_ablate", mean, neurons=[3])]):
            logits(handle, ids)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        x = seen["x"]  # [B, T, d_model]
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [B, T, d_mlp]
        act[..., 3] = mean[3]
        torch.testing.assert_close(seen["out"], mlp.down_proj(act), rtol=0, atol=1e-6)


def test_hooks_are_removed_on_exit_even_after_an_error(handles, ids):
    handle = handles["gpt2"]
    original, hooks = logits(handle, ids), n_hooks(handle.model)
    with patch_sites(handle, [Patch(NEURONS, "set", 0.0), Patch("blocks.0.hook_resid_pre", "scale", 2.0)]):
        assert n_hooks(handle.model) == hooks + 2
    assert n_hooks(handle.model) == hooks
    assert torch.equal(logits(handle, ids), original)
    with pytest.raises(RuntimeError), patch_sites(handle, [Patch(NEURONS, "set", torch.ones(3))]):
        logits(handle, ids)  # [3] does not broadcast to [B, T, d_mlp]
    assert n_hooks(handle.model) == hooks


def test_read_order_follows_registration(handles, ids):
    handle = handles["llama"]
    patch = Patch(NEURONS, "set", 9.0, neurons=[0])
    sites = [handle.site(NEURONS)]
    with torch.no_grad():
        with capture_sites(handle.module, sites, stop_early=False) as early, patch_sites(handle, [patch]):
            handle.model(input_ids=ids, use_cache=False)
        assert not torch.all(early[NEURONS][..., 0] == 9.0)  # read before the patch ran
        with capture_sites(handle.module, sites, stop_early=False) as early, \
                patch_sites(handle, [patch], prepend=True):
            handle.model(input_ids=ids, use_cache=False)
        assert torch.all(early[NEURONS][..., 0] == 9.0)


def test_patch_does_not_write_into_tensors_the_model_reuses(handles, ids):
    handle = handles["gpt2"]
    kept = {}

    def keep(_m, _a, out):
        kept["ref"], kept["copy"] = out[0], out[0].clone()  # block 0's output is block 1's input

    hook = handle.model.transformer.h[0].register_forward_hook(keep)
    try:
        with patch_sites(handle, [Patch("blocks.1.hook_resid_pre", "add", 1.0, neurons=[1])]):
            logits(handle, ids)
    finally:
        hook.remove()
    assert torch.equal(kept["ref"], kept["copy"])
    x = torch.randn(2, 3, 8)
    y = Patch("s", "mean_ablate", torch.arange(8.0), neurons=[6]).apply(x)
    assert torch.equal(y[..., 6], torch.full((2, 3), 6.0)) and not torch.equal(x, y)


def test_keyword_hidden_states_are_patched():
    class Block(nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 2

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(hidden_states=x)

    class Handle:
        model, d_model, d_mlp = Model(), 4, 4

        def site(self, name):
            return Site(name, "block", "input", 0)

        def module(self, path):
            return self.model.get_submodule(path)

    handle = Handle()
    with patch_sites(handle, [Patch("blocks.0.hook_resid_pre", "set", 1.0, neurons=[2])]):
        out = handle.model(torch.zeros(3, 4))
    assert out[:, 2].tolist() == [2.0, 2.0, 2.0] and out[:, [0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        (Patch("blocks.1.attn.hook_z", "set"), "adapter"),
        (Patch("blocks.9.mlp.hook_post", "set"), "adapter"),
        (Patch(NEURONS, "add", 1.0, neurons=[128]), "patch.neurons"),
        (Patch(NEURONS, "add", 1.0, neurons=[]), "patch.neurons"),
        (Patch(NEURONS, "mean_ablate", torch.zeros(5), neurons=[1]), "patch.value"),
    ],
)
def test_bad_patches_raise_before_any_hook_is_registered(handles, patch, key):
    handle, hooks = handles["gpt2"], n_hooks(handles["gpt2"].model)
    if key == "adapter":  # unknown sites and layers: the adapter's own ConfigError, unchanged
        with pytest.raises(ConfigError) as expected:
            handle.site(patch.site)
        with pytest.raises(ConfigError) as err, patch_sites(handle, [Patch(NEURONS, "set"), patch]):
            pass
        assert err.value.key == expected.value.key
    else:  # a mistake in the code that built the patch
        with pytest.raises(ValueError, match=key.replace("patch", "Patch")), \
                patch_sites(handle, [Patch(NEURONS, "set"), patch]):  # fmt: skip
            pass
    assert n_hooks(handle.model) == hooks
    with pytest.raises(ValueError, match="Patch.op"):
        Patch(NEURONS, "zero")
