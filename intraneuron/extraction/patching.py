"""Write hooks: change an activation at a TransformerLens-named site during a forward pass.

The counterpart of `hooks.capture_sites` (which reads): a `Patch` sets, shifts, scales or
mean-ablates some units of a site, e.g. one neuron replaced by its corpus mean (a profile's
`act_mean`) to measure what it does to the final LayerNorm scale and the logits.

Order rule: hooks on one module run in registration order, so a read hook sees the patched value
only when it is registered after the patch:

    with patch_sites(handle, patches), capture_sites(handle.module, sites) as captured: ...

reads patched values; the opposite nesting reads the unpatched ones (unless `prepend=True`, which
puts the patches in front of hooks already registered). Several patches on one site apply in list
order. A patch never writes into the model's tensor: it returns a new one, so a module that
reuses its input or output (a residual connection) still sees the original where it should.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

PatchOp = Literal["set", "add", "scale", "mean_ablate"]
PATCH_OPS = get_args(PatchOp)


@dataclass(frozen=True, eq=False)  # eq on tensors is elementwise: compare patches by identity
class Patch:
    """One change at one site.

    `neurons`: the units (last dimension) to change; None = every unit.
    `value`: for set / add / scale, a scalar or a tensor broadcastable to the selected units
    [..., n_selected]; for mean_ablate, the per-unit mean of the whole site [d] (or a scalar),
    of which the selected units' entries are written.
    """

    site: str  # e.g. "blocks.3.mlp.hook_post"
    op: PatchOp
    value: float | torch.Tensor = 0.0
    neurons: Sequence[int] | torch.Tensor | None = None

    def __post_init__(self):
        if self.op not in PATCH_OPS:
            raise ValueError(f"Patch.op={self.op!r}: expected one of {PATCH_OPS}")

    def index(self) -> torch.Tensor | None:
        """The selected units as a long tensor [n_selected], or None for all."""
        if self.neurons is None:
            return None
        return torch.as_tensor(self.neurons, dtype=torch.long).reshape(-1)

    def apply(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., d] -> a new tensor with the selected units changed; x is left as it was."""
        if index is None:
            index = self.index()
        value = self.value
        if isinstance(value, torch.Tensor):
            value = value.to(device=x.device, dtype=x.dtype)
            if self.op == "mean_ablate" and value.dim() > 0 and index is not None:
                value = value[index.to(value.device)]  # [d] -> [n_selected]
        if index is None:
            return self._change(x, value)
        index = index.to(x.device)
        picked = x.index_select(-1, index)  # [..., n_selected]
        return x.index_copy(x.dim() - 1, index, self._change(picked, value))

    def _change(self, x: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return x + value
        if self.op == "scale":
            return x * value
        # set / mean_ablate: a fresh dense tensor (an expanded view could be written to in place)
        return torch.zeros_like(x).add_(value)


@contextmanager
def patch_sites(handle, patches: Sequence[Patch], *, prepend: bool = False) -> Iterator[None]:
    """Register `patches` on `handle.model` for the duration of the block (see the order rule).

    `handle` resolves names with `.site(name)` (a ConfigError for an unknown site or layer) and
    module paths with `.module(path)`. Selections and mean vectors are checked against the
    site's width before any hook is registered.
    """
    resolved = []
    for patch in patches:
        site = handle.site(patch.site)
        width = handle.d_model if site.name.endswith("hook_resid_pre") else handle.d_mlp
        index = _checked_index(patch, width)
        resolved.append((site, handle.module(site.module_path), patch, index))

    handles = []
    try:
        for site, module, patch, index in resolved:
            if site.read == "output":
                hook = _output_hook(patch, index)
                handles.append(module.register_forward_hook(hook, prepend=prepend))
            else:
                hook = _input_hook(patch, index)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend))
        yield
    finally:
        for h in handles:
            h.remove()


def _checked_index(patch: Patch, width: int) -> torch.Tensor | None:
    index = patch.index()
    if index is not None and (index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= width):
        raise ValueError(f"Patch.neurons={patch.neurons!r}: expected a non-empty set of units in 0..{width - 1}")
    value = patch.value
    if patch.op == "mean_ablate" and isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape != (width,):
            raise ValueError(f"Patch.value of shape {tuple(value.shape)}: expected a per-unit mean of shape ({width},)")
    return index


def _output_hook(patch: Patch, index: torch.Tensor | None):
    def hook(_module, _args, output):
        if isinstance(output, tuple | list):  # keep the other elements (attention weights, caches)
            patched = [patch.apply(output[0], index), *output[1:]]
            return tuple(patched) if isinstance(output, tuple) else patched
        return patch.apply(output, index)

    return hook


def _input_hook(patch: Patch, index: torch.Tensor | None):
    def hook(_module, args, kwargs):
        if args:
            return (patch.apply(args[0], index), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": patch.apply(kwargs["hidden_states"], index)}

    return hook
