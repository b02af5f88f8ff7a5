"""block_scan: the Triton one-read scan (extrema per block, zero and non-finite counts, float64 power sums) against
a plain-torch reference and numpy brute force; compiled on a CUDA machine, interpreted elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esa.kernels.blockscan import BLOCK, ROWS, block_scan, block_scan_torch
from esa.kernels.dispatch import HAS_TRITON
from esa.kernels.moments import shift_of

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One element, a short block, one block, one program's tile and a bit, several programs with a short last block.
SIZES = (1, BLOCK - 1, BLOCK, ROWS * BLOCK + 3, 5 * ROWS * BLOCK - 7)


def _scores(n: int, seed: int) -> torch.Tensor:
    """Signed heavy-tailed scores with scattered zeros, a whole block of zeros and a repeated value."""
    rng = np.random.default_rng(seed)
    x = (rng.lognormal(-3, 2, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    x[rng.random(n) < 0.25] = 0
    x[BLOCK : 2 * BLOCK] = 0
    x[-3:] = x[0]
    return torch.from_numpy(x)


def _brute(x: np.ndarray, nonzero_min: bool) -> tuple[list, list]:
    highs, lows = [], []
    for start in range(0, x.size, BLOCK):
        block = x[start : start + BLOCK]
        kept = block[block != 0] if nonzero_min else block
        highs.append(float(block.max()))
        lows.append(float(kept.min()) if kept.size else math.inf)
    return highs, lows


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("nonzero_min", [False, True])
def test_block_scan_equals_brute_force(n, absolute, nonzero_min):
    x = _scores(n, n)
    v = (x.abs() if absolute else x).double().numpy()
    shift = float(np.mean(v[:50])) * 0.9
    got = block_scan(x.to(DEVICE), shift=shift, absolute=absolute, nonzero_min=nonzero_min)
    highs, lows = _brute(v, nonzero_min)
    assert got.high.cpu().double().tolist() == highs and got.low.cpu().double().tolist() == lows
    assert got.zeros == int((v == 0).sum()) and got.nonfinite == 0
    y = v - shift_of(shift)
    assert got.sums == pytest.approx([y.sum(), (y**2).sum(), (y**3).sum(), (y**4).sum()], rel=1e-12, abs=1e-300)
    reference = block_scan_torch(x, shift=shift, absolute=absolute, nonzero_min=nonzero_min)
    assert torch.equal(reference.high, got.high.cpu()) and torch.equal(reference.low, got.low.cpu())
    assert reference.zeros == got.zeros and reference.sums == pytest.approx(got.sums, rel=1e-12)


def test_block_scan_counts_non_finite_values_and_skips_sums_without_a_shift():
    x = torch.rand(3 * ROWS * BLOCK + 11)
    x[[7, ROWS * BLOCK + 2, x.numel() - 1]] = torch.tensor([math.nan, math.inf, -math.inf])
    got = block_scan(x.to(DEVICE))
    assert got.nonfinite == 3 and got.sums is None
    assert block_scan_torch(x).nonfinite == 3
    assert block_scan(torch.rand(100).to(DEVICE)).nonfinite == 0


def test_block_scan_of_an_empty_buffer():
    got = block_scan(torch.zeros(0, device=DEVICE), shift=0.5)
    assert got.high.numel() == got.low.numel() == 0 and got.zeros == got.nonfinite == 0
    assert got.sums == (0.0, 0.0, 0.0, 0.0)


def test_block_scan_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32"):
        block_scan(torch.zeros(4, dtype=torch.float64, device=DEVICE))
