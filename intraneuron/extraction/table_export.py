"""Exporting a pass's type tables without ever holding their float64 sums and float32 means at once.

On the host a type table's sums sit on an anonymous memory mapping of their own (`zeroed`: pages
are allotted as rows are touched, unmapped when the last tensor on them goes). At the end of the
pass, `export_in_place` walks the rows in order, block by block: it writes each block's float32
means over the front of the same mapping, writes the per-type means derived from a per-half table
to a mapping of their own, and hands the float64 pages it has consumed back to the OS. Writing in
place is safe because float32 rows [a, b) occupy the bytes of float64 rows [a/2, b/2), which have
been read by the time block [a, b) is written. On the default corpus a SmolLM2 layer's per-half
sums are 441 MB; exporting them the plain way holds another 210 + 124 MB of means at the peak of
the pass, this way a block.

Shapes: R = rows (keys) of a table, D = columns, T = token types, F = (type, half) keys.
"""

from __future__ import annotations

import mmap

import torch

State = dict[str, torch.Tensor]
EXPORT_BLOCK_BYTES = 16 * 2**20  # float64 rows read per block


def zeroed(rows: int, width: int, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zeroed [rows, width] tensor, and the private anonymous mapping it sits on when it is on the
    host (None elsewhere, or where the OS cannot take pages back: then a plain allocation)."""
    nbytes = rows * width * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0 or not hasattr(mmap.mmap, "madvise"):
        return torch.zeros(rows, width, dtype=dtype, device=device), None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: MADV_DONTNEED frees its pages
    return torch.frombuffer(mapping, dtype=dtype).view(rows, width), mapping


def release(mapping: mmap.mmap, start: int, stop: int) -> None:
    """Give the whole pages within bytes [start, stop) of the mapping back to the OS (they read as
    zeros if touched again)."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = min(stop, len(mapping)) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def export_in_place(
    keys: torch.Tensor, count: torch.Tensor, sums: torch.Tensor, mapping: mmap.mmap,
    maxima: torch.Tensor | None, derive_types: bool,
) -> tuple[State, State | None]:
    """The table's {ids, count, mean[, max]} (its float32 means over its sums, which are consumed)
    and, with `derive_types` (a per-half table: keys token_id * 2 + half), the per-type table's,
    whose counts and sums are the two halves' and maxima their max. Every row must have been seen.

    keys, count [R]; sums [R, D] float64 on `mapping`; maxima [R, D] or None.
    """
    rows, width = sums.shape
    means = sums.view(-1).view(torch.float32)[: rows * width].view(rows, width)  # [R, D] float32, in place
    table = {"ids": keys, "count": count, "mean": means}
    if maxima is not None:
        table["max"] = maxima
    if not derive_types:
        _walk(sums, count, means, mapping, None)
        return table, None
    types, row_type = torch.unique(keys // 2, return_inverse=True)  # [T], [R] non-decreasing: keys are sorted
    type_count = torch.zeros(types.numel(), dtype=torch.long).index_add_(0, row_type, count)  # [T]
    type_means, _ = zeroed(types.numel(), width, torch.float32, sums.device)  # [T, D]
    type_max = torch.empty(types.numel(), width) if maxima is not None else None  # [T, D]
    derived = (row_type, type_count, type_means, maxima, type_max)
    _walk(sums, count, means, mapping, derived)
    types_table = {"ids": types, "count": type_count, "mean": type_means}
    if type_max is not None:
        types_table["max"] = type_max
    return table, types_table


def _walk(sums, count, means, mapping, derived) -> None:
    """Blocks of rows in order (never splitting a type's two halves when deriving types): means
    written over the front, derived type rows written, consumed float64 pages released."""
    rows, width = sums.shape
    step = max(2, EXPORT_BLOCK_BYTES // (8 * max(width, 1)))
    start = 0
    while start < rows:
        stop = min(start + step, rows)
        if derived is not None and stop < rows and derived[0][stop] == derived[0][stop - 1]:
            stop += 1  # the type's other half joins this block
        block = sums[start:stop]  # [b, D] float64, a view: read in full before the writes below
        if derived is not None:
            row_type, type_count, type_means, maxima, type_max = derived
            first, last = int(row_type[start]), int(row_type[stop - 1]) + 1
            local = row_type[start:stop] - first  # [b]
            type_sums = torch.zeros(last - first, width, dtype=torch.float64).index_add_(0, local, block)
            type_means[first:last] = type_sums.div_(type_count[first:last, None])
            if type_max is not None:
                top = torch.full((last - first, width), -torch.inf)
                top.scatter_reduce_(0, local[:, None].expand(-1, width), maxima[start:stop], reduce="amax")
                type_max[first:last] = top
        means[start:stop] = (block / count[start:stop, None]).float()
        # float64 rows [0, stop) are read; the float32 front ends at row `stop`'s 4-byte offset
        release(mapping, 4 * stop * width, 8 * stop * width)
        start = stop
