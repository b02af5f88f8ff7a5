"""One read of a float32 score buffer on a GPU: per-block extrema, zero and non-finite counts, float64 power sums.

``block_scan(x, shift=c, absolute=a, nonzero_min=z)`` reads each element of ``x`` once and returns, with
v = |x| when ``absolute`` (the ranking view of a signed metric, never materialised) and v = x otherwise:

- ``high[b]`` = max of v over block b and ``low[b]`` = min of v over block b, blocks of ``BLOCK`` consecutive
  elements (the last may be shorter); with ``nonzero_min``, ``low[b]`` is the smallest non-zero v of the block
  (+inf for a block of zeros). Blocks holding a NaN or ±inf have unspecified extrema: check ``nonfinite`` first;
- ``zeros`` = #{v = 0} and ``nonfinite`` = #{v is NaN or ±inf};
- with a ``shift``: (Σy, Σy², Σy³, Σy⁴), y = v − c in float64 (:mod:`esa.kernels.moments`: c is rounded to
  float32 first; central moments without cancellation trouble when c is near the mean).

Each Triton program takes ``ROWS`` blocks (a ``ROWS`` × ``BLOCK`` tile), writes their extrema and one row of six
float64 partials (four power sums, zeros, non-finite; a count below 2^53 is exact in float64); torch adds the
partials, so the whole scan costs one read of the buffer and one host synchronisation. :func:`block_scan_torch` is
the reference written with torch reductions (the tests compare the two; :mod:`esa.scorescan` uses its own
cache-blocked CPU form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esa.kernels.dispatch import cdiv, tl, triton
from esa.kernels.moments import PowerSums, shift_of

#: Elements per block (the unit of :func:`esa.scorescan.block_select`).
BLOCK = 256
#: Blocks per Triton program (a tile of 4,096 elements).
ROWS = 16


@dataclass
class BlockScan:
    """What :func:`block_scan` returns (extrema on the buffer's device, counts and sums on the host)."""

    high: torch.Tensor
    low: torch.Tensor
    zeros: int
    nonfinite: int
    sums: PowerSums | None


def _check(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise ValueError(f"block_scan takes float32, got {x.dtype}")
    return x.detach().reshape(-1)


@triton.jit
def _block_scan_kernel(x_ptr, high_ptr, low_ptr, partial_ptr, n, n_blocks, shift, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr, ABSOLUTE: tl.constexpr, NONZERO_MIN: tl.constexpr, SUMS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = offs < n
    v = tl.load(x_ptr + offs, mask=inside, other=0.0)
    if ABSOLUTE:
        v = tl.abs(v)
    is_zero = inside & (v == 0.0)
    bad = inside & ((v != v) | (tl.abs(v) == float("inf")))
    high = tl.max(tl.where(inside, v, float("-inf")), axis=1)
    low_source = tl.where(inside, v, float("inf"))
    if NONZERO_MIN:
        low_source = tl.where(is_zero, float("inf"), low_source)
    low = tl.min(low_source, axis=1)
    row_inside = rows < n_blocks
    tl.store(high_ptr + rows, high, mask=row_inside)
    tl.store(low_ptr + rows, low, mask=row_inside)
    base = partial_ptr + pid.to(tl.int64) * 6
    tl.store(base + 4, tl.sum(tl.sum(is_zero.to(tl.float64), axis=1), axis=0))
    tl.store(base + 5, tl.sum(tl.sum(bad.to(tl.float64), axis=1), axis=0))
    if SUMS:
        y = tl.where(inside, v.to(tl.float64) - shift, 0.0)
        sq = y * y
        tl.store(base + 0, tl.sum(tl.sum(y, axis=1), axis=0))
        tl.store(base + 1, tl.sum(tl.sum(sq, axis=1), axis=0))
        tl.store(base + 2, tl.sum(tl.sum(sq * y, axis=1), axis=0))
        tl.store(base + 3, tl.sum(tl.sum(sq * sq, axis=1), axis=0))


def block_scan(x: torch.Tensor, *, shift: float | None = None, absolute: bool = False,
               nonzero_min: bool = False) -> BlockScan:
    """The Triton scan (module docstring): one read of ``x``, one synchronisation."""
    flat = _check(x).contiguous()
    n = flat.numel()
    n_blocks = cdiv(n, BLOCK)
    high = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    low = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    if n == 0:
        return BlockScan(high, low, 0, 0, (0.0, 0.0, 0.0, 0.0) if shift is not None else None)
    programs = cdiv(n_blocks, ROWS)
    partial = torch.zeros((programs, 6), dtype=torch.float64, device=flat.device)
    _block_scan_kernel[(programs,)](flat, high, low, partial, n, n_blocks, shift_of(shift or 0.0), BLOCK=BLOCK,
                                    ROWS=ROWS, ABSOLUTE=absolute, NONZERO_MIN=nonzero_min, SUMS=shift is not None)
    s1, s2, s3, s4, zeros, nonfinite = partial.sum(0).tolist()
    return BlockScan(high, low, int(zeros), int(nonfinite), (s1, s2, s3, s4) if shift is not None else None)


def block_scan_torch(x: torch.Tensor, *, shift: float | None = None, absolute: bool = False,
                     nonzero_min: bool = False) -> BlockScan:
    """Reference of :func:`block_scan` in plain torch (the whole buffer at once: for tests)."""
    flat = _check(x)
    v = flat.abs() if absolute else flat
    n = v.numel()
    n_blocks = cdiv(n, BLOCK)
    padded = torch.cat([v, v.new_zeros(n_blocks * BLOCK - n)]).view(n_blocks, BLOCK)
    inside = (torch.arange(n_blocks * BLOCK, device=v.device) < n).view(n_blocks, BLOCK)
    high = padded.masked_fill(~inside, -math.inf).amax(dim=1)
    low_source = padded.masked_fill(~inside, math.inf)
    if nonzero_min:
        low_source = low_source.masked_fill(low_source == 0, math.inf)
    low = low_source.amin(dim=1)
    zeros = int((v == 0).sum())
    nonfinite = int((~torch.isfinite(v)).sum())
    sums = None
    if shift is not None:
        y = v.double() - shift_of(shift)
        sums = (float(y.sum()), float((y**2).sum()), float((y**3).sum()), float((y**4).sum()))
    return BlockScan(high, low, zeros, nonfinite, sums)
