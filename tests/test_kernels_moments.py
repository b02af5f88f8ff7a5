"""power_sums: the torch reference and the compiled CPU form vs numpy float64, and the central moments built from
them (the GPU's sums come from esa.kernels.blockscan, tested in test_kernels_blockscan.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esa.kernels.moments import central_moments, power_sums, power_sums_torch, shift_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 7, 4095, 4096, 3 * 4096 + 5, 100_003)


def _buffer(n: int, seed: int) -> torch.Tensor:
    """Heavy-tailed non-negative scores with exact zeros, as score buffers look."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(-3, 2.5, n)
    x[rng.random(n) < 0.2] = 0.0
    return torch.from_numpy(x).float()


def _reference(x: torch.Tensor, shift: float) -> tuple:
    """The sums written out in numpy float64, each power taken directly."""
    y = x.double().numpy() - shift_of(shift)
    return (y.sum(), (y**2).sum(), (y**3).sum(), (y**4).sum())


@pytest.mark.parametrize("n", SIZES)
def test_power_sums_match_numpy_float64(n):
    x = _buffer(n, n).to(DEVICE)
    shift = float(x.double().mean()) * 0.97  # near the mean, not at it
    got = power_sums_torch(x, shift)
    ref = _reference(x.cpu(), shift)
    for a, b, scale in zip(got[:4], ref[:4], (ref[1] ** 0.5 * n**0.5, ref[1], abs(ref[2]) + ref[1] ** 1.5, ref[3])):
        assert abs(a - b) <= 1e-12 * max(scale, 1e-300), (a, b)


def test_power_sums_chunks_do_not_change_the_result(monkeypatch):
    from esa.kernels import moments

    x = _buffer(10_000, 3)
    whole = power_sums_torch(x, 0.1)
    monkeypatch.setattr(moments, "TORCH_CHUNK", 999)
    chunked = power_sums_torch(x, 0.1)
    assert chunked == pytest.approx(whole, rel=1e-12)


def test_power_sums_of_extreme_float32_values_neither_overflow_nor_underflow():
    tiny = torch.tensor([1e-45, 2e-45, 0.0] * 50, dtype=torch.float32)  # subnormal float32
    huge = torch.tensor([3e38, -3e38, 1.0] * 50, dtype=torch.float32)
    for x in (tiny, huge):
        sums = power_sums(x, 0.0)
        assert all(math.isfinite(v) for v in sums) and sums[3] > 0


def test_non_finite_values_make_the_first_sum_non_finite():
    for bad in (math.nan, math.inf, -math.inf):
        x = _buffer(5000, 1)
        x[4321] = bad
        assert not math.isfinite(power_sums(x, 0.5)[0])


@pytest.mark.parametrize("shift_factor", [0.0, 0.5, 1.0, 3.0])
def test_central_moments_match_numpy_whatever_the_shift(shift_factor):
    """The shift only conditions the arithmetic: mean and central moments agree with a two-pass float64 reference
    for a shift at zero, near the mean and far from it."""
    x = _buffer(50_000, 7)
    v = x.double().numpy()
    shift = float(v.mean()) * shift_factor
    mean, m2, m3, m4 = central_moments(power_sums(x, shift), x.numel(), shift)
    d = v - v.mean()
    assert mean == pytest.approx(v.mean(), rel=1e-12)
    assert (m2, m3, m4) == pytest.approx(((d**2).mean(), (d**3).mean(), (d**4).mean()), rel=1e-9)


def test_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32"):
        power_sums(torch.zeros(3, dtype=torch.float64), 0.0)


def test_the_compiled_scan_equals_the_reference_and_falls_back_cleanly(monkeypatch):
    """The compiled CPU scan (made to apply to a small buffer: chunks of 2048, a partial rest it leaves to the
    caller) gives the torch reference's power sums to float64 rounding and the exact block extrema; it stays out of
    the way on ESA_KERNELS=torch and on small buffers, and a compiler that fails makes it return None once with a
    warning (the scan then works chunk by chunk)."""
    from esa.kernels import moments
    from esa.kernels.dispatch import force_backend

    monkeypatch.setattr(moments, "_compiled", {})
    monkeypatch.setattr(moments, "COMPILED_MIN_NUMEL", 4096)
    monkeypatch.setattr(moments, "COMPILED_CHUNK", 2048)
    x = _buffer(3 * 2048 + 77, 11)
    got = moments.compiled_scan(x, 0.05, 256)
    assert got is not None
    done, sums, high, low = got
    assert done == 3 * 2048 and sums == pytest.approx(power_sums_torch(x[:done], 0.05), rel=1e-12)
    blocks = x[:done].view(-1, 256)
    assert torch.equal(high, blocks.amax(dim=1)) and torch.equal(low, blocks.amin(dim=1))
    assert moments.compiled_scan(x[:4000], 0.05, 256) is None  # below COMPILED_MIN_NUMEL
    with force_backend("torch"):
        assert moments.compiled_scan(x, 0.05, 256) is None

    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(moments, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="compiled CPU scan is unavailable"):
        assert moments.compiled_scan(x, 0.05, 256) is None
    assert moments.compiled_scan(x, 0.05, 256) is None  # remembered: no second warning, no second try
