"""Streaming Pearson correlation between the neurons of two models, and what is kept of it.

Gurnee et al. (2024, "Universal Neurons") correlate every neuron of model A with every neuron of
model B over the same tokens, keep per neuron of A its best partner's correlation, and compare
that with the same maximum after B's activations are mixed by a random unit-norm-row matrix
(the rotation baseline). This module holds the pieces that do not depend on a model:

- `StreamingCorrelation`: a mergeable `Stat` over row batches (rows = tokens) of A [N, Da] and
  B [N, Db]. Unlike the authors' raw power sums (sum ab - sum a sum b / n, which cancels badly
  when means are large against the spread), it keeps means, M2 and the co-moment in float64 and
  merges each batch's centred co-moment the Chan et al. way. The batch product is one matmul.
- `summarise` / `merge_summaries`: per neuron of A, the top-k partners, mergeable across column
  blocks and layers of B, so the full [L*Da, L*Db] matrix is never held.
- `rotation`: the baseline matrix, seeded and device-independent.
- `bytes_per_pair` / `working_bytes` / `plan_tiles`: which layer pairs can share one corpus pass.

Shapes: N = tokens in a batch, Da / Db = neurons of A / B (one layer or a block), K = top-k.
"""

from __future__ import annotations

import math
from typing import Self

import torch

from intraneuron.extraction.reducers import Stat, State

F64 = torch.float64


class StreamingCorrelation(Stat):
    """Pearson correlation of every column of A with every column of B, over row batches.

    State (all float64, so shards merge without loss): count n, per column mean and M2 (sum of
    squared deviations), and the co-moment C[i, j] = sum_t (a_ti - mean_i)(b_tj - mean_j).

    `batch_dtype` is the dtype of the per-batch matmul. float32 (default) is 1.5-2.5x faster
    than float64 on CPU (benchmarks/correlation.py) and far faster on GPUs; it multiplies data
    centred near the mean, so its error does not grow with the mean: ~1e-7 absolute in r beyond
    what float32 storage of the inputs already lost (tests: mean 100, std 0.01). Under TF32 matmuls
    (`torch.backends.cuda.matmul.allow_tf32`, float32_matmul_precision "high") expect ~1e-3;
    use float64 when that matters. float64 agrees with numpy to ~1e-13.
    """

    prefix = "corr"

    def __init__(
        self, d_a: int, d_b: int, device: torch.device | str = "cpu", batch_dtype: torch.dtype = torch.float32
    ):
        self.device = torch.device(device)
        self.batch_dtype = batch_dtype
        self.n = 0
        self.a = _Columns(d_a, self.device)
        self.b = _Columns(d_b, self.device)
        self.comoment = torch.zeros(d_a, d_b, dtype=F64, device=self.device)  # [Da, Db]

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [N, Da], b [N, Db]: the same N tokens, row for row."""
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a has {a.shape[0]} rows and b {b.shape[0]}: rows must be the same tokens")
        if (a.shape[1], b.shape[1]) != tuple(self.comoment.shape):
            raise ValueError(f"expected [N, {self.comoment.shape[0]}] and [N, {self.comoment.shape[1]}], "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        n = a.shape[0]
        if n == 0:
            return
        # centre on the running mean (one pass fewer than the batch's own mean; activations are
        # near-stationary over a corpus, so the batch sits within a few std of it)
        centre_a, centre_b = (self.a.mean, self.b.mean) if self.n else (None, None)
        xa, resid_a, batch_a = _centre(a.to(self.device), self.batch_dtype, centre_a)  # [N, Da], [Da]
        xb, resid_b, batch_b = _centre(b.to(self.device), self.batch_dtype, centre_b)  # [N, Db], [Db]
        if xa.dtype == F64:
            self.comoment.addmm_(xa.T, xb)  # the batch's one matmul, straight into the sum
        else:
            # the batch's one matmul. On CPU the mixed-dtype add makes a float64 copy of the
            # product (see working_bytes); adding it in row chunks avoided that but ran ~10x slower.
            self.comoment += xa.T @ xb  # [Da, Db]
        # Two rank-one terms in one pass over C: xa, xb are centred on a shift, not on the batch
        # mean, so the co-moment about the batch mean is xa^T xb - n resid_a resid_b^T (exact);
        # Chan's merge then adds (na n / total) delta_a delta_b^T between the two means.
        na, total = self.n, self.n + n
        left = torch.stack([resid_a * -n, (batch_a.mean - self.a.mean) * (na * n / total)], dim=1)  # [Da, 2]
        right = torch.stack([resid_b, batch_b.mean - self.b.mean])  # [2, Db]
        self.comoment.addmm_(left, right)
        self.a.merge(batch_a, na, n)
        self.b.merge(batch_b, na, n)
        self.n = total

    def merge(self, other: StreamingCorrelation) -> None:
        if other.comoment.shape != self.comoment.shape:
            raise ValueError(f"cannot merge {tuple(other.comoment.shape)} into {tuple(self.comoment.shape)}")
        na, nb = self.n, other.n
        if nb == 0:
            return
        total = na + nb
        delta_a = other.a.mean.to(self.device) - self.a.mean  # [Da]
        delta_b = other.b.mean.to(self.device) - self.b.mean  # [Db]
        self.comoment += other.comoment.to(self.device)
        self.comoment.addr_(delta_a, delta_b, alpha=na * nb / total)
        self.a.merge(other.a, na, nb)
        self.b.merge(other.b, na, nb)
        self.n = total

    def correlation(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[Da, Db] Pearson r in [-1, 1]; NaN in every row or column whose neuron never varied."""
        inv_a, inv_b = self.a.inv_scale(), self.b.inv_scale()  # [Da], [Db]: NaN where constant
        # one float64 [Da, Db] temporary besides the result
        return (self.comoment * inv_a[:, None]).mul_(inv_b).clamp_(-1.0, 1.0).to(dtype)

    def state_dict(self, prefix: str | None = None) -> State:
        """float64 throughout (the reducers' float32 export would lose precision over merges)."""
        p = prefix or self.prefix
        return {f"{p}_count": torch.tensor(self.n), f"{p}_comoment": self.comoment,
                **self.a.state(f"{p}_a"), **self.b.state(f"{p}_b")}

    @classmethod
    def load_state_dict(cls, state: State, prefix: str | None = None, batch_dtype: torch.dtype = torch.float32) -> Self:
        p = prefix or cls.prefix
        comoment = state[f"{p}_comoment"]
        stat = cls(comoment.shape[0], comoment.shape[1], comoment.device, batch_dtype)
        stat.n = int(state[f"{p}_count"])
        stat.comoment = comoment.to(F64).clone()
        stat.a = _Columns.load(state, f"{p}_a")
        stat.b = _Columns.load(state, f"{p}_b")
        return stat


class _Columns:
    """Per column of one side: mean and M2 (float64 [D] each)."""

    def __init__(self, width: int, device: torch.device):
        self.mean = torch.zeros(width, dtype=F64, device=device)
        self.m2 = torch.zeros(width, dtype=F64, device=device)

    def merge(self, o: _Columns, na: int, nb: int) -> None:
        """Chan et al.'s pairwise update; na, nb are the two sides' row counts."""
        total = na + nb
        delta = o.mean.to(self.mean.device) - self.mean
        self.m2 = self.m2 + o.m2.to(self.m2.device) + delta * delta * (na * nb / total)
        self.mean = self.mean + delta * (nb / total)

    def inv_scale(self) -> torch.Tensor:
        """1 / sqrt(M2), NaN for a constant column. M2 of a constant is exactly 0: each batch
        makes it so (_centre), and Chan's merge then adds delta = 0."""
        return torch.where(self.m2 > 0, self.m2.rsqrt(), torch.nan)

    def state(self, p: str) -> State:
        return {f"{p}_mean": self.mean, f"{p}_m2": self.m2}

    @classmethod
    def load(cls, state: State, p: str) -> _Columns:
        cols = cls.__new__(cls)
        cols.mean, cols.m2 = (state[f"{p}_{k}"].to(F64).clone() for k in ("mean", "m2"))
        return cols


def _centre(
    x: torch.Tensor, dtype: torch.dtype, centre: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, _Columns]:
    """x [N, D] -> (x - shift in dtype [N, D], mean - shift [D] float64, the batch's _Columns).

    The shift is `centre` [D] (the running mean) or else the batch mean, rounded to `dtype`. The
    subtraction runs in the wider of x's dtype and `dtype`, then casts: float32 data minus a
    nearby float32 shift is exact (Sterbenz), and float64 data keeps the digits below float32's
    ulp of the mean. The mean and M2 then come from sums over the centred data, so the mean is
    known to float64 well below float32's ulp of it (Chan's between-batch term squares mean
    differences of order std / sqrt(N), which a float32 mean, off by up to ulp/2 = 4e-6 at a
    mean of 100, would spoil against a std of 0.01).
    """
    n = x.shape[0]
    wide = x if x.dtype == F64 else x.to(dtype)
    shift = (wide.mean(0) if centre is None else centre).to(dtype)  # [D]
    centred = (wide - shift.to(wide.dtype)).to(dtype)  # [N, D]
    # Plain sums, not var_mean: on CPU Welford's update is ~20x slower than these two passes.
    resid = centred.sum(0).to(F64) / n  # [D] mean - shift
    squares = (centred * centred).sum(0).to(F64)  # [D]
    m2 = squares - n * resid * resid
    # A constant column must give M2 = 0 and the same mean in every batch, exactly (that is how
    # a dead neuron is told apart), but the sums above leave rounding residues ~1e-7 * squares.
    # Centring on the mean makes m2 ~ squares for any column that varies at float32's
    # resolution, so the few columns where it cancels (m2 < 1e-3 squares) are redone with
    # Welford in float64 (var_mean), which is exact for a constant: M2 = 0, mean = the value.
    suspect = (m2 < 1e-3 * squares).nonzero().squeeze(1)  # [S], usually empty or the dead ones
    if suspect.numel():
        var, mean = torch.var_mean(wide[:, suspect].to(F64), dim=0, correction=0)  # [S], [S]
        m2[suspect] = var * n
        resid[suspect] = mean - shift[suspect].to(F64)  # shift + resid == mean, exactly
    cols = _Columns.__new__(_Columns)
    cols.mean, cols.m2 = shift.to(F64) + resid, m2
    return centred, resid, cols


# --- summaries: what is kept per neuron of A ---------------------------------------------------


def summarise(corr: torch.Tensor, top_k: int, offset: int = 0) -> dict[str, torch.Tensor]:
    """Per row of corr [Da, Db] (neuron of A): its top_k largest (signed) correlations.

    Returns `max_corr` [Da], `partner` [Da] (long), `top_corr` [Da, K], `top_partner` [Da, K]
    (long), sorted descending. Partners are column index + `offset` (so a block of B's columns,
    or a layer, can report global indices). NaN entries (a dead neuron) are never chosen; a slot
    with no finite candidate is NaN with partner -1, so an all-NaN row gives max_corr NaN and
    partner -1. K is exactly top_k even when Db < top_k (padded the same way).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, corr.shape[1])
    values, index = corr.nan_to_num(nan=-math.inf).topk(k, dim=1)  # [Da, k]
    return _finish(values, index + offset, top_k)


def merge_summaries(s1: dict[str, torch.Tensor], s2: dict[str, torch.Tensor], offset2: int = 0) -> dict[str, torch.Tensor]:
    """The summary over the union of two column sets, for the same rows of A.

    s1's partners are taken as already global; s2's get `offset2` added (its block's first global
    column), so `merge_summaries(acc, summarise(block, k), start)` folds in one block at a time.
    Equal to summarising the concatenated matrix, up to the order of exact ties.
    """
    top_k = s1["top_corr"].shape[1]
    if s2["top_corr"].shape != s1["top_corr"].shape:
        raise ValueError(f"summaries differ in shape: {tuple(s1['top_corr'].shape)} vs {tuple(s2['top_corr'].shape)}")
    p2 = s2["top_partner"]
    p2 = torch.where(p2 >= 0, p2 + offset2, p2)
    values = torch.cat([s1["top_corr"], s2["top_corr"]], dim=1).nan_to_num(nan=-math.inf)  # [Da, 2K]
    partners = torch.cat([s1["top_partner"], p2], dim=1)  # [Da, 2K]
    top, idx = values.topk(top_k, dim=1)
    return _finish(top, partners.gather(1, idx), top_k)


def _finish(values: torch.Tensor, partners: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """values [Da, k] with -inf for 'nothing', partners [Da, k] -> the summary dict padded to K."""
    empty = values == -math.inf
    values = values.masked_fill(empty, math.nan)
    partners = partners.masked_fill(empty, -1)
    pad = top_k - values.shape[1]
    if pad > 0:
        values = torch.cat([values, values.new_full((values.shape[0], pad), math.nan)], dim=1)
        partners = torch.cat([partners, partners.new_full((partners.shape[0], pad), -1)], dim=1)
    return {"max_corr": values[:, 0].clone(), "partner": partners[:, 0].clone(),
            "top_corr": values, "top_partner": partners}


# --- the rotation baseline ---------------------------------------------------------------------


def rotation(
    d: int, seed: int, orthogonal: bool = False, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """R [d, d] for the baseline: apply as `b @ R.T`, so new neuron i = sum_j R[i, j] b_j.

    Default: the authors' baseline, a Gaussian matrix with rows scaled to unit norm and *not*
    orthogonalised (their code marks that as unfinished). `orthogonal=True`: a Haar-random
    orthogonal matrix (QR with the sign of R's diagonal folded in), a sensitivity check.
    Drawn in float64 on CPU from a seeded torch.Generator, then cast and moved, so one seed
    gives the same matrix on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=gen, dtype=F64)  # [d, d]
    if orthogonal:
        q, r = torch.linalg.qr(m)
        # sign fix: without it Q is not Haar-distributed (QR's sign convention biases it)
        out = q * torch.sign(torch.diagonal(r))[None, :]
    else:
        out = m / m.norm(dim=1, keepdim=True)
    return out.to(dtype=dtype, device=device)


# --- memory planning ---------------------------------------------------------------------------


def bytes_per_pair(d_a: int, d_b: int) -> int:
    """Persistent bytes of one StreamingCorrelation: the float64 co-moment [Da, Db] and two
    float64 vectors (mean, M2) per side."""
    return 8 * d_a * d_b + 2 * 8 * (d_a + d_b)


def working_bytes(d_a: int, d_b: int, n_rows: int, batch_itemsize: int = 4) -> int:
    """An upper bound on the transient bytes of one `add` of n_rows rows, for inputs already in
    the batch dtype: the centred copies [N, Da] + [N, Db] and the product [Da, Db] in the batch
    dtype, the product's float64 copy on CPU (when the batch dtype is not float64), and [D]
    scratch. Pairs are added one after another, so a pass reserves this once."""
    product_copy = 8 * d_a * d_b if batch_itemsize != 8 else 0
    return batch_itemsize * (n_rows * (d_a + d_b) + d_a * d_b) + product_copy + 8 * 8 * (d_a + d_b)


def plan_tiles(
    pairs: list[tuple[int, int]], d_a: int, d_b: int, memory_bytes: int, reserve_bytes: int = 0
) -> list[list[tuple[int, int]]]:
    """Group layer pairs (la, lb) into passes whose accumulators fit in memory_bytes.

    Every pair costs `bytes_per_pair(d_a, d_b)`; `reserve_bytes` (e.g. `working_bytes(...)`) is
    set aside once per pass. All pairs cost the same, so filling passes in the given order gives
    the fewest passes; order pairs by layer to keep each pass's forward short (early exit).
    Each pair appears in exactly one pass. Raises ValueError if one pair does not fit.
    The bound is on the stat's own tensors: leave headroom for BLAS workspace (a few MB) and for
    the allocator, which under glibc's defaults can keep freed batch temporaries resident
    (benchmarks/correlation.py measures both).
    """
    if len(set(pairs)) != len(pairs):
        raise ValueError("pairs contain duplicates: each layer pair must be planned once")
    per_pair = bytes_per_pair(d_a, d_b)
    capacity = (memory_bytes - reserve_bytes) // per_pair
    if capacity < 1:
        raise ValueError(
            f"memory bound {memory_bytes:,} bytes cannot hold one layer pair: it needs at least "
            f"{per_pair + reserve_bytes:,} bytes ({per_pair:,} for the accumulators of a "
            f"{d_a} x {d_b} pair + {reserve_bytes:,} reserved); raise the bound or split the "
            f"neurons into blocks")
    return [list(pairs[i : i + capacity]) for i in range(0, len(pairs), capacity)]
