"""Read named activation sites during a forward pass and stop it as soon as all were read.

Early exit is what makes layer-wise work cheap: analysing layer l of an L-layer model costs about
(l + 1) / L of a full pass, because the forward pass is aborted (by an exception raised from the
last hook) the moment every requested site has been seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once every requested site has been read in the current forward pass."""


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture_sites(
    resolve_module, sites: Sequence, *, stop_early: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Hook `sites` (objects with .name, .module_path, .read) and fill a dict name -> tensor.

    `resolve_module(path) -> nn.Module`. The dict is refilled by each forward pass; with
    `stop_early`, the pass raises StopForward once all sites are in it (callers catch it, see
    `run_until_captured`). "input" sites read `args[0]`, or `hidden_states` when the module was
    called with keywords only (transformers 5 decoder layers are).
    """
    captured: dict[str, torch.Tensor] = {}
    wanted = {s.name for s in sites}
    handles = []

    def store(name: str, tensor: torch.Tensor) -> None:
        captured[name] = tensor.detach()
        if stop_early and wanted.issubset(captured):
            raise StopForward

    for site in sites:
        module: nn.Module = resolve_module(site.module_path)
        if site.read == "output":
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, out, name=site.name: store(name, _first_tensor(out))
                )
            )
        else:
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, name=site.name: store(
                        name, args[0] if args else kwargs["hidden_states"]
                    ),
                    with_kwargs=True,
                )
            )
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_until_captured(model: nn.Module, input_ids: torch.Tensor, captured: dict) -> None:
    """One forward pass that ends at StopForward; raises if a site was never reached."""
    captured.clear()
    try:
        model(input_ids=input_ids, use_cache=False)
    except StopForward:
        return
    except TypeError:
        # Encoders (BERT) do not take use_cache.
        try:
            model(input_ids=input_ids)
        except StopForward:
            return
    raise RuntimeError("the forward pass ended before every requested site was read")
