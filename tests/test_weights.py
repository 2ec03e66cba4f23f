"""Neuron / unembedding weight accessors (raw and TL-processed) and the universal-neurons weight table.

The tiny models get random norm gains and biases first (fresh ones are all 1 / 0, which would hide
a missing fold), on their own loaded copies so the session's shared models stay as built.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from intraneuron.analyses.universal.neuron_weights import neuron_weight_table, weight_table
from intraneuron.errors import ConfigError
from intraneuron.models.loading import load_model
from intraneuron.models.weights import (
    NeuronWeights,
    Norm,
    Unembedding,
    neuron_weights,
    unembedding,
    weight_layout,
)

ARCHS = ("gpt2", "gpt_neox", "llama")
OUT_PROJ = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "llama": "mlp.down_proj"}
TEXT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"


def perturbed(directory, seed: int = 1):
    handle = load_model(str(directory))
    generator = torch.Generator().manual_seed(seed)
    for module in handle.model.modules():
        if "Norm" in type(module).__name__:
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return handle


@pytest.fixture(scope="module")
def handles(tiny_model_dirs):
    return {arch: perturbed(tiny_model_dirs[arch]) for arch in ARCHS}


def ids(handle):
    return torch.tensor([handle.tokenizer(TEXT)["input_ids"]])


def run_capturing_input(handle, path: str):
    """Run the model on TEXT; returns (logits, the hidden-states input of module `path`)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle_ = handle.module(path).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = handle.model(ids(handle)).logits.detach()
    finally:
        handle_.remove()
    return logits, seen["x"]


def by_hand(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Normalise without gain: LayerNorm centres and scales, RMSNorm scales."""
    x = x.double()
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).float()


@pytest.mark.parametrize("arch", ARCHS)
def test_processed_logits_equal_raw_logits_up_to_a_per_token_constant(handles, arch):
    handle = handles[arch]
    layout = weight_layout(handle)
    logits, resid = run_capturing_input(handle, f"{handle.adapter.prefix}{layout.final_norm}")
    raw, done = unembedding(handle, processed=False), unembedding(handle)
    assert raw.W_U.shape == (handle.d_model, 50257) and done.b_U.shape == (50257,)
    torch.testing.assert_close(raw.logits(resid), logits, atol=2e-5, rtol=1e-4)

    ours = by_hand(resid, done.norm.kind, done.norm.eps) @ done.W_U + done.b_U
    centred = logits - logits.mean(-1, keepdim=True)
    torch.testing.assert_close(ours, centred, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(done.logits(resid), centred, atol=2e-5, rtol=1e-4)
    assert done.W_U.mean(1).abs().max() < 1e-6 and abs(float(done.b_U.mean())) < 1e-6
    if layout.norm_kind == "layernorm":  # the all-ones direction is an exact null direction
        assert (torch.ones(handle.d_model) @ done.W_U).abs().max() < 1e-4
        assert "centre W_U over d_model" in done.steps
    else:  # RMSNorm keeps the mean, so W_U must keep it too
        assert "centre W_U over d_model" not in done.steps
        assert (torch.ones(handle.d_model) @ done.W_U).abs().max() > 1e-2


def test_tied_embeddings_are_read_not_changed(handles):
    handle = handles["gpt2"]
    embedding = handle.model.get_input_embeddings().weight
    assert handle.model.get_output_embeddings().weight is embedding  # GPT-2 ties W_U = W_E^T
    before = embedding.detach().clone()
    done = unembedding(handle)
    done.W_U.add_(1.0)
    neuron_weights(handle, 0).w_out.add_(1.0)
    assert torch.equal(embedding, before)


def test_padded_vocabulary_rows_are_dropped(tiny_model_dirs):
    handle = perturbed(tiny_model_dirs["gpt_neox"], seed=2)
    handle.model.resize_token_embeddings(50304, mean_resizing=False)  # Pythia's padded embed_out
    assert handle.model.get_output_embeddings().weight.shape[0] == 50304
    logits, resid = run_capturing_input(handle, "gpt_neox.final_layer_norm")
    done = unembedding(handle)
    assert done.n_vocab == 50257 and done.steps[0] == "drop 47 padding rows"
    real = logits[..., :50257]
    torch.testing.assert_close(done.logits(resid), real - real.mean(-1, keepdim=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_w_out_times_activation_is_the_neuron_contribution(handles, arch):
    handle, layer, neuron = handles[arch], 1, 3
    proj = handle.module(f"{handle.adapter.layer_path(layer)}.{OUT_PROJ[arch]}")
    seen: dict[str, torch.Tensor] = {}

    def keep(only: int | None):
        def pre(module, args):
            acts = args[0]
            seen["act"] = acts[..., neuron].detach().clone()
            mask = torch.zeros(acts.shape[-1])
            if only is not None:
                mask[only] = 1
            return (acts * mask, *args[1:])

        def post(module, args, output):
            seen[f"out{only}"] = output.detach().clone()

        return proj.register_forward_pre_hook(pre), proj.register_forward_hook(post)

    for only in (neuron, None):
        hooks = keep(only)
        try:
            handle.model(ids(handle))
        finally:
            for hook in hooks:
                hook.remove()
    contribution = seen[f"out{neuron}"] - seen["outNone"]  # [1, pos, d_model]
    raw = neuron_weights(handle, layer, processed=False).w_out[neuron]
    torch.testing.assert_close(contribution, seen["act"][..., None] * raw, atol=1e-6, rtol=1e-4)
    done = neuron_weights(handle, layer).w_out[neuron]
    if weight_layout(handle).norm_kind == "layernorm":  # centred: what a LayerNorm reader sees
        contribution = contribution - contribution.mean(-1, keepdim=True)
    torch.testing.assert_close(contribution, seen["act"][..., None] * done, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_processed_read_in_gives_the_pre_activation(handles, arch):
    handle, layer = handles[arch], 2
    layout = weight_layout(handle)
    site = handle.site(f"blocks.{layer}.mlp.hook_pre")
    seen = {}

    def grab(module, args, kwargs, output):
        seen["pre"] = site.select(args, kwargs, output).detach().clone()

    hook = handle.module(site.module_path).register_forward_hook(grab, with_kwargs=True)
    try:
        _, x = run_capturing_input(handle, f"{handle.adapter.layer_path(layer)}.{layout.mlp_norm}")
    finally:
        hook.remove()
    weights, norm = neuron_weights(handle, layer), handle.module(f"{handle.adapter.layer_path(layer)}.{layout.mlp_norm}")
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    pre = by_hand(x, layout.norm_kind, eps) @ weights.w_in.T + weights.b_in
    torch.testing.assert_close(pre, seen["pre"], atol=2e-5, rtol=1e-4)
    assert weights.gated == (arch == "llama") and weights.w_in.shape == (handle.d_mlp, handle.d_model)
    if layout.norm_kind == "layernorm":  # TL centres read-in and writing weights over d_model
        assert weights.w_in.mean(1).abs().max() < 1e-7 and weights.w_out.mean(1).abs().max() < 1e-7
    if weights.gated:
        assert weights.w_in is weights.w_gate and weights.w_up.shape == weights.w_in.shape


def test_weight_table_equals_a_plain_per_neuron_loop(handles):
    handle = handles["gpt2"]
    table = neuron_weight_table(handle, 1, chunk_bytes=7 * 50257 * 32)  # 7-neuron chunks
    weights, U = neuron_weights(handle, 1), unembedding(handle).W_U.double().numpy()
    U = U / np.linalg.norm(U, axis=0)
    assert len(table) == handle.d_mlp and list(table["neuron"]) == list(range(handle.d_mlp))
    for i in (0, 5, 64, handle.d_mlp - 1):
        w_in, w_out = weights.w_in[i].double().numpy(), weights.w_out[i].double().numpy()
        c = (w_out / np.linalg.norm(w_out)) @ U
        row = table.iloc[i]
        expected = {
            "w_in_norm": np.linalg.norm(w_in), "w_out_norm": np.linalg.norm(w_out),
            "input_bias": float(weights.b_in[i]),
            "in_out_sim": w_in @ w_out / np.linalg.norm(w_in) / np.linalg.norm(w_out),
            "l2_penalty": w_in @ w_in + w_out @ w_out,
            "vocab_mean": c.mean(), "vocab_var": c.var(),
            "vocab_skew": scipy.stats.skew(c), "vocab_kurt": scipy.stats.kurtosis(c, fisher=False),
        }  # fmt: skip
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def planted_unembedding(W_U: torch.Tensor) -> Unembedding:
    W_U = W_U - W_U.mean(0, keepdim=True)
    W_U = W_U - W_U.mean(1, keepdim=True)
    d = W_U.shape[0]
    return Unembedding(W_U, torch.zeros(W_U.shape[1]), Norm("layernorm", torch.ones(d), torch.zeros(d), 1e-5), True, ())


def planted_weights(w_out: torch.Tensor) -> NeuronWeights:
    return NeuronWeights(0, torch.randn(w_out.shape), torch.zeros(len(w_out)), w_out, None, None, True, ())


def test_planted_prediction_suppression_and_partition_neurons():
    """d_model 256: a tiny model's 32 dimensions give random cosines an sd of 1/sqrt(32), so no
    single token can stand out (kurtosis ~ 3 + 1 / (vocab * sd^4)); real GPT-2 has 768."""
    torch.manual_seed(0)
    unembed = planted_unembedding(torch.randn(256, 2048))
    column = unembed.W_U[:, 17]
    w_out = torch.cat([column[None], -column[None], torch.randn(6, 256)])
    table = weight_table(planted_weights(w_out), unembed)
    assert table.loc[0, "vocab_kurt"] > 10 and table.loc[0, "prediction"] and not table.loc[0, "suppression"]
    assert table.loc[1, "vocab_kurt"] > 10 and table.loc[1, "suppression"] and not table.loc[1, "prediction"]
    assert not table.loc[2:, ["prediction", "suppression", "partition"]].to_numpy().any()
    assert table.loc[2:, "vocab_kurt"].between(2.5, 3.5).all()  # random directions: about Gaussian
    assert not weight_table(planted_weights(w_out), unembed, prediction_kurt=1e4)["prediction"].any()

    # partition: the vocabulary splits in two along one direction
    direction = torch.zeros(256)
    direction[0] = 1
    sides = torch.where(torch.arange(2048) % 2 == 0, 1.0, -1.0)
    split = planted_unembedding(torch.randn(256, 2048) * 0.05 + direction[:, None] * sides)
    other = torch.randn(256)
    other[0] = 0  # a direction the split does not use
    table = weight_table(planted_weights(torch.stack([direction, other])), split)
    assert table.loc[0, "partition"] and table.loc[0, "vocab_kurt"] < 2 and not table.loc[1, "partition"]


def test_encoders_get_raw_neuron_weights_only(tiny_model_dirs):
    handle = load_model(str(tiny_model_dirs["bert"]))
    raw = neuron_weights(handle, 0, processed=False)
    assert raw.w_in.shape == (handle.d_mlp, handle.d_model) == raw.w_out.shape
    with pytest.raises(ValueError, match="processed=False"):
        neuron_weights(handle, 0)
    with pytest.raises(ConfigError):
        unembedding(handle, processed=False)
