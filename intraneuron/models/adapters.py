"""Architecture adapters: TransformerLens-style site names -> module paths inside a HF model.

A neuron is one hidden unit of an MLP block; its activation is the input to the MLP's output
projection: GELU(x W_in + b) for GPT-2 / GPT-NeoX / BERT, act(x W_gate) * (x W_up) for gated
(Llama-style) MLPs. Sites keep TransformerLens names so that users recognise them:

    blocks.{l}.hook_resid_pre   residual stream entering block l          # [batch, pos, d_model]
    blocks.{l}.hook_resid_mid   residual after attention, what the MLP's norm reads (with
                                parallel attention + MLP, e.g. GPT-NeoX: the block's input)
    blocks.{l}.ln2.hook_normalized  what the MLP's first projection reads (the pre-MLP norm's
                                output)                                    # [batch, pos, d_model]
    blocks.{l}.mlp.hook_pre     MLP pre-activation (gated: the gate)      # [batch, pos, d_mlp]
    blocks.{l}.mlp.hook_post    neuron activations                        # [batch, pos, d_mlp]

Module paths are relative to the model object they were resolved for: `BertModel` has no prefix,
`BertForMaskedLM` has `bert.`; `adapter_for(config, model)` finds the prefix from the model itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch

from intraneuron.errors import ConfigError

SiteKind = Literal["hook_resid_pre", "mlp.hook_pre", "mlp.hook_post", "hook_resid_mid", "ln2.hook_normalized"]
SITE_TEMPLATES = tuple(f"blocks.{{layer}}.{kind}" for kind in get_args(SiteKind))
_SITE_NAME = re.compile(
    r"blocks\.(\d+)\.(hook_resid_pre|mlp\.hook_pre|mlp\.hook_post|hook_resid_mid|ln2\.hook_normalized)"
)
# hook_resid_mid is the input of the MLP's norm; model types whose norm sits elsewhere in the block
RESID_MID_OF_MODEL_TYPE = {"gemma2": ("pre_feedforward_layernorm", "input"), "olmo2": ("mlp", "input")}


@dataclass(frozen=True)
class Site:
    """Where to read one activation with a forward hook.

    read="output": the module's forward output (its first element when it returns a tuple).
    read="input":  the module's hidden-states input, i.e. `args[0] if args else
                   kwargs["hidden_states"]` (transformers 5 may pass hidden_states by keyword, so
                   register with `with_kwargs=True`). A forward *pre*-hook sees it before the module
                   runs, which lets extraction stop the pass early.
    """

    name: str  # TL-style, e.g. "blocks.3.mlp.hook_post"
    module_path: str  # dotted path inside the HF model, e.g. "transformer.h.3.mlp.act"
    read: Literal["output", "input"]
    layer: int

    def select(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None
    ) -> torch.Tensor:
        """The site's tensor from a hook's (args, kwargs, output)."""
        if self.read == "input":
            return args[0] if args else kwargs["hidden_states"]
        return output[0] if isinstance(output, tuple | list) else output


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module layout of one architecture family. Paths are `{prefix}{layers}.{l}.{relative}`."""

    name: str
    model_types: tuple[str, ...]  # HF config.model_type values this layout fits
    layers: str  # path of the layer list inside the base model, e.g. "h"
    mlp_post: tuple[str, Literal["output", "input"]]  # (path inside a layer, read)
    mlp_pre: tuple[str, Literal["output", "input"]]
    causal: bool  # loaded with AutoModelForCausalLM (else AutoModel)
    prefix: str = ""  # where the base model sits in the loaded object, e.g. "transformer."
    # residual after attention; None: the MLP reads the block's input (parallel attention + MLP)
    resid_mid: tuple[str, Literal["output", "input"]] | None = None
    mlp_in: tuple[str, Literal["output", "input"]] | None = None  # input of the MLP's first projection

    def n_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def d_model(self, config: Any) -> int:
        return int(config.hidden_size)

    def d_mlp(self, config: Any) -> int:
        return int(config.intermediate_size)

    def layer_path(self, layer: int) -> str:
        """Path of block `layer` (its input is hook_resid_pre)."""
        return f"{self.prefix}{self.layers}.{layer}"

    def site(self, name: str, config: Any) -> Site:
        """Parse a TL-style site name into a module path; layer and name are validated."""
        match = _SITE_NAME.fullmatch(name)
        if match is None:
            raise ConfigError("extraction.site", name, SITE_TEMPLATES)
        layer, kind = int(match.group(1)), match.group(2)
        n_layers = self.n_layers(config)
        if layer >= n_layers:
            raise ConfigError("layer", layer, f"0..{n_layers - 1} ({self.name} has {n_layers} layers)")
        if kind == "hook_resid_pre":
            return Site(name, self.layer_path(layer), "input", layer)
        if kind == "hook_resid_mid":
            where = RESID_MID_OF_MODEL_TYPE.get(getattr(config, "model_type", None), self.resid_mid)
            if where is None or getattr(config, "use_parallel_residual", False):
                # attention and MLP in parallel: the MLP's norm reads the block's input itself
                return Site(name, self.layer_path(layer), "input", layer)
            relative, read = where
        elif kind == "ln2.hook_normalized":
            if self.mlp_in is None:
                raise ConfigError("extraction.site", name, f"a site of {self.name} other than {kind}")
            relative, read = self.mlp_in
        else:
            relative, read = self.mlp_post if kind == "mlp.hook_post" else self.mlp_pre
        return Site(name, f"{self.layer_path(layer)}.{relative}", read, layer)

    def for_model(self, model: torch.nn.Module) -> ArchitectureAdapter:
        """This adapter with paths relative to `model` (task heads wrap the base model)."""
        return replace(self, prefix=base_model_prefix(model))


@dataclass(frozen=True)
class GPT2Adapter(ArchitectureAdapter):
    """GPT-2 and GPT-Neo: d_mlp is `n_inner` / `intermediate_size`, 4 * d_model when unset."""

    def d_mlp(self, config: Any) -> int:
        inner = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None)
        return int(inner or 4 * config.hidden_size)


GPT2 = GPT2Adapter(
    name="gpt2",
    model_types=("gpt2", "gpt_neo"),
    layers="h",
    mlp_post=("mlp.act", "output"),
    mlp_pre=("mlp.act", "input"),
    causal=True,
    prefix="transformer.",
    resid_mid=("ln_2", "input"),
    mlp_in=("mlp.c_fc", "input"),
)
GPT_NEOX = ArchitectureAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="layers",
    mlp_post=("mlp.act", "output"),
    mlp_pre=("mlp.act", "input"),
    causal=True,
    prefix="gpt_neox.",
    resid_mid=("post_attention_layernorm", "input"),  # only without use_parallel_residual
    mlp_in=("mlp.dense_h_to_4h", "input"),
)
# Gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)); the neuron is down_proj's input and
# hook_pre is the gate (TransformerLens' convention for gated MLPs).
LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "olmo2"),
    layers="layers",
    mlp_post=("mlp.down_proj", "input"),
    mlp_pre=("mlp.gate_proj", "output"),
    causal=True,
    prefix="model.",
    resid_mid=("post_attention_layernorm", "input"),
    mlp_in=("mlp.gate_proj", "input"),
)
# BertIntermediate = dense + GELU; its output feeds BertOutput.dense (the output projection).
BERT = ArchitectureAdapter(
    name="bert",
    model_types=("bert", "roberta"),
    layers="encoder.layer",
    mlp_post=("intermediate", "output"),
    mlp_pre=("intermediate.dense", "output"),
    causal=False,
    prefix="",  # AutoModel gives the bare encoder
    resid_mid=("attention.output", "output"),  # post-LN: LayerNorm(attention + residual)
    mlp_in=("intermediate.dense", "input"),
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (GPT2, GPT_NEOX, LLAMA, BERT)
SUPPORTED: dict[str, ArchitectureAdapter] = {t: a for a in ADAPTERS for t in a.model_types}


def base_model_prefix(model: torch.nn.Module) -> str:
    """"transformer." for GPT2LMHeadModel, "" for GPT2Model or a bare module."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    name = next((n for n, m in model.named_modules() if m is base), "")
    return f"{name}." if name else ""


def adapter_for(config: Any, model: torch.nn.Module | None = None) -> ArchitectureAdapter:
    """Adapter for a HF config; with `model`, paths are made relative to that object."""
    model_type = getattr(config, "model_type", None)
    adapter = SUPPORTED.get(model_type)
    if adapter is None:
        raise ConfigError("model.source", model_type, sorted(SUPPORTED))
    return adapter if model is None else adapter.for_model(model)
