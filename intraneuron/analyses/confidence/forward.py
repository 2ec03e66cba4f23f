"""Full forward passes for confidence-neuron ablations (Stolfo et al. 2024, section 3.3 of the spec).

    clean_pass(handle, ids, layer, neurons)        -> CleanPass: final residual, activations, logits,
                                                      loss, entropy, rank, final-norm scale
    token_filter(ids, skip_first, drop_ids)        -> bool mask [B, T-1] of the positions that count
    drop_token_ids(tokenizer)                      -> the paper's dropped ids (BOS, EOS, newline)
    mean_activation(handle, ids, layer, neurons)   -> [m] ablation values (all tokens, early exit)
    ablated_logits(handle, ids, layer, neuron, v)  -> [B, T, V] logits of a rerun with the neuron
                                                      fixed to v (optionally final-norm scale frozen)

Unlike extraction, the clean and ablated passes run to the logits (no early exit): the effects are
measured on the output distribution. Per-position quantities of the next-token prediction (loss,
rank, and the token filter) have T-1 positions: position t predicts token t+1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from intraneuron.extraction.hooks import capture_sites, run_until_captured
from intraneuron.extraction.patching import Patch, patch_sites
from intraneuron.models.adapters import Site
from intraneuron.models.weights import Norm, read_norm, weight_layout

FINAL_NORM_INPUT = "final_norm.hook_in"  # our name for the final residual (TL: ln_final's input)


@dataclass(frozen=True)
class CleanPass:
    """One unablated forward pass over `ids`, everything float32 on the CPU."""

    ids: torch.Tensor  # [B, T] token ids
    layer: int
    final_layer: bool  # layer == n_layers - 1: only the final norm and W_U follow the neurons
    neurons: torch.Tensor  # [m] long, the neurons whose activations `acts` holds
    resid: torch.Tensor  # [B, T, d_model] input of the final norm
    acts: torch.Tensor  # [B, T, m] activations at blocks.<layer>.mlp.hook_post
    logits: torch.Tensor  # [B, T, vocab] the model's own (full head, padding rows included)
    loss: torch.Tensor  # [B, T-1] cross-entropy of token t+1 at position t
    entropy: torch.Tensor  # [B, T] nats
    rank: torch.Tensor  # [B, T-1] long, rank of the correct next token (0 = top; ties count for it)
    scale: torch.Tensor  # [B, T] the final norm's scale: the divisor of the (centred) residual
    norm: Norm  # the model's final norm (raw gain and bias)


def final_norm_module(handle) -> tuple[str, torch.nn.Module]:
    """Path and module of the final norm (GPT-2 transformer.ln_f, NeoX gpt_neox.final_layer_norm,
    Llama model.norm), from the architecture's weight layout."""
    layout = weight_layout(handle)
    if layout.final_norm is None:
        raise ValueError(f"{handle.model_id} has no final norm before an unembedding (an encoder?)")
    path = f"{handle.adapter.prefix}{layout.final_norm}"
    return path, handle.module(path)


def final_norm(handle) -> Norm:
    """The final norm's kind, raw gain, bias and eps."""
    layout = weight_layout(handle)
    return read_norm(final_norm_module(handle)[1], layout.norm_kind, layout.gain_offset)


def norm_scale(norm: Norm, resid: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [...]: LayerNorm sqrt(var + eps) (biased var, as the module), RMSNorm
    sqrt(mean(x^2) + eps): the quantity TL calls hook_scale."""
    x = resid.float()
    if norm.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(-1) + norm.eps)


def next_token_stats(logits: torch.Tensor, ids: torch.Tensor):
    """logits [B, T, V], ids [B, T] -> loss [B, T-1], entropy [B, T], rank [B, T-1]."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)  # [B, T, V]
    entropy = -(logp.exp() * logp).sum(-1)
    target = ids[:, 1:, None].to(logits.device)  # [B, T-1, 1]
    loss = -logp[:, :-1].gather(-1, target).squeeze(-1)
    correct = logits[:, :-1].gather(-1, target)  # [B, T-1, 1]
    rank = (logits[:, :-1] > correct).sum(-1)  # strictly better tokens: a tie ranks the label first
    return loss, entropy, rank


def neuron_site(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def clean_pass(handle, ids: torch.Tensor, layer: int, neurons: Sequence[int] | torch.Tensor,
               *, batch_size: int = 8) -> CleanPass:  # fmt: skip
    """Run `ids` [B, T] through the whole model, `batch_size` rows at a time."""
    neurons = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
    site = handle.site(neuron_site(layer))
    path, _ = final_norm_module(handle)
    norm = final_norm(handle)
    sites = [site, Site(FINAL_NORM_INPUT, path, "input", handle.n_layers)]
    parts: dict[str, list[torch.Tensor]] = {"resid": [], "acts": [], "logits": []}
    with torch.no_grad(), capture_sites(handle.module, sites, stop_early=False) as got:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(handle.device)
            logits = handle.model(input_ids=batch, use_cache=False).logits  # [b, T, V]
            parts["logits"].append(logits.float().cpu())
            parts["resid"].append(got[FINAL_NORM_INPUT].float().cpu())
            parts["acts"].append(got[site.name][..., neurons.to(handle.device)].float().cpu())
    resid, acts, logits = (torch.cat(parts[k]) for k in ("resid", "acts", "logits"))
    ids = ids.cpu()
    loss, entropy, rank = next_token_stats(logits, ids)
    return CleanPass(ids, layer, layer == handle.n_layers - 1, neurons, resid, acts, logits, loss,
                     entropy, rank, norm_scale(norm, resid), norm)  # fmt: skip


def drop_token_ids(tokenizer) -> list[int]:
    """BOS, EOS and the newline token: the ids whose positions the paper drops (its
    `filter_entropy_activation_df` takes the newline as the first id of encode("\\n"))."""
    found = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if newline:
        found.add(newline[0])
    return sorted(i for i in found if i is not None)


def token_filter(ids: torch.Tensor, skip_first: int = 3, drop_ids: Sequence[int] = ()) -> torch.Tensor:
    """[B, T] -> bool [B, T-1]: position t counts when t >= skip_first and neither token t nor
    token t+1 is in `drop_ids` (a prediction from or of BOS/EOS/newline says little about the
    neuron; the paper keeps 3 <= t < T-1)."""
    ids = ids.cpu()
    dropped = torch.isin(ids, torch.as_tensor(list(drop_ids), dtype=ids.dtype))  # [B, T]
    keep = ~(dropped[:, :-1] | dropped[:, 1:])
    keep[:, :skip_first] = False
    return keep


def mean_activation(handle, ids: torch.Tensor, layer: int,
                    neurons: Sequence[int] | torch.Tensor | None = None,
                    *, batch_size: int = 8) -> torch.Tensor:  # fmt: skip
    """[m] mean activation of each neuron over every position of `ids` [B, T] (before any token
    filter, as the paper's ablation value). Stops each pass at `layer` (early exit)."""
    site = handle.site(neuron_site(layer))
    total, count = None, 0
    with torch.no_grad(), capture_sites(handle.module, [site]) as got:
        for start in range(0, ids.shape[0], batch_size):
            run_until_captured(handle.model, ids[start : start + batch_size].to(handle.device), got)
            acts = got[site.name].double()  # float64 sums: the mean of many tokens stays exact
            total = acts.sum((0, 1)) if total is None else total + acts.sum((0, 1))
            count += acts.shape[0] * acts.shape[1]
    mean = (total / count).float().cpu()  # [d_mlp]
    return mean if neurons is None else mean[torch.as_tensor(neurons, dtype=torch.long)]


@contextmanager
def frozen_final_scale(handle, scale: torch.Tensor) -> Iterator[None]:
    """Replace the final norm's output by norm(x) computed with the given scale [b, T] instead of
    x's own: the rerun counterpart of the direct effect (what reaches W_U without the norm's
    rescaling)."""
    _, module = final_norm_module(handle)
    norm = final_norm(handle)

    def hook(_module, args, kwargs, output):
        x = (args[0] if args else kwargs["hidden_states"]).float()
        if norm.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        frozen = x / scale.to(x.device)[..., None] * norm.gain.to(x.device) + norm.bias.to(x.device)
        return frozen.to(output.dtype)

    handle_ = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle_.remove()


def ablated_logits(handle, ids: torch.Tensor, layer: int, neuron: int, value: float,
                   *, frozen_scale: torch.Tensor | None = None, batch_size: int = 8) -> torch.Tensor:  # fmt: skip
    """[B, T, V] float32 logits of a full rerun with `neuron` of `layer` set to `value` at every
    position; with `frozen_scale` [B, T], the final norm divides by it instead of recomputing."""
    patch = Patch(neuron_site(layer), "set", float(value), neurons=[int(neuron)])
    out = []
    with torch.no_grad(), patch_sites(handle, [patch]):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(handle.device)
            if frozen_scale is None:
                out.append(handle.model(input_ids=batch, use_cache=False).logits.float().cpu())
                continue
            with frozen_final_scale(handle, frozen_scale[start : start + batch_size]):
                out.append(handle.model(input_ids=batch, use_cache=False).logits.float().cpu())
    return torch.cat(out)
