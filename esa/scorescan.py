"""One read of a score buffer: everything selection and the tail statistics take from the whole buffer.

:func:`scan` streams a flat score view (float32, on its device) once, chunk by chunk, and keeps:

- per block of ``BLOCK`` consecutive elements (the last block may be shorter): its largest value and its smallest
  (with ``nonzero_min``: its smallest non-zero value, +inf for a block of zeros). :func:`block_select` takes the
  exact top-k / bottom-k from these and a gather of k blocks;
- the number of exact zeros, and whether every element is finite (block extrema propagate NaN and ±inf);
- with a ``shift``: the float64 power sums of :func:`esa.kernels.moments.power_sums` (mean, variance, skewness and
  kurtosis of the buffer, exact to float64 rounding).

On a GPU the whole scan is one Triton kernel (:func:`esa.kernels.blockscan.block_scan`: one read, the zeros and
non-finite values counted in the same pass, |S| of a signed metric taken as it reads, one host synchronisation).
On a CPU a chunk is ``CPU_CHUNK`` elements per thread of torch, small enough to stay in each core's cache: each
element comes from memory once and every later operation on it reads the cache (the float64 power sums cost about
1 ns per element on one core).
A CPU buffer of at least ``esa.kernels.moments.COMPILED_MIN_NUMEL`` elements takes its power sums and block
extrema from :func:`esa.kernels.moments.compiled_scan` instead (one fused compiled loop), all but its last partial
chunk.
With ``ESA_KERNELS=torch`` a GPU takes the CPU's form in chunks of ``GPU_CHUNK``. The result does not depend on
the chunk size or the path beyond float64 rounding.

Exactness of :func:`block_select`: let T be the k-th best value (ties broken by lower flat index). Every selected
element lies in a block whose extreme is at least as good as T; fewer than k blocks have an extreme strictly
better than T (each holds an element strictly better than T, and there are fewer than k of those), and the
selected elements equal to T are the earliest ones, in the earliest blocks whose extreme is T. So the best k blocks
by (extreme, block index) hold every selected element; kept in flat-index order, the exact selection among their
elements is the buffer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esa.kernels import topk
from esa.kernels.blockscan import BLOCK, block_scan
from esa.kernels.dispatch import backend_for
from esa.kernels.moments import PowerSums, central_moments, compiled_scan, power_sums, work_buffers

CPU_CHUNK = BLOCK << 9  # 131,072 elements (512 KiB of float32) per thread
GPU_CHUNK = BLOCK << 18  # 67,108,864 elements
BLOCK_SELECT_SHARE = 8  # block_select gathers at most 1/8 of a buffer (k blocks of BLOCK); else a full selection


@dataclass
class Scan:
    """What :func:`scan` keeps of one buffer of ``numel`` elements."""

    numel: int
    block_max: torch.Tensor  # per block, on the buffer's device
    block_min: torch.Tensor  # per block: smallest value, or smallest non-zero value (``nonzero_min``)
    zeros: int
    finite: bool
    shift: float | None = None
    sums: PowerSums | None = None

    def moments(self) -> tuple[float, float, float, float]:
        """(mean, m₂, m₃, m₄): :func:`esa.kernels.moments.central_moments` of the power sums."""
        if self.sums is None or self.shift is None:
            raise ValueError("scan() was called without a shift: no moments")
        return central_moments(self.sums, self.numel, self.shift)


def _chunk_elements(flat: torch.Tensor) -> int:
    return GPU_CHUNK if flat.is_cuda else CPU_CHUNK * torch.get_num_threads()


def scan(flat: torch.Tensor, *, shift: float | None = None, nonzero_min: bool = False, absolute: bool = False
         ) -> Scan:
    """Read ``flat`` (a float32 score view) once; see the module docstring. ``absolute``: scan |flat| (the ranking
    view of a signed metric), which a GPU never materialises (:func:`esa.kernels.blockscan.block_scan`).

    On a CPU, zeros are counted without a pass of their own: only a block whose extrema enclose 0 can hold one; a
    block whose extrema are both 0 holds nothing else, and only the few blocks that mix zeros with other values
    are read again (:func:`_count_zeros`)."""
    flat = flat.detach().reshape(-1)
    if backend_for(flat) == "triton":
        fused = block_scan(flat, shift=shift, absolute=absolute, nonzero_min=nonzero_min)
        return Scan(flat.numel(), fused.high, fused.low, fused.zeros, fused.nonfinite == 0, shift, fused.sums)
    if absolute:
        flat = flat.abs()
    n = flat.numel()
    compiled = compiled_scan(flat, shift, BLOCK) if shift is not None else None  # large buffers: one fused read
    done, sums, highs, lows = 0, (0.0, 0.0, 0.0, 0.0), [], []
    if compiled is not None:
        done, sums, high, low = compiled
        highs, lows = [high], [low]
    whole = n - n % BLOCK
    rows = flat[done:whole].view(-1, BLOCK)
    step = _chunk_elements(flat) // BLOCK
    parts = [rows[r : r + step] for r in range(0, rows.shape[0], step)]
    if whole < n:
        parts.append(flat[whole:].view(1, -1))  # the last, shorter block
    work = work_buffers(flat) if shift is not None and parts and not flat.is_cuda else None
    for part in parts:
        highs.append(part.amax(dim=1))
        lows.append(part.amin(dim=1))
        if shift is not None:
            sums = tuple(a + b for a, b in zip(sums, power_sums(part, shift, work)))
    high = torch.cat(highs) if highs else flat.new_empty(0)
    low = torch.cat(lows) if lows else flat.new_empty(0)
    finite = bool(torch.isfinite(high).all()) and bool(torch.isfinite(low).all())  # amax / amin propagate NaN
    finite = finite and (shift is None or math.isfinite(sums[0]))  # so does Σy
    zeros, low = _count_zeros(flat, high, low, nonzero_min) if finite else (0, low)
    return Scan(n, high, low, zeros, finite, shift, sums if shift is not None else None)


def _blocks(flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The elements of blocks ``ids`` (ascending) as rows of BLOCK, the last, shorter block padded with +inf."""
    n = flat.numel()
    whole = n - n % BLOCK
    full = ids[ids * BLOCK < whole]
    out = flat[:whole].view(-1, BLOCK).index_select(0, full)
    if full.numel() < ids.numel():
        last = torch.full((1, BLOCK), math.inf, dtype=flat.dtype, device=flat.device)
        last[0, : n - whole] = flat[whole:]
        out = torch.cat([out, last])
    return out


def _count_zeros(flat: torch.Tensor, high: torch.Tensor, low: torch.Tensor, nonzero_min: bool
                 ) -> tuple[int, torch.Tensor]:
    """(number of zeros of ``flat``, per-block minimum — of the non-zero values with ``nonzero_min``, +inf for a
    block of zeros) from the block extrema, reading only the blocks that mix zeros with other values."""
    n = flat.numel()
    maybe = ((low <= 0) & (high >= 0)).nonzero().squeeze(1)
    if maybe.numel() == 0:
        return 0, low
    all_zero = (low[maybe] == 0) & (high[maybe] == 0)
    empty = maybe[all_zero]
    zeros = BLOCK * empty.numel()
    if empty.numel() and int(empty[-1]) * BLOCK + BLOCK > n:  # the last block is shorter
        zeros -= int(empty[-1]) * BLOCK + BLOCK - n
    if nonzero_min:
        low = low.clone()
        low[empty] = math.inf
    mixed = maybe[~all_zero]
    step = max(1, _chunk_elements(flat) // BLOCK)
    for start in range(0, mixed.numel(), step):
        ids = mixed[start : start + step]
        values = _blocks(flat, ids)
        is_zero = values == 0
        zeros += int(is_zero.sum())
        if nonzero_min:
            low[ids] = values.masked_fill(is_zero, math.inf).amin(dim=1)
    return zeros, low


def block_select(flat: torch.Tensor, scanned: Scan, k: int, *, largest: bool, skip_zeros: bool = False,
                 absolute: bool = False, by_sort: bool | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact top-k (bottom-k; with ``skip_zeros`` among the non-zero values, the scan made with
    ``nonzero_min``) of ``flat`` (of |``flat``| with ``absolute``, the scan made so too) — values and flat indices
    in :func:`esa.kernels.topk`'s order — from the best k blocks of ``scanned`` (module docstring). None when those
    blocks would hold more than 1/``BLOCK_SELECT_SHARE`` of the buffer: the caller then selects over the whole
    buffer.

    Two ways to the same result: ``by_sort`` (the default on a GPU) ranks the block extrema and then the gathered
    values with one stable sort each — no host synchronisation before the result is read; otherwise (the default
    on a CPU, where sorting millions of blocks costs more than selecting k of them) :func:`esa.kernels.topk`."""
    blocks = scanned.block_max if largest else scanned.block_min
    n = flat.numel()
    if k == 0 or k * BLOCK * BLOCK_SELECT_SHARE > n:
        return None
    by_sort = flat.is_cuda if by_sort is None else by_sort
    chosen = _best(blocks, k, largest, by_sort)[1]
    chosen = torch.sort(chosen).values
    index = (chosen.unsqueeze(1) * BLOCK + torch.arange(BLOCK, device=chosen.device)).reshape(-1)
    worst = -math.inf if largest else math.inf
    inside = index < n  # only the last block may be shorter
    values = flat[index.clamp(max=n - 1)]
    values = values.abs() if absolute else values
    values = values.masked_fill(~inside, worst)
    if skip_zeros:
        values = values.masked_fill(values == 0, worst)
    best, local = _best(values, k, largest, by_sort)
    if skip_zeros:
        used = torch.isfinite(best)
        best, local = best[used], local[used]
    return best, index[local]


def _best(values: torch.Tensor, k: int, largest: bool, by_sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of the stable order by value (descending when ``largest``), ties to the lower position, -0.0 as
    +0.0: :func:`esa.kernels.topk`'s result, by a stable sort or by topk itself."""
    if not by_sort:
        return topk(values, k, largest=largest)
    ordered, position = torch.sort(values + 0.0, descending=largest, stable=True)
    return ordered[:k], position[:k]
