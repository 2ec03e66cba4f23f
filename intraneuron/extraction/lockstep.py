"""Several models in lockstep over the same token windows: the correlation of every neuron of the
reference model with every neuron of each other model (Gurnee et al. 2024, "Universal neurons").

The full correlation matrix is never held: layer pairs (reference layer, other layer) are grouped
into passes whose float64 accumulators fit in a memory bound (`correlation.plan_tiles`); after a
pass each pair is reduced to each reference neuron's top-k partners, merged across the other
model's layers. Partners are global indices into the other model, `layer * d_mlp + neuron`. The
rotation baseline accumulates, beside each pair, the correlation with a seeded random mix of the
other layer's neurons, so both come from the same tokens in the same pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from intraneuron.extraction.correlation import (
    StreamingCorrelation,
    bytes_per_pair,
    merge_summaries,
    plan_tiles,
    rotation,
    summarise,
    working_bytes,
)
from intraneuron.extraction.hooks import capture_sites, run_until_captured

log = logging.getLogger(__name__)
BASELINES = ("rotation", "orthogonal", "none")
Summary = dict[str, torch.Tensor]  # correlation.summarise: max_corr, partner, top_corr, top_partner


@dataclass(frozen=True)
class LockstepSettings:
    site: str = "mlp.hook_post"  # the neuron site read in every model
    top_k: int = 5  # partners kept per reference neuron and other model
    baseline: str = "rotation"  # rotation (the authors': unit-norm Gaussian rows) | orthogonal | none
    seed: int = 0
    memory_bytes: int = 2 * 1024**3  # bound on one pass's accumulators
    batch_size: int = 16  # windows per forward pass
    device: str = "cpu"
    skip_first_positions: int = 0
    drop_token_ids: tuple[int, ...] = ()  # tokens whose rows are left out (BOS, pad, newline)


@dataclass
class Correlations:
    """Per other model m and reference layer l: the summary of its correlations (and baseline)."""

    actual: dict[int, dict[int, Summary]]  # m -> layer -> summary; partners = other layer * d_mlp + neuron
    baseline: dict[int, dict[int, Summary]]  # the same under the baseline (empty with baseline "none")
    n_tokens: int  # rows (tokens) each correlation is computed over


def correlate_models(
    reference, others: list, ids: np.ndarray, ref_layers: list[int], other_layers: list[list[int]],
    settings: LockstepSettings, on_progress: Callable[[int, int], None] | None = None,
) -> Correlations:  # fmt: skip
    """reference, others: ModelHandles with one tokenizer; ids [W, T] the token windows;
    other_layers[m]: the layers of others[m] searched for partners."""
    if settings.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {settings.baseline!r}")
    device = torch.device(settings.device)
    with_baseline = settings.baseline != "none"
    plans = []
    for m, other in enumerate(others):
        pairs = [(lr, lo) for lr in ref_layers for lo in other_layers[m]]
        d_b = other.d_mlp * (2 if with_baseline else 1)  # the baseline doubles each pair's accumulators
        reserve = working_bytes(reference.d_mlp, d_b, settings.batch_size * ids.shape[1])
        plans.append(plan_tiles(pairs, reference.d_mlp, d_b, settings.memory_bytes, reserve))
    total = sum(len(passes) for passes in plans) * int(ids.shape[0])
    done, n_tokens = 0, 0
    actual: dict[int, dict[int, Summary]] = {m: {} for m in range(len(others))}
    baseline: dict[int, dict[int, Summary]] = {m: {} for m in range(len(others))} if with_baseline else {}
    for m, other in enumerate(others):
        rotations = {lo: _rotation(other.d_mlp, settings, m, lo, device) for lo in other_layers[m]} if with_baseline else {}
        for tile in plans[m]:
            log.info("model %d: pass over %d layer pairs (%.0f MiB of accumulators)", m, len(tile),
                     len(tile) * bytes_per_pair(reference.d_mlp, other.d_mlp) / 2**20)  # fmt: skip
            accumulators = {pair: StreamingCorrelation(reference.d_mlp, other.d_mlp, device) for pair in tile}
            rotated = {pair: StreamingCorrelation(reference.d_mlp, other.d_mlp, device) for pair in tile} if with_baseline else {}
            n_tokens = 0
            for a, b, rows in _lockstep_batches(reference, other, ids, tile, settings, device):
                for pair in tile:
                    lr, lo = pair
                    accumulators[pair].add(a[lr], b[lo])
                    if with_baseline:
                        rotated[pair].add(a[lr], b[lo] @ rotations[lo].T)
                n_tokens += rows
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
            for (lr, lo), accumulator in accumulators.items():
                offset = lo * other.d_mlp
                _fold(actual[m], lr, summarise(accumulator.correlation(), settings.top_k, offset))
                if with_baseline:
                    _fold(baseline[m], lr, summarise(rotated[lr, lo].correlation(), settings.top_k, offset))
    return Correlations(actual=actual, baseline=baseline, n_tokens=n_tokens)


def _fold(summaries: dict[int, Summary], layer: int, summary: Summary) -> None:
    summaries[layer] = summary if layer not in summaries else merge_summaries(summaries[layer], summary)


def _rotation(d: int, settings: LockstepSettings, m: int, layer: int, device) -> torch.Tensor:
    # one matrix per (other model, layer), reproducible from the run's seed
    seed = (settings.seed * 1_000_003 + m * 10_007 + layer) % 2**63
    return rotation(d, seed, orthogonal=settings.baseline == "orthogonal", device=device)


def _lockstep_batches(reference, other, ids: np.ndarray, tile, settings: LockstepSettings, device):
    """Per batch of windows: ({ref layer: [N, D_ref]}, {other layer: [N, D_other]}, N) float32 on
    the kept rows (positions >= skip_first_positions, tokens not in drop_token_ids)."""
    ref_sites = {lr: reference.site(f"blocks.{lr}.{settings.site}") for lr in sorted({p[0] for p in tile})}
    other_sites = {lo: other.site(f"blocks.{lo}.{settings.site}") for lo in sorted({p[1] for p in tile})}
    drop = torch.tensor(sorted(settings.drop_token_ids), dtype=torch.long, device=device)
    with torch.inference_mode(), capture_sites(reference.module, list(ref_sites.values())) as ref_captured, \
            capture_sites(other.module, list(other_sites.values())) as other_captured:  # fmt: skip
        for start in range(0, ids.shape[0], settings.batch_size):
            batch = torch.from_numpy(np.asarray(ids[start : start + settings.batch_size], dtype=np.int64)).to(device)
            keep = torch.ones_like(batch, dtype=torch.bool)  # [B, T]
            keep[:, : settings.skip_first_positions] = False
            if drop.numel():
                keep &= ~torch.isin(batch, drop)
            run_until_captured(reference.model, batch, ref_captured)
            a = {lr: ref_captured[s.name][keep].float() for lr, s in ref_sites.items()}  # [N, D_ref] each
            run_until_captured(other.model, batch, other_captured)
            b = {lo: other_captured[s.name][keep].float() for lo, s in other_sites.items()}  # [N, D_other] each
            yield a, b, int(keep.sum())
