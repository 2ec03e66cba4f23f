"""Mean-ablation effects on tiny GPT-2 (LayerNorm) and Llama (RMSNorm): the analytic final-layer
path against one model rerun per neuron, planted neurons whose answer is known, and the clean pass.

Planted in the final layer of a private copy of each model (W_U scaled up 20x so that the
predictions are peaked enough for effects to be sizeable):
  neuron 0 (GPT-2 only): w_out along all-ones. LayerNorm removes the mean: TE = 0.
  neuron 1: w_out = 5 v with v in W_U's null space (projected out of W_U, v orthogonal to ones for
           LayerNorm): nothing reaches the logits directly (DE = 0), but the final norm's scale
           changes (TE != 0), so ln_mediated = 1.
"""

from __future__ import annotations

import pytest
import torch

from intraneuron.analyses.confidence.effects import (
    final_layer_effects,
    freeze_direction,
    peak_bytes,
    rerun_effects,
)
from intraneuron.analyses.confidence.forward import (
    clean_pass,
    drop_token_ids,
    mean_activation,
    token_filter,
)
from intraneuron.models.weights import neuron_weights, unembedding

ARCHS = ("gpt2", "llama")
NEURONS = [0, 1, 2, 5, 7, 11]
TOL = {"atol": 2e-5, "rtol": 1e-4}


def plant(handle) -> None:
    """Write the planted neurons and the null direction into the final layer (see the docstring)."""
    model, layer = handle.model, handle.n_layers - 1
    d = handle.d_model
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(d, generator=gen)
    layernorm = handle.adapter.name == "gpt2"
    if layernorm:
        v -= v.mean()
    v /= v.norm()
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [V, d] (tied to wte for GPT-2)
        head.mul_(20.0)
        head.sub_((head @ v)[:, None] * v)  # v is now an exact null direction of W_U
        if layernorm:
            model.transformer.ln_f.weight.fill_(1.0)  # gain 1: (c(w) * g) stays along v
            proj = model.transformer.h[layer].mlp.c_proj.weight  # Conv1D [d_mlp, d_model]
            proj[0] = 3.0
            proj[1] = 5.0 * v
        else:
            model.model.norm.weight.fill_(1.0)
            proj = model.model.layers[layer].mlp.down_proj.weight  # Linear [d_model, d_mlp]
            proj[:, 1] = 5.0 * v


@pytest.fixture(scope="module")
def handles(tiny_model_dirs):
    from intraneuron.models.loading import load_model

    out = {}
    for arch in ARCHS:
        out[arch] = load_model(str(tiny_model_dirs[arch]))
        plant(out[arch])
    return out


@pytest.fixture(scope="module")
def ids():
    ids = torch.randint(0, 3000, (3, 10), generator=torch.Generator().manual_seed(0))  # [B, T]
    ids[0, 0] = ids[2, 6] = 50256  # EOS = BOS for the GPT-2 tokenizer
    return ids


@pytest.fixture(scope="module")
def freq():
    """A smoothed unigram distribution and its frequency direction (spec 3.4)."""
    counts = torch.rand(50257, generator=torch.Generator().manual_seed(2)) ** 4 * 1000
    log_p = torch.log((counts + 1) / (counts + 1).sum())
    u = log_p - log_p.mean()
    return log_p, u / u.norm()


@pytest.fixture(scope="module")
def runs(handles, ids, freq):
    """arch -> (clean pass, mask, analytic effects, rerun effects), all per token."""
    out = {}
    for arch, handle in handles.items():
        layer = handle.n_layers - 1
        clean = clean_pass(handle, ids, layer, NEURONS, batch_size=2)
        mask = token_filter(ids, skip_first=1, drop_ids=[50256])
        means = mean_activation(handle, ids, layer, NEURONS)
        w_out = neuron_weights(handle, layer, processed=False).w_out[NEURONS]
        kw = {"mask": mask, "freq_direction": freq[1], "log_p_freq": freq[0], "per_token": True}
        fast = final_layer_effects(clean, w_out, unembedding(handle, processed=False), means,
                                   chunk=4, token_block=7, **kw)  # fmt: skip
        slow = rerun_effects(handle, ids, layer, NEURONS, means, clean=clean, **kw)
        out[arch] = clean, mask, fast, slow
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_analytic_final_layer_effects_equal_the_rerun_per_token(runs, arch):
    _, mask, fast, slow = runs[arch]
    assert fast.n_tokens == slow.n_tokens == int(mask.sum()) > 0
    assert set(fast.per_token) == set(slow.per_token) >= {"dloss_te", "dloss_de", "dloss_freq", "dkl_te"}
    for key, rerun in slow.per_token.items():
        torch.testing.assert_close(fast.per_token[key], rerun, **TOL, msg=f"{arch} {key}")
    assert fast.per_token["dloss_te"][2:].abs().max() > 1e-3  # the comparison is not of zeros
    for key in ("ln_mediated", "freq_mediated", "mean_abs_dloss_te", "mean_dkl_te", "argmax_change_rate"):
        # [1:]: neuron 0's ratios are 0/0 on GPT-2 (nan analytically, noise in the rerun); atol: a
        # ratio of mean |dL| ~ 1e-3 inherits the per-token float error ~ 4e-6 / 1e-3
        torch.testing.assert_close(fast.summary[key][1:], slow.summary[key][1:], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_neurons_have_the_known_mediation(runs, arch):
    _, _, fast, _ = runs[arch]
    te, de = fast.summary["mean_abs_dloss_te"], fast.summary["mean_abs_dloss_de"]
    # the null-space neuron: no direct effect, a clear total effect, entirely mediated by the norm
    assert te[1] > 1e-3 and de[1] < 1e-4 * te[1]
    assert fast.summary["ln_mediated"][1] > 0.999
    assert fast.per_token["dloss_de"][1].abs().max() < 1e-5
    # random neurons: most of their effect is direct
    assert fast.summary["ln_mediated"][2:].median() < 0.5
    if arch == "gpt2":  # all-ones w_out: LayerNorm removes it before anything reads it
        assert fast.per_token["dloss_te"][0].abs().max() < 1e-5
        assert fast.per_token["dentropy_te"][0].abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_processed_unembedding_and_chunking_do_not_change_the_effects(handles, runs, ids, freq, arch):
    handle = handles[arch]
    clean, mask, fast, _ = runs[arch]
    w_out = neuron_weights(handle, clean.layer, processed=False).w_out[NEURONS]
    means = mean_activation(handle, ids, clean.layer, NEURONS, batch_size=1)
    other = final_layer_effects(clean, w_out, unembedding(handle, processed=True), means, mask=mask,
                                freq_direction=freq[1], log_p_freq=freq[0], chunk=6,
                                token_block=64, per_token=True)  # fmt: skip
    for key, value in fast.per_token.items():  # processed logits = raw minus their vocab mean
        torch.testing.assert_close(other.per_token[key], value, **TOL, msg=key)


def test_frequency_frozen_logits_keep_the_clean_projection(freq):
    gen = torch.Generator().manual_seed(3)
    z, z_abl = torch.randn(2, 5, 50257, generator=gen) * 3
    u = freq[1] * 7.0  # any length: the direction is normalised
    frozen = freeze_direction(z_abl, z, u)  # [5, V]
    u_hat = u / u.norm()
    torch.testing.assert_close(frozen @ u_hat, z @ u_hat, atol=1e-4, rtol=0)
    rest = frozen - z_abl
    torch.testing.assert_close(rest, (rest @ u_hat)[:, None] * u_hat, atol=1e-6, rtol=0)  # only along u


@pytest.mark.parametrize("arch", ARCHS)
def test_clean_pass_matches_the_model(handles, runs, ids, arch):
    handle = handles[arch]
    clean = runs[arch][0]
    with torch.no_grad():
        out = handle.model(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(clean.logits, out.logits.float())
    torch.testing.assert_close(clean.loss.mean(), out.loss.float(), atol=1e-5, rtol=1e-5)
    entropy = torch.distributions.Categorical(logits=out.logits.float()).entropy()
    torch.testing.assert_close(clean.entropy, entropy, atol=1e-4, rtol=1e-5)
    # resid is the final norm's input: the raw unembedding of it gives the model's logits
    raw = unembedding(handle, processed=False)
    torch.testing.assert_close(raw.logits(clean.resid), clean.logits, atol=1e-4, rtol=1e-4)
    x = clean.resid - clean.resid.mean(-1, keepdim=True) if arch == "gpt2" else clean.resid
    torch.testing.assert_close(x / clean.scale[..., None], raw.norm.normalise(clean.resid))
    top = clean.logits[:, :-1].argmax(-1) == ids[:, 1:]
    assert torch.equal(clean.rank == 0, top)
    torch.testing.assert_close(mean_activation(handle, ids, clean.layer, NEURONS),
                               clean.acts.mean((0, 1)))  # fmt: skip


def test_token_filter_drops_the_first_positions_and_special_neighbours(tiny_gpt2):
    assert drop_token_ids(tiny_gpt2.tokenizer) == [198, 50256]  # "\n", BOS = EOS
    ids = torch.tensor([[50256, 5, 6, 198, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 50256]])
    mask = token_filter(ids, skip_first=2, drop_ids=[198, 50256])
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_rerun_runs_on_a_non_final_layer_and_the_analytic_path_refuses_it(handles, ids):
    handle = handles["gpt2"]
    clean = clean_pass(handle, ids, 0, [3, 4])
    effects = rerun_effects(handle, ids, 0, [3, 4], clean.acts.mean((0, 1)), clean=clean)
    assert effects.summary["mean_abs_dloss_te"].gt(0).all() and "ln_mediated" in effects.summary
    assert list(effects.table().columns[:2]) == ["neuron", "mean_dloss_te"]
    w_out = neuron_weights(handle, 0, processed=False).w_out[[3, 4]]
    with pytest.raises(ValueError, match="not the final layer"):
        final_layer_effects(clean, w_out, unembedding(handle, processed=False), torch.zeros(2))
    assert 250e6 < peak_bytes(4, 128, 50257) < 270e6  # the docstring example
