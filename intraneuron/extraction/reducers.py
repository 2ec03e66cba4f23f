"""Streaming, mergeable statistics over activation batches (in the spirit of baukit's runningstats).

Every reducer takes batches with `add(...)`, combines with another reducer over a different corpus
shard with `merge(other)`, and exports tensors with `state_dict()`. Memory is fixed by the number of
neurons, k, the vocabulary and the histogram bins; it never grows with corpus length.
Shapes: N = tokens in a batch (flattened over batch and position), D = neurons or model width,
V = vocabulary size, K = top-k.
"""

from __future__ import annotations

import torch


class TopK:
    """The K largest values per column and the global token positions where they occurred."""

    def __init__(self, k: int, width: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((k, width), -torch.inf, device=device)  # [K, D] descending
        self.positions = torch.full((k, width), -1, dtype=torch.long, device=device)  # [K, D]

    def add(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        """acts [N, D]; positions [N] global token positions."""
        self._keep_top(acts.float(), positions[:, None].expand_as(acts))

    def merge(self, other: TopK) -> None:
        self._keep_top(other.values, other.positions)

    def _keep_top(self, values: torch.Tensor, positions: torch.Tensor) -> None:
        top = torch.cat([self.values, values]).topk(self.k, dim=0)  # sorted descending
        self.values = top.values
        self.positions = torch.cat([self.positions, positions]).gather(0, top.indices)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # [D, K]: one row per neuron reads more naturally downstream.
        return {"topk_values": self.values.T.contiguous(), "topk_positions": self.positions.T.contiguous()}


class TokenTypeTable:
    """Per token type: occurrence count, activation sum (float64) and max, for every column."""

    def __init__(self, vocab_size: int, width: int, device: torch.device | str = "cpu", track_max: bool = True):
        self.count = torch.zeros(vocab_size, dtype=torch.long, device=device)  # [V]
        self.sum = torch.zeros(vocab_size, width, dtype=torch.float64, device=device)  # [V, D]
        self.max = (
            torch.full((vocab_size, width), -torch.inf, device=device) if track_max else None
        )  # [V, D]

    def add(self, acts: torch.Tensor, token_ids: torch.Tensor) -> None:
        """acts [N, D]; token_ids [N]."""
        self.count += torch.bincount(token_ids, minlength=self.count.numel())
        self.sum.index_add_(0, token_ids, acts.to(torch.float64))
        if self.max is not None:
            self.max.scatter_reduce_(
                0, token_ids[:, None].expand_as(acts), acts.float(), reduce="amax", include_self=True
            )

    def merge(self, other: TokenTypeTable) -> None:
        self.count += other.count
        self.sum += other.sum
        if self.max is not None:
            torch.maximum(self.max, other.max, out=self.max)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Only the observed types are exported: `{prefix}_ids` [T], `{prefix}_count` [T], mean and max [T, D]."""
        seen = self.count.nonzero().squeeze(1)
        count = self.count[seen]
        out = {
            "type_ids": seen,
            "type_count": count,
            f"{prefix}_mean": (self.sum[seen] / count[:, None]).float(),
        }
        if self.max is not None:
            out[f"{prefix}_max"] = self.max[seen]
        return out


class Moments:
    """Count, mean, central moments M2..M4, min, max and positive fraction per column.

    Batches are combined with the pairwise update of Pébay (2008), which stays accurate where
    raw power sums lose precision (kurtosis of large-mean activations).
    """

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        zeros = lambda: torch.zeros(width, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.mean, self.m2, self.m3, self.m4, self.positive = zeros(), zeros(), zeros(), zeros(), zeros()
        self.min = torch.full((width,), torch.inf, dtype=torch.float64, device=device)
        self.max = torch.full((width,), -torch.inf, dtype=torch.float64, device=device)

    def add(self, acts: torch.Tensor) -> None:
        # Within a batch the central sums are taken in float32 (a few thousand values around their
        # own mean lose nothing that matters) and merged in float64: about 4x faster than float64.
        x = acts.float()  # [N, D]
        n = x.shape[0]
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        batch = Moments.__new__(Moments)
        batch.n, batch.mean = n, mean.double()
        batch.m2, batch.m3, batch.m4 = (t.sum(0).double() for t in (d2, d2 * d, d2 * d2))
        batch.positive = (x > 0).sum(0, dtype=torch.float64)
        low, high = x.aminmax(dim=0)
        batch.min, batch.max = low.double(), high.double()
        self.merge(batch)

    def merge(self, o: Moments) -> None:
        na, nb = self.n, o.n
        if nb == 0:
            return
        n = na + nb
        delta = o.mean - self.mean
        d_n = delta / n
        m2 = self.m2 + o.m2 + delta * d_n * na * nb
        m3 = (
            self.m3 + o.m3 + delta * d_n * d_n * na * nb * (na - nb)
            + 3 * d_n * (na * o.m2 - nb * self.m2)
        )
        m4 = (
            self.m4 + o.m4
            + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
            + 6 * d_n * d_n * (na * na * o.m2 + nb * nb * self.m2)
            + 4 * d_n * (na * o.m3 - nb * self.m3)
        )
        self.mean = self.mean + d_n * nb
        self.m2, self.m3, self.m4, self.n = m2, m3, m4, n
        self.positive = self.positive + o.positive
        self.min, self.max = torch.minimum(self.min, o.min), torch.maximum(self.max, o.max)

    def state_dict(self) -> dict[str, torch.Tensor]:
        var = self.m2 / self.n
        safe_var = var.clamp_min(1e-30)
        return {
            "act_count": torch.tensor(self.n),
            "act_mean": self.mean.float(),
            "act_var": var.float(),
            "act_skew": ((self.m3 / self.n) / safe_var**1.5).float(),
            "act_kurt": ((self.m4 / self.n) / safe_var**2).float(),  # raw, Gaussian = 3
            "act_min": self.min.float(),
            "act_max": self.max.float(),
            "act_frac_positive": (self.positive / self.n).float(),
        }


class Histogram:
    """Histogram per column on evenly spaced edges, with an underflow and an overflow bin.

    Bin b (1..B) holds edges[b-1] <= x < edges[b]; bin 0 is below edges[0], bin B+1 at or above
    edges[-1]. Even spacing lets the bin be computed arithmetically, faster than a binary search
    over the edges; one comparison with the bin's own edges then corrects values that rounding put
    one bin off, so the counts are exactly those of `torch.bucketize(x, edges, right=True)`.
    """

    def __init__(self, edges: torch.Tensor, width: int, device: torch.device | str = "cpu"):
        self.edges = edges.to(device=device, dtype=torch.float32)  # [B + 1]
        n_inner = edges.numel() - 1
        self.n_bins = n_inner + 2  # B inner bins + under + over
        self.low, self.high = float(edges[0]), float(edges[-1])
        self.scale = n_inner / (self.high - self.low)
        self.counts = torch.zeros(width, self.n_bins, dtype=torch.long, device=device)  # [D, B + 2]
        self._offsets = torch.arange(width, device=device) * self.n_bins  # [D]
        inf = torch.tensor([torch.inf], device=device)
        self._bounds = torch.cat([-inf, self.edges, inf])  # [B + 3]: bin b is [bounds[b], bounds[b+1])

    def add(self, acts: torch.Tensor) -> None:
        x = acts.float()  # [N, D]
        position = (x - self.low).mul_(self.scale).add_(1.0).clamp_(0.0, self.n_bins - 1.0)
        bins = position.long()  # truncation = floor on non-negative values
        bins -= (x < self._bounds[bins]).long()
        bins += (x >= self._bounds[bins + 1]).long()
        flat = (bins + self._offsets).view(-1)
        self.counts.view(-1).add_(torch.bincount(flat, minlength=self.counts.numel()))

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"hist_edges": self.edges, "hist_counts": self.counts}
