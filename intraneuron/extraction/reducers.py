"""Streaming, mergeable statistics over activation batches (in the spirit of baukit's runningstats).

Every `Stat` takes batches with `add(...)` (its own natural arguments), combines with the same stat
over another corpus shard with `merge(other)`, exports tensors whose names all start with a prefix
with `state_dict(prefix)`, and is rebuilt from those tensors with `load_state_dict(state, prefix)`,
so a saved profile can be resumed or merged with a shard extracted elsewhere. Memory is fixed by the
number of columns, k, the token types of the corpus and the histogram bins; it never grows with
corpus length.

Exported tensors are what analyses read (means, not float64 sums; float32 moments), so a rebuilt
stat is exact in its counts, top-k, extremes and histogram, and carries its float64 accumulators
(type sums, central moments) at float32 precision: about 1e-7 relative. The tables keyed by token
type are in extraction/type_tables.py.

Shapes: N = tokens in a batch (flattened over batch and position), D = neurons or model width,
K = top-k, B = histogram bins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Self

import torch

State = dict[str, torch.Tensor]


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """mask [N, D] bool -> [D] int32 count of True per column. Summing the bytes as uint8 into int32
    is 4x faster on CPU than summing the bools (which takes a slow path over dim 0)."""
    return mask.view(torch.uint8).sum(0, dtype=torch.int32)


class Stat(ABC):
    """A streaming statistic: add batches, merge shards, save and rebuild."""

    prefix: ClassVar[str]  # what `state_dict()` uses when no prefix is given

    @abstractmethod
    def add(self, *args: torch.Tensor) -> None:
        """Fold one batch in (each stat names its own arguments)."""

    @abstractmethod
    def merge(self, other: Self) -> None:
        """Fold in the same stat computed over another shard."""

    @abstractmethod
    def state_dict(self, prefix: str | None = None) -> State:
        """Tensors whose names all start with `prefix` (default: the class's)."""

    @classmethod
    @abstractmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> Self:
        """The stat rebuilt from what `state_dict(prefix)` wrote."""

    def export(self, prefix: str | None = None) -> State:
        """`state_dict(prefix)` at the end of a pass: a stat may hand its own buffers over as the
        exported tensors (the type tables do, extraction/type_tables.py), so it must not be used
        after this."""
        return self.state_dict(prefix)


class TopK(Stat):
    """The K largest values per column and the global token positions where they occurred."""

    prefix = "topk"

    def __init__(self, k: int, width: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((k, width), -torch.inf, device=device)  # [K, D] descending
        self.positions = torch.full((k, width), -1, dtype=torch.long, device=device)  # [K, D]

    def add(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        """acts [N, D]; positions [N] global token positions.

        Only values at or above a column's running K-th can enter it: once the first batches have
        filled the top-k, a column sees a few such values per batch, and later in a pass most
        columns none. The columns with a candidate (their batch maximum reaches the K-th) are taken
        apart when they are a minority; their candidates are gathered into an [m, H] block (m = the
        most candidates any column has; -inf padding) and merged with the kept K, instead of ranking
        all K + N rows of every column (2.3x faster per batch at steady state on SmolLM2-sized
        layers). Values tied with the K-th stay candidates, so the tie rule of `_keep_top` sees them.
        """
        x = acts.float()  # [N, D]
        if not len(x):
            return
        kth = self.values[-1]  # [D]
        hot = (x.amax(0) >= kth).nonzero().squeeze(1)  # [H] columns with a candidate
        if not hot.numel():
            return
        cols_of = None if 2 * hot.numel() > x.shape[1] else hot  # a minority: work on those alone
        if cols_of is not None:
            x, kth = x[:, cols_of], kth[cols_of]  # [N, H], [H]
        candidate = x >= kth  # [N, H]
        per_column = count_true(candidate)  # [H]
        m = int(per_column.max())
        if m >= min(self.k, len(x)):  # the first batches: everything is a candidate
            self._keep_top(x, positions[:, None].expand_as(x), cols_of)
            return
        # row-major nonzero, then a stable sort by column: twice as fast as nonzero on the transpose
        rows, cols = candidate.nonzero(as_tuple=True)  # [c] each, sorted by row then column
        by_column = cols.argsort(stable=True)
        rows, cols = rows[by_column], cols[by_column]  # sorted by column then row
        rank = torch.arange(cols.numel(), device=x.device) - (per_column.cumsum(0) - per_column)[cols]  # [c]
        values = torch.full((m, x.shape[1]), -torch.inf, device=x.device)  # [m, H]
        values[rank, cols] = x[rows, cols]
        where = torch.full((m, x.shape[1]), -1, dtype=torch.long, device=x.device)  # [m, H]
        where[rank, cols] = positions[rows]
        self._keep_top(values, where, cols_of)

    def merge(self, other: TopK) -> None:
        self._keep_top(other.values, other.positions)

    def _keep_top(self, values: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor | None = None) -> None:
        """Keep the K largest of (kept + new) per column, ties broken by the smaller position;
        values, positions [n, D], or [n, H] for the columns `columns` [H] alone.

        torch.topk breaks ties arbitrarily, so which of equal values (a token in identical contexts,
        such as BOS at position 0 of every window) is kept would depend on how the corpus was cut
        into batches and shards. Ties are rare: topk answers for the columns without one, and for the
        others a stable sort by (value descending, position ascending) of the few candidates at or
        above the K-th value; then a pass, its shards merged in any order, and any batch size keep
        the same positions.
        """
        kept_values = self.values if columns is None else self.values[:, columns]  # [K, D or H]
        kept_positions = self.positions if columns is None else self.positions[:, columns]
        cand_values = torch.cat([kept_values, values])  # [K + n, D or H]
        cand_positions = torch.cat([kept_positions, positions])  # [K + n, D or H]
        top = cand_values.topk(min(self.k + 1, len(cand_values)), dim=0)  # [K + 1, D or H] descending
        # a tie changes what is kept, or its order, only if two of the K + 1 largest are equal
        tied = (top.values[1:] == top.values[:-1]).any(0).nonzero().squeeze(1)  # [T] columns
        indices = top.indices[: self.k]  # [K, D or H]
        if len(tied):
            values_t = cand_values[:, tied]  # [K + n, T]
            kth = top.values[self.k - 1, tied]  # [T]
            m = int((values_t >= kth).sum(0).max())  # every value tied with the K-th is among the m largest
            near = values_t.topk(m, dim=0)  # [m, T]
            near_positions = cand_positions[:, tied].gather(0, near.indices)  # [m, T]
            by_position = near_positions.argsort(dim=0, stable=True)
            order = near.values.gather(0, by_position).argsort(dim=0, descending=True, stable=True)[: self.k]
            indices = indices.clone()
            indices[:, tied] = near.indices.gather(0, by_position.gather(0, order))
        if columns is None:
            self.values = cand_values.gather(0, indices)
            self.positions = cand_positions.gather(0, indices)
        else:
            self.values[:, columns] = cand_values.gather(0, indices)
            self.positions[:, columns] = cand_positions.gather(0, indices)

    def state_dict(self, prefix: str | None = None) -> State:
        p = prefix or self.prefix
        # [D, K]: one row per neuron reads more naturally downstream.
        return {f"{p}_values": self.values.T.contiguous(), f"{p}_positions": self.positions.T.contiguous()}

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> TopK:
        p = prefix or cls.prefix
        values = state[f"{p}_values"]  # [D, K]
        stat = cls(values.shape[1], values.shape[0], values.device)
        stat.values = values.T.float().contiguous()
        stat.positions = state[f"{p}_positions"].T.long().contiguous()
        return stat


class Moments(Stat):
    """Count, mean, central moments M2..M4, min, max and positive fraction per column.

    Batches are combined with the pairwise update of Pébay (2008), which stays accurate where
    raw power sums lose precision (kurtosis of large-mean activations).
    """

    prefix = "act"

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
        d = x - mean  # [N, D]
        d2 = d * d  # [N, D]
        batch = Moments.__new__(Moments)
        batch.n, batch.mean = n, mean.double()
        batch.m2 = d2.sum(0).double()
        batch.m3 = d.mul_(d2).sum(0).double()  # d becomes d^3, d2 d^4: two [N, D] buffers, not four
        batch.m4 = d2.mul_(d2).sum(0).double()
        batch.positive = count_true(x > 0).double()
        # amin and amax apart: aminmax over dim 0 is 8x slower on CPU (a [2032, 1536] batch: 8 ms)
        batch.min, batch.max = x.amin(0).double(), x.amax(0).double()
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

    def state_dict(self, prefix: str | None = None) -> State:
        p = prefix or self.prefix
        var = self.m2 / self.n
        safe_var = var.clamp_min(1e-30)
        return {
            f"{p}_count": torch.tensor(self.n),
            f"{p}_mean": self.mean.float(),
            f"{p}_var": var.float(),
            f"{p}_skew": ((self.m3 / self.n) / safe_var**1.5).float(),
            f"{p}_kurt": ((self.m4 / self.n) / safe_var**2).float(),  # raw, Gaussian = 3
            f"{p}_min": self.min.float(),
            f"{p}_max": self.max.float(),
            f"{p}_frac_positive": (self.positive / self.n).float(),
        }

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> Moments:
        p = prefix or cls.prefix
        mean = state[f"{p}_mean"].double()  # [D]
        stat = cls(mean.shape[0], mean.device)
        n = int(state[f"{p}_count"])
        if n == 0:
            return stat
        var = state[f"{p}_var"].double()
        safe_var = var.clamp_min(1e-30)  # the clamp state_dict divided by
        stat.n, stat.mean, stat.m2 = n, mean, var * n
        stat.m3 = state[f"{p}_skew"].double() * safe_var**1.5 * n
        stat.m4 = state[f"{p}_kurt"].double() * safe_var**2 * n
        # a count stored as a float32 fraction: exact while n < 2**23
        stat.positive = (state[f"{p}_frac_positive"].double() * n).round()
        stat.min, stat.max = state[f"{p}_min"].double(), state[f"{p}_max"].double()
        return stat


class Histogram(Stat):
    """Histogram per column on evenly spaced edges, with an underflow and an overflow bin.

    Bin b (1..B) holds edges[b-1] <= x < edges[b]; bin 0 is below edges[0], bin B+1 at or above
    edges[-1]. Even spacing lets the bin be computed arithmetically, faster than a binary search
    over the edges. Rounding can put a value one bin off only when its position lies within a few
    float32 units of an edge: those few values (the `near` margin, far wider than the rounding)
    are compared with their bin's own edges and corrected, so the counts are exactly those of
    `torch.bucketize(x, edges, right=True)` at a quarter of the cost of checking every value.
    """

    prefix = "hist"

    def __init__(self, edges: torch.Tensor, width: int, device: torch.device | str = "cpu"):
        self.edges = edges.to(device=device, dtype=torch.float32)  # [B + 1]
        n_inner = edges.numel() - 1
        self.n_bins = n_inner + 2  # B inner bins + under + over
        self.low, self.high = float(edges[0]), float(edges[-1])
        self.scale = n_inner / (self.high - self.low)
        self.counts = torch.zeros(width, self.n_bins, dtype=torch.long, device=device)  # [D, B + 2]
        self._offsets = (torch.arange(width, device=device) * self.n_bins).int()  # [D]
        inf = torch.tensor([torch.inf], device=device)
        self._bounds = torch.cat([-inf, self.edges, inf])  # [B + 3]: bin b is [bounds[b], bounds[b+1])
        # A position's float32 error, in bins: the subtraction, the float32 scale, the product and
        # the + 1 each round by <= 2^-24 of values <= B + 1 bins, and linspace's float32 edges lie
        # within a couple of units of max|edge| of their grid points (scale * max|edge| * 2^-23
        # bins): <= 2^-22 * (B + 1 + scale * max|edge|) in all. The margin is 4x that (2.9e-4 bins
        # for 200 bins on [-10, 10]): activations crowd around 0, an edge, so a wide margin is paid
        # for (at 4e-3 bins, 4.6% of a SmolLM2 layer-0 batch was "near", and fixing them cost more
        # than the histogram itself).
        widest = max(abs(self.low), abs(self.high))
        self._near = min(0.25, 2**-20 * (self.n_bins + self.scale * widest))

    def add(self, acts: torch.Tensor) -> None:
        x = acts.float()  # [N, D]
        position = (x - self.low).mul_(self.scale).add_(1.0).clamp_(0.0, self.n_bins - 1.0)
        floor = position.floor()
        frac = position.sub_(floor)
        near = (frac.sub_(0.5).abs_() > 0.5 - self._near).view(-1).nonzero().squeeze(1)  # [n_near]
        bins = floor.view(-1).int()  # [N * D]
        if near.numel():
            value, b = x.reshape(-1)[near], bins[near].long()
            b -= (value < self._bounds[b]).long()
            b += (value >= self._bounds[b + 1]).long()
            bins[near] = b.int()
        flat = (bins.view(x.shape) + self._offsets).view(-1)
        self.counts.view(-1).add_(torch.bincount(flat, minlength=self.counts.numel()))

    def merge(self, other: Histogram) -> None:
        if not torch.equal(self.edges.cpu(), other.edges.cpu()):
            raise ValueError("cannot merge histograms over different edges")
        self.counts += other.counts

    def state_dict(self, prefix: str | None = None) -> State:
        p = prefix or self.prefix
        return {f"{p}_edges": self.edges, f"{p}_counts": self.counts}

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> Histogram:
        p = prefix or cls.prefix
        counts = state[f"{p}_counts"]  # [D, B + 2]
        stat = cls(state[f"{p}_edges"], counts.shape[0], counts.device)
        stat.counts = counts.long().clone()
        return stat
