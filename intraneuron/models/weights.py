"""Neuron and unembedding weights of a loaded model, raw or processed the TransformerLens way.

    neuron_weights(handle, layer, processed=True) -> NeuronWeights   w_in, b_in, w_out (+ gate/up)
    unembedding(handle, processed=True)          -> Unembedding     W_U, b_U, the final norm
    processed_W_U(W_U, norm)                     -> W_U processed   (linear: noise maps the same way)

Everything is a float32 torch tensor on the CPU, copied out of the model (never a view of its
parameters, so tied weights such as GPT-2's W_U = W_E are never touched). Shapes are TL's:
w_in / w_out [d_mlp, d_model] (one row per neuron), W_U [d_model, vocab].

Processing (processed=True) is TransformerLens' default `fold_ln=True, center_writing_weights=True,
center_unembed=True` (with fold_ln's `center_weights=True`), restricted to the weights read here:

  LayerNorm models (GPT-2, GPT-Neo, GPT-NeoX/Pythia)
    W_U:   b_U += beta_f @ W_U;  W_U = diag(gamma_f) W_U;  W_U -= mean over d_model;
           W_U -= mean over vocab, b_U -= mean(b_U)
    w_in:  b_in += w_in @ beta_2;  w_in = w_in * gamma_2;  w_in -= mean over d_model
    w_out: w_out -= mean over d_model
  RMSNorm models (Llama, Mistral, Qwen, SmolLM, Gemma)
    W_U:   W_U = diag(gamma_f) W_U;  W_U -= mean over vocab, b_U -= mean(b_U)
    w_gate, w_up: times gamma_2
  Nothing is centred over d_model for RMSNorm (why: docs/derivations.md, "Processed weights").
  Folded gains make the processed final norm gain-free (`Unembedding.norm` then has gain 1 and
  bias 0), so processed logits are norm(x) @ W_U + b_U = raw logits minus their mean over the
  vocabulary.

W_U covers the real vocabulary only: rows of the output embedding beyond the tokenizer (Pythia pads
50277 tokens to 50304) are dropped, and the vocabulary centring runs over the real tokens (TL
centres over the padded rows too; the difference is the mean of 27 extra columns).
Gated MLPs: `w_gate` and `w_up` are given separately and `w_in` is the gate (this project's
hook_pre is the gate); note that TransformerLens calls the up projection `W_in` for gated models.
Gemma's norms scale by (1 + weight): that is the gain here. Gemma 2 soft-caps the logits after W_U
(not applied here). Architectures whose MLP output is normalised again before the residual (Gemma 2,
OLMo 2) get raw weights only; BERT gets raw neuron weights only (no unembedding is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from intraneuron.errors import ConfigError

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class WeightLayout:
    """Where one architecture keeps its MLP and norm weights (paths inside a block / base model)."""

    mlp_norm: str | None  # the norm whose output the MLP reads; None: it reads the raw residual
    w_in: str  # the input projection (gated: the up projection)
    w_out: str  # the output projection; its input is the neuron activation
    final_norm: str | None  # inside the base model; None: no unembedding (encoders)
    norm_kind: NormKind
    w_gate: str | None = None  # gated MLPs only
    gain_offset: float = 0.0  # Gemma: gain = 1 + weight
    post_mlp_norm: bool = False  # the MLP output is normalised before joining the residual

    @property
    def processable(self) -> bool:
        return self.final_norm is not None and self.mlp_norm is not None and not self.post_mlp_norm


_LLAMA = WeightLayout("post_attention_layernorm", "mlp.up_proj", "mlp.down_proj", "norm", "rmsnorm",
                      w_gate="mlp.gate_proj")  # fmt: skip
LAYOUTS: dict[str, WeightLayout] = {
    "gpt2": WeightLayout("ln_2", "mlp.c_fc", "mlp.c_proj", "ln_f", "layernorm"),
    "gpt_neox": WeightLayout("post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                             "final_layer_norm", "layernorm"),  # fmt: skip
    "llama": _LLAMA,
    "bert": WeightLayout("attention.output.LayerNorm", "intermediate.dense", "output.dense", None,
                         "layernorm", post_mlp_norm=True),  # fmt: skip
}
MODEL_TYPE_LAYOUTS: dict[str, WeightLayout] = {  # exceptions inside an adapter's family
    "gemma": replace(_LLAMA, gain_offset=1.0),
    "gemma2": replace(_LLAMA, mlp_norm="pre_feedforward_layernorm", gain_offset=1.0,
                      post_mlp_norm=True),  # fmt: skip
    "olmo2": replace(_LLAMA, mlp_norm=None, post_mlp_norm=True),
}


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm: kind, gain [d_model], bias [d_model] (zeros for RMSNorm), eps."""

    kind: NormKind
    gain: torch.Tensor
    bias: torch.Tensor
    eps: float

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without gain or bias: LayerNorm centres and scales, RMSNorm only scales."""
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(x) * self.gain + self.bias


@dataclass(frozen=True)
class NeuronWeights:
    """One layer's neurons. Gated MLPs: w_in is w_gate (see the module docstring)."""

    layer: int
    w_in: torch.Tensor  # [d_mlp, d_model] read-in direction of each neuron
    b_in: torch.Tensor  # [d_mlp] (zeros when the MLP has no input bias)
    w_out: torch.Tensor  # [d_mlp, d_model] what one unit of activation writes to the residual
    w_gate: torch.Tensor | None  # [d_mlp, d_model] gated MLPs only
    w_up: torch.Tensor | None  # [d_mlp, d_model] gated MLPs only
    processed: bool
    steps: tuple[str, ...]  # the processing applied, in order (log it with the results)

    @property
    def gated(self) -> bool:
        return self.w_gate is not None


@dataclass(frozen=True)
class Unembedding:
    """W_U and b_U over the real vocabulary, with the final norm that precedes them."""

    W_U: torch.Tensor  # [d_model, vocab]
    b_U: torch.Tensor  # [vocab] (zeros when the head has no bias)
    norm: Norm  # processed: gain 1, bias 0 (both folded into W_U / b_U)
    processed: bool
    steps: tuple[str, ...]

    @property
    def n_vocab(self) -> int:
        return int(self.W_U.shape[1])

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream [..., d_model] -> [..., vocab]."""
        return self.norm(resid) @ self.W_U + self.b_U


def weight_layout(handle: Any) -> WeightLayout:
    """The layout of the handle's architecture (by model_type, else by adapter)."""
    model_type = getattr(handle.config, "model_type", None)
    layout = MODEL_TYPE_LAYOUTS.get(model_type) or LAYOUTS.get(handle.adapter.name)
    if layout is None:
        raise ConfigError("model.source", model_type, f"one of {sorted(LAYOUTS)} for weight access")
    return layout


def rows(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as [out, in] float32 CPU copy (GPT-2's Conv1D stores [in, out])."""
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    return weight.to("cpu", torch.float32).clone()


def bias_of(module: torch.nn.Module, size: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if bias is None:
        return torch.zeros(size)
    return bias.detach().to("cpu", torch.float32).clone()


def read_norm(module: torch.nn.Module, kind: NormKind, gain_offset: float = 0.0) -> Norm:
    size = int(module.normalized_shape[0]) if hasattr(module, "normalized_shape") else None
    weight = module.weight if getattr(module, "weight", None) is not None else torch.ones(size)
    weight = weight.detach().to("cpu", torch.float32)
    eps = getattr(module, "eps", None)
    eps = getattr(module, "variance_epsilon", None) if eps is None else eps
    return Norm(kind, weight + gain_offset, bias_of(module, weight.shape[0]), float(eps))


def neuron_weights(handle: Any, layer: int, processed: bool = True) -> NeuronWeights:
    """Layer `layer`'s neuron weights from the loaded model; see the module docstring."""
    layout = weight_layout(handle)
    if not 0 <= layer < handle.n_layers:
        raise ConfigError("layer", layer, f"0..{handle.n_layers - 1}")
    _check_processable(handle, layout, processed)
    block = handle.adapter.layer_path(layer)
    w_out = rows(handle.module(f"{block}.{layout.w_out}")).T.contiguous()  # [d_mlp, d_model]
    up = handle.module(f"{block}.{layout.w_in}")
    w_up = rows(up)
    w_gate, b_in = None, bias_of(up, w_up.shape[0])
    if layout.w_gate is not None:  # the neuron's pre-activation is the gate's
        gate = handle.module(f"{block}.{layout.w_gate}")
        w_gate, b_in = rows(gate), bias_of(gate, w_up.shape[0])
    steps: list[str] = []
    if processed:
        norm = read_norm(handle.module(f"{block}.{layout.mlp_norm}"), layout.norm_kind,
                         layout.gain_offset)  # fmt: skip
        if norm.kind == "layernorm":  # (RMSNorm has no bias)
            b_in = b_in + w_up @ norm.bias
            steps.append("fold mlp-norm bias into b_in")
        w_up = w_up * norm.gain
        w_gate = None if w_gate is None else w_gate * norm.gain
        steps.append("fold mlp-norm gain into " + ("w_gate and w_up" if w_gate is not None else "w_in"))
        if norm.kind == "layernorm":
            w_up = w_up - w_up.mean(1, keepdim=True)
            w_out = w_out - w_out.mean(1, keepdim=True)
            steps += ["centre w_in over d_model", "centre w_out over d_model"]
    w_in = w_up if w_gate is None else w_gate
    return NeuronWeights(
        layer, w_in, b_in, w_out, w_gate, None if w_gate is None else w_up, processed, tuple(steps)
    )


def real_vocab_size(handle: Any, rows_available: int) -> int:
    """Tokens the tokenizer can produce, capped by the head's rows (drops Pythia's padding)."""
    try:
        n = len(handle.tokenizer)
    except TypeError:
        n = rows_available
    return min(int(n), rows_available)


def unembedding(handle: Any, processed: bool = True, n_vocab: int | None = None) -> Unembedding:
    """W_U, b_U and the final norm; `n_vocab` overrides the real-vocabulary size."""
    layout = weight_layout(handle)
    if layout.final_norm is None:
        raise ConfigError("model.source", handle.model_id, "a decoder with an unembedding")
    head = handle.model.get_output_embeddings()
    if head is None:
        raise ConfigError("model.source", handle.model_id, "a model loaded with its LM head")
    weight = rows(head)  # [vocab_padded, d_model]
    n = n_vocab if n_vocab is not None else real_vocab_size(handle, weight.shape[0])
    W_U = weight[:n].T.contiguous()
    b_U = bias_of(head, weight.shape[0])[:n].clone()
    norm = read_norm(handle.module(f"{handle.adapter.prefix}{layout.final_norm}"),
                     layout.norm_kind, layout.gain_offset)  # fmt: skip
    steps: list[str] = [] if n == weight.shape[0] else [f"drop {weight.shape[0] - n} padding rows"]
    if processed:
        if norm.kind == "layernorm":
            b_U = b_U + norm.bias @ W_U
            steps.append("fold final-norm bias into b_U")
        W_U = processed_W_U(W_U, norm)
        steps.append("fold final-norm gain into W_U")
        if norm.kind == "layernorm":
            steps.append("centre W_U over d_model")
        b_U = b_U - b_U.mean()
        steps.append("centre W_U and b_U over vocab")
        norm = Norm(norm.kind, torch.ones_like(norm.gain), torch.zeros_like(norm.bias), norm.eps)
    return Unembedding(W_U, b_U, norm, processed, tuple(steps))


def processed_W_U(W_U: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The processing of a raw W_U [d_model, vocab] under the final norm `norm`: gain folded in,
    centred over d_model (LayerNorm only) and over the vocabulary. Linear in W_U, so it maps a
    perturbation of the raw weights (e.g. simulated quantisation noise) the same way."""
    W_U = W_U * norm.gain[:, None]
    if norm.kind == "layernorm":
        W_U = W_U - W_U.mean(0, keepdim=True)
    return W_U - W_U.mean(1, keepdim=True)


def _check_processable(handle: Any, layout: WeightLayout, processed: bool) -> None:
    if processed and not layout.processable:
        raise ValueError(
            f"processed weights are not defined for {handle.config.model_type} (its MLP output is "
            "normalised again or it has no pre-MLP norm, so TL processing does not apply): use processed=False"
        )
