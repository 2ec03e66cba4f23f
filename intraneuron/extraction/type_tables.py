"""Tables keyed by token type (or by token type and corpus half): streaming, mergeable, sized by
the keys that occur rather than by the vocabulary (the Stat protocol of extraction/reducers.py).

Shapes: N = tokens in a batch, D = columns (neurons, or model width), R = rows (keys) of a table,
U_b = distinct keys in a batch, T = token types seen, F = fold keys.
"""

from __future__ import annotations

import torch

from intraneuron.extraction.reducers import Stat, State
from intraneuron.extraction.table_export import export_in_place, zeroed

BLOCK_BYTES = 64 * 2**20  # the float64 temporaries of exporting or rebuilding a table, at most
DERIVE_BYTES = 16 * 2**20  # the fold rows one column block of the derived per-type table reads


class TokenTypeTable(Stat):
    """Per key (a token type, or a token type and a corpus half): occurrence count, activation sum
    (float64) and max, for every column.

    Rows are keyed by a sorted set of keys, not by the vocabulary: the engine passes the keys that
    occur in its windows (known before the pass, extraction/types.py), so a table is sized by the
    corpus (21k of SmolLM2's 49k types on the default corpus), and an int builds the dense 0..n-1
    key set. A key outside the set grows the table; a merge takes the union of the two key sets.

    A batch is first reduced to its unique keys in a float32 buffer [U_b, D] (one index_add and one
    scatter max over the batch), then added to the float64 rows of those keys. Error bound: a key
    seen n_b times in a batch has its batch sum rounded to float32 with error at most
    (n_b - 1) * 2^-24 * sum|x| (recursive summation), i.e. relative to the sum of magnitudes about
    1e-7 per batch for the few hundred repeats a batch of 2k tokens holds; across batches the sum is
    float64. The exported mean is float32 anyway (relative rounding 6e-8), so the table is as exact
    as what it exports to within a few units in the last place.
    """

    prefix = "type"

    def __init__(
        self, keys: int | torch.Tensor, width: int, device: torch.device | str = "cpu", track_max: bool = True
    ):
        self.keys = (torch.arange(keys) if isinstance(keys, int) else torch.unique(keys.long())).to(device)  # [R]
        rows = self.keys.numel()
        self.count = torch.zeros(rows, dtype=torch.long, device=device)  # [R]
        self.sum, self._mapping = zeroed(rows, width, torch.float64, device)  # [R, D]
        self._exported: tuple[State, State | None] | None = None  # export_in_place's, once exported
        self.max = torch.full((rows, width), -torch.inf, device=device) if track_max else None  # [R, D]

    def add(self, acts: torch.Tensor, keys: torch.Tensor) -> None:
        """acts [N, D]; keys [N] (token ids, or the fold keys token_id * 2 + half)."""
        unique, inverse = torch.unique(keys, return_inverse=True)  # [U_b], [N]
        x = acts.float()
        batch_sum = torch.zeros(unique.numel(), x.shape[1], device=x.device).index_add_(0, inverse, x)  # [U_b, D]
        batch_count = torch.bincount(inverse, minlength=unique.numel())  # [U_b]
        rows = self.rows(unique.to(self.keys.device))  # [U_b] distinct
        self.count.index_add_(0, rows, batch_count.to(self.count.device))
        self.sum.index_add_(0, rows, batch_sum.to(self.sum.device, torch.float64))
        if self.max is not None:
            batch_max = torch.full_like(batch_sum, -torch.inf).scatter_reduce_(
                0, inverse[:, None].expand_as(x), x, reduce="amax", include_self=True
            )  # [U_b, D]
            self.max[rows] = torch.maximum(self.max[rows], batch_max.to(self.max.device))

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        """The rows of `keys` [n] (any order), growing the table by the keys it does not hold."""
        if self.keys.numel():
            at = torch.searchsorted(self.keys, keys).clamp_max(self.keys.numel() - 1)
            if bool((self.keys[at] == keys).all()):
                return at
        self._grow(keys)
        return torch.searchsorted(self.keys, keys)

    def merge(self, other: TokenTypeTable) -> None:
        if (self.max is None) != (other.max is None):
            raise ValueError("cannot merge a table that tracks the per-type max with one that does not")
        rows = self.rows(other.keys.to(self.keys.device))
        self.count.index_add_(0, rows, other.count.to(self.count.device))
        self.sum.index_add_(0, rows, other.sum.to(self.sum.device))
        if self.max is not None:
            self.max[rows] = torch.maximum(self.max[rows], other.max.to(self.max.device))

    def _grow(self, keys: torch.Tensor) -> None:
        """Add rows for `keys` not held yet (the key set stays sorted)."""
        union = torch.unique(torch.cat([self.keys, keys.to(self.keys.device)]))
        if union.numel() == self.keys.numel():
            return
        old = torch.searchsorted(union, self.keys)  # where the held rows go
        count = self.count.new_zeros(union.numel())
        count[old] = self.count
        total, self._mapping = zeroed(union.numel(), self.sum.shape[1], torch.float64, self.sum.device)
        total[old] = self.sum
        if self.max is not None:
            peak = self.max.new_full((union.numel(), self.max.shape[1]), -torch.inf)
            peak[old] = self.max
            self.max = peak
        self.keys, self.count, self.sum = union, count, total

    def state_dict(self, prefix: str | None = None) -> State:
        """Observed keys only: `{p}_ids` [T], `{p}_count` [T], `{p}_mean` [T, D], `{p}_max` [T, D].

        Means are computed block by block (no float64 copy of the table), and when every row was
        seen (the engine's tables: keys read off the windows) `{p}_max` is the table's own tensor,
        as nn.Module.state_dict shares its parameters: clone it before adding more batches."""
        p = prefix or self.prefix
        seen = self.count.nonzero().squeeze(1)
        every = seen.numel() == self.count.numel()
        count = self.count if every else self.count[seen]
        mean = torch.empty(count.numel(), self.sum.shape[1], device=self.sum.device)  # [T, D] float32
        for block in row_blocks(count.numel(), self.sum.shape[1]):
            rows = block if every else seen[block]
            mean[block] = (self.sum[rows] / count[block, None]).float()
        out = {f"{p}_ids": self.keys if every else self.keys[seen], f"{p}_count": count, f"{p}_mean": mean}
        if self.max is not None:
            out[f"{p}_max"] = self.max if every else self.max[seen]
        return out

    def export(self, prefix: str | None = None) -> State:
        """`state_dict(prefix)` at the end of a pass: on the host, the means are written over the
        sums (extraction/table_export.py) and the table must not be used after."""
        exported = self.export_tables(derive_types=False)
        if exported is None:
            return self.state_dict(prefix)
        p = prefix or self.prefix
        return {f"{p}_{name}": tensor for name, tensor in exported[0].items()}

    def export_tables(self, derive_types: bool) -> tuple[State, State | None] | None:
        """(this table's {ids, count, mean[, max]}, the derived per-type table's when `derive_types`),
        exported in place once; None when it cannot be (off the host, or rows never seen)."""
        if self._exported is None:
            if self._mapping is None or not bool((self.count > 0).all()):
                return None
            self._exported = export_in_place(self.keys, self.count, self.sum, self._mapping, self.max, derive_types)
            self.sum = self._mapping = None
        if derive_types and self._exported[1] is None:
            raise RuntimeError("the fold table was exported before the per-type table derived from it")
        return self._exported

    @classmethod
    def load_state_dict(
        cls, state: State, prefix: str | None = None, vocab_size: int | None = None
    ) -> TokenTypeTable:
        """Rebuild, keyed by the saved ids (or densely by 0..vocab_size-1 when it is given)."""
        p = prefix or cls.prefix
        ids, count, mean = state[f"{p}_ids"].long(), state[f"{p}_count"].long(), state[f"{p}_mean"]
        stat = cls(vocab_size if vocab_size is not None else ids, mean.shape[1], mean.device,
                   track_max=f"{p}_max" in state)  # fmt: skip
        rows = stat.rows(ids)
        stat.count[rows] = count
        for block in row_blocks(ids.numel(), mean.shape[1]):
            stat.sum[rows[block]] = mean[block].double() * count[block, None]
        if stat.max is not None:
            stat.max[rows] = state[f"{p}_max"].float()
        return stat


def row_blocks(n_rows: int, width: int) -> list[slice]:
    """Slices of at most BLOCK_BYTES of float64 rows of `width`: temporaries of table-wide
    arithmetic stay that small instead of the table's size."""
    step = max(1, BLOCK_BYTES // (8 * max(width, 1)))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class TypesFromFolds(Stat):
    """The per-type table derived from the per-half (fold) table, whose keys are token_id * 2 + half:
    a type's count and sum are its two halves' sums and its max their max, so one table is kept and
    filled, not two. `add` and `merge` do nothing: the fold table they derive from is fed and merged
    (CombinedStat routes the batches to it)."""

    prefix = "type"

    def __init__(self, folds: TokenTypeTable):
        self.folds = folds

    def add(self, *args: torch.Tensor) -> None:
        pass  # the fold table took this batch

    def merge(self, other: TypesFromFolds) -> None:
        pass  # the fold tables merge

    def state_dict(self, prefix: str | None = None) -> State:
        """What a TokenTypeTable over token ids would export, computed from the fold table block
        by block of columns (no float64 per-type table is ever whole)."""
        p = prefix or self.prefix
        folds = self.folds
        types, row = torch.unique(folds.keys // 2, return_inverse=True)  # [T'], [F]
        count = torch.zeros(types.numel(), dtype=torch.long, device=row.device).index_add_(0, row, folds.count)
        seen = count.nonzero().squeeze(1)  # [T]
        every = seen.numel() == types.numel()
        width = folds.sum.shape[1]
        mean = torch.empty(seen.numel(), width, device=folds.sum.device)  # [T, D] float32
        peak = torch.empty_like(mean) if folds.max is not None else None
        # small column blocks: a block's float64 sums, its fold rows and the division are the only
        # temporaries, at the end of the pass, when the tables are at their largest
        step = max(1, DERIVE_BYTES // (8 * max(folds.sum.shape[0], 1)))  # columns per block
        block = torch.empty(types.numel(), min(step, width), dtype=torch.float64, device=mean.device)
        for start in range(0, width, step):
            cols = slice(start, min(start + step, width))
            part = block[:, : cols.stop - start].zero_().index_add_(0, row, folds.sum[:, cols])  # [T', c]
            mean[:, cols] = part.div_(count[:, None]) if every else part[seen] / count[seen, None]
            if peak is not None:
                top = part.float().fill_(-torch.inf)
                top.scatter_reduce_(0, row[:, None].expand(-1, cols.stop - start), folds.max[:, cols], reduce="amax")
                peak[:, cols] = top if every else top[seen]
        out = {f"{p}_ids": types[seen], f"{p}_count": count[seen], f"{p}_mean": mean}
        if peak is not None:
            out[f"{p}_max"] = peak
        return out

    def export(self, prefix: str | None = None) -> State:
        """`state_dict(prefix)` at the end of a pass, derived while the fold table is exported in
        place (CombinedStat.export exports this first)."""
        exported = self.folds.export_tables(derive_types=True)
        if exported is None:
            return self.state_dict(prefix)
        p = prefix or self.prefix
        return {f"{p}_{name}": tensor for name, tensor in exported[1].items()}

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None) -> TypesFromFolds:
        raise TypeError("TypesFromFolds is rebuilt from its fold table (CombinedStat.load_state_dict)")
