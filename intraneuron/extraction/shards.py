"""Corpus shards: n jobs each extract a contiguous range of windows, and their partial profiles merge
into the profile one job would have extracted over the whole corpus.

Why this is exact: every stat is mergeable (extraction/reducers.py), a shard's pass uses global window
indices and token positions (so top-k positions, the corpus half of each window, which a block of
halves may straddle shards, and topk_token_ids mean the same in every shard), ties in the top-k are
broken by position, and every shard calibrates its pseudo-neurons on the same sample of windows
strided over the whole corpus, forwarded in the same chunks, so all shards' pseudo-neurons are one set. Counts, top-k, extremes and histograms merge exactly; float sums and moments to about
1e-7 relative (they are saved as float32 means and standardised moments).

Shard i of n holds windows [i * W // n, (i + 1) * W // n): the sizes differ by at most one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from intraneuron.extraction.profile import ActivationProfile
from intraneuron.extraction.stats import CombinedStat


class ShardPending(Exception):
    """A shard job saved its partial profile, but not every shard of the corpus is cached yet: the
    job that finds all of them merges them. Not a failure: the job ends cleanly."""

    def __init__(self, shard: int, shards: int, missing: dict[int, list[int]]):
        self.shard, self.shards, self.missing = shard, shards, missing  # layer -> missing shards
        layers = sorted(missing)
        which = (f"layer {layers[0]}'s profile is" if len(layers) == 1
                 else f"layers {', '.join(map(str, layers))}' profiles are")  # fmt: skip
        gaps = "; ".join(
            f"layer {layer}: shard{'s' if len(missing[layer]) > 1 else ''} {', '.join(map(str, missing[layer]))}"
            for layer in layers
        )
        super().__init__(
            f"extraction shard {shard} of {shards} saved; {which} merged by the job that finds all "
            f"{shards} shards cached (missing: {gaps})"
        )


def shard_windows(n_windows: int, shard: int, shards: int) -> range:
    """The window indices of shard `shard` (0-based) of `shards`: contiguous, in order, covering
    [0, n_windows) once over all shards."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: expected 0 <= shard < shards")
    return range(shard * n_windows // shards, (shard + 1) * n_windows // shards)


def merge_profiles(partials: Iterable[ActivationProfile]) -> ActivationProfile:
    """One profile from the partial profiles of one layer over disjoint window ranges.

    The stats are rebuilt from each partial's tensors and merged (CombinedStat.merge); the top-k
    token ids ([D, K], also of the pseudo-neurons) are looked up by position in the partials' own
    top-k, which hold every kept occurrence with the id the pass read from the corpus, so no corpus
    is needed here. n_tokens is the partials' sum. `partials` is consumed once, in order: a
    generator that loads each partial as it comes (extraction/blocks.py) holds one at a time beside
    the merge, plus the partials' top-k ([D, K] each).
    """
    merged, first, n_tokens = None, None, 0
    topk: dict[str, tuple[list, list]] = {p: ([], []) for p in ("", "pseudo.")}
    for partial in partials:
        where = (partial.layer, partial.site, partial.input_site, partial.window_len)
        if first is None:
            first, meta = where, partial.metadata()
        elif where != first:
            raise ValueError(f"cannot merge profiles of different layers, sites or window lengths: "
                             f"{meta} and {partial.metadata()}")  # fmt: skip
        stat = CombinedStat.load_state_dict(partial.tensors)
        merged = stat if merged is None else merged
        if stat is not merged:
            merged.merge(stat)
        for p, (positions, ids) in topk.items():
            if f"{p}topk_positions" in partial.tensors:
                positions.append(partial.tensors[f"{p}topk_positions"])
                ids.append(partial.tensors[f"{p}topk_token_ids"])
        n_tokens += partial.n_tokens
    if merged is None:
        raise ValueError("merge_profiles needs at least one partial profile")
    tensors = {k: v.cpu() for k, v in merged.state_dict().items()}
    for p, (positions, ids) in topk.items():
        if f"{p}topk_positions" in tensors:
            tensors[f"{p}topk_token_ids"] = _token_ids_at(tensors[f"{p}topk_positions"], torch.cat(positions, 1),
                                                          torch.cat(ids, 1))  # fmt: skip
    layer, site, input_site, window_len = first
    return ActivationProfile(layer=layer, site=site, input_site=input_site, window_len=window_len,
                             n_tokens=n_tokens, tensors=tensors)  # fmt: skip


def _token_ids_at(positions: torch.Tensor, known_positions: torch.Tensor, known_ids: torch.Tensor) -> torch.Tensor:
    """ids [D, K] of `positions` [D, K], each found in the same row of known_positions [D, K'] with
    its id in known_ids [D, K'] (an empty slot, position -1, has the id the pass gave it)."""
    order = known_positions.argsort(dim=1)
    sorted_positions = known_positions.gather(1, order)  # [D, K']
    at = torch.searchsorted(sorted_positions.contiguous(), positions.contiguous())  # [D, K]
    at = at.clamp_max(sorted_positions.shape[1] - 1)
    if not torch.equal(sorted_positions.gather(1, at), positions):
        raise ValueError("a merged top-k position is in no partial's top-k")
    return known_ids.gather(1, order.gather(1, at)).long()
