"""The extraction pass: (model, token windows, layers) -> one ActivationProfile per layer.

One forward pass per batch of windows serves every requested layer: hooks read each layer's MLP
neurons (and the residual stream entering the layer), streaming reducers fold them in, and the pass
stops after the deepest requested layer. Layers already in the cache cost nothing.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from intraneuron.errors import ConfigError
from intraneuron.extraction.cache import ProfileCache, cache_key
from intraneuron.extraction.hooks import capture_sites, run_until_captured
from intraneuron.extraction.profile import ActivationProfile
from intraneuron.extraction.reducers import Histogram, Moments, TokenTypeTable, TopK

log = logging.getLogger(__name__)


def progress_interval() -> float:
    """Seconds between progress-bar updates: live in a terminal, sparse in a log file."""
    return 0.5 if sys.stderr.isatty() else 60.0


@dataclass(frozen=True)
class ExtractionSettings:
    top_k: int = 100  # occurrences kept per neuron
    site: str = "mlp.hook_post"  # neuron site inside block l (TransformerLens naming)
    input_site: str | None = "hook_resid_pre"  # layer input, summed per token type; None = skip
    track_type_max: bool = True
    hist_min: float = -10.0
    hist_max: float = 10.0
    hist_bins: int = 200
    skip_first_positions: int = 0  # window positions excluded from all statistics
    # Below: how, not what. They do not change the numbers and stay out of the cache key.
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True

    def key_fields(self) -> dict:
        fields = asdict(self)
        for how in ("batch_size", "device", "progress"):
            fields.pop(how)
        return fields

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError("extraction.top_k", self.top_k, "an integer >= 1")
        if self.batch_size < 1:
            raise ConfigError("extraction.batch_size", self.batch_size, "an integer >= 1")
        if not self.hist_min < self.hist_max or self.hist_bins < 1:
            raise ConfigError(
                "extraction.hist_*", (self.hist_min, self.hist_max, self.hist_bins),
                "hist_min < hist_max and hist_bins >= 1",
            )
        if self.skip_first_positions < 0:
            raise ConfigError("extraction.skip_first_positions", self.skip_first_positions, ">= 0")


class _LayerReducers:
    """Every statistic kept for one layer during the pass."""

    def __init__(self, d_mlp: int, d_model: int, vocab: int, s: ExtractionSettings, device):
        self.topk = TopK(s.top_k, d_mlp, device)
        self.types = TokenTypeTable(vocab, d_mlp, device, track_max=s.track_type_max)
        self.moments = Moments(d_mlp, device)
        edges = torch.linspace(s.hist_min, s.hist_max, s.hist_bins + 1)
        self.hist = Histogram(edges, d_mlp, device)
        self.resid = TokenTypeTable(vocab, d_model, device, track_max=False) if s.input_site else None

    def add(self, acts, resid, token_ids, positions) -> None:
        """acts [N, d_mlp]; resid [N, d_model] or None; token_ids, positions [N]."""
        self.topk.add(acts, positions)
        self.types.add(acts, token_ids)
        self.moments.add(acts)
        self.hist.add(acts)
        if self.resid is not None:
            self.resid.add(resid, token_ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            **self.topk.state_dict(),
            **self.types.state_dict("type"),
            **self.moments.state_dict(),
            **self.hist.state_dict(),
        }
        if self.resid is not None:
            out.update(self.resid.state_dict("resid"))
        return {k: v.cpu() for k, v in out.items()}


def profile_key_fields(handle, windows, layer: int, settings: ExtractionSettings) -> dict:
    return {
        "model": handle.fingerprint,
        "dtype": str(next(handle.model.parameters()).dtype),
        "corpus": windows.content_hash,
        "window_len": windows.window_len,
        "layer": layer,
        **settings.key_fields(),
    }


def extract_profiles(
    handle, windows, layers: list[int], settings: ExtractionSettings, cache: ProfileCache | None
) -> dict[int, ActivationProfile]:
    """Profiles for `layers`, from the cache where possible, else from one shared forward pass."""
    settings.validate()
    for layer in layers:  # fail on a bad layer before any forward pass
        handle.site(f"blocks.{layer}.{settings.site}")
    keys = {l: cache_key(profile_key_fields(handle, windows, l, settings)) for l in layers}
    profiles = {}
    for layer in layers:
        if cache is not None and (hit := cache.load(keys[layer])) is not None:
            log.info("layer %d: profile from cache %s", layer, cache.entry(keys[layer]))
            profiles[layer] = hit
    missing = [l for l in layers if l not in profiles]
    if missing:
        computed = _run_pass(handle, windows, missing, settings)
        for layer, profile in computed.items():
            if cache is not None:
                cache.save(keys[layer], profile, profile_key_fields(handle, windows, layer, settings))
            profiles[layer] = profile
    return {l: profiles[l] for l in layers}


def _run_pass(handle, windows, layers, settings: ExtractionSettings) -> dict[int, ActivationProfile]:
    device = torch.device(settings.device)
    T, skip = windows.window_len, settings.skip_first_positions
    if skip >= T:
        raise ConfigError("extraction.skip_first_positions", skip, f"< window_len ({T})")
    vocab = handle.model.get_input_embeddings().num_embeddings
    neuron_sites = {l: handle.site(f"blocks.{l}.{settings.site}") for l in layers}
    input_sites = (
        {l: handle.site(f"blocks.{l}.{settings.input_site}") for l in layers} if settings.input_site else {}
    )
    d_mlp, d_model = handle.d_mlp, handle.d_model
    reducers = {l: _LayerReducers(d_mlp, d_model, vocab, settings, device) for l in layers}

    ids = windows.ids  # [W, T] memmap
    n_windows = ids.shape[0]
    kept_per_window = T - skip
    pos_in_window = torch.arange(skip, T, device=device)  # [T - skip]
    bar = tqdm(
        total=n_windows * kept_per_window, unit="tok", unit_scale=True, disable=not settings.progress,
        desc=f"extract layers {layers}", mininterval=progress_interval(),
    )
    sites = list(neuron_sites.values()) + list(input_sites.values())
    with torch.inference_mode(), capture_sites(handle.module, sites) as captured:
        for start in range(0, n_windows, settings.batch_size):
            batch = torch.from_numpy(np.asarray(ids[start : start + settings.batch_size], dtype=np.int64))
            batch = batch.to(device)  # [B, T]
            run_until_captured(handle.model, batch, captured)
            B = batch.shape[0]
            token_ids = batch[:, skip:].reshape(-1)  # [N = B * (T - skip)]
            window_idx = torch.arange(start, start + B, device=device)
            positions = (window_idx[:, None] * T + pos_in_window[None, :]).reshape(-1)  # [N]
            for layer in layers:
                acts = captured[neuron_sites[layer].name][:, skip:].reshape(-1, d_mlp)  # [N, d_mlp]
                resid = (
                    captured[input_sites[layer].name][:, skip:].reshape(-1, d_model)
                    if input_sites else None
                )  # [N, d_model]
                reducers[layer].add(acts, resid, token_ids, positions)
            bar.update(token_ids.numel())
    bar.close()

    flat_ids = np.asarray(ids).reshape(-1)
    profiles = {}
    for layer in layers:
        tensors = reducers[layer].tensors()
        tensors["topk_token_ids"] = torch.from_numpy(
            flat_ids[tensors["topk_positions"].clamp_min(0).numpy()].astype(np.int64)
        )
        profiles[layer] = ActivationProfile(
            layer=layer,
            site=neuron_sites[layer].name,
            input_site=input_sites[layer].name if input_sites else None,
            window_len=T,
            n_tokens=n_windows * kept_per_window,
            tensors=tensors,
        )
    return profiles
