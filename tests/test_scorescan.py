"""scan: block extrema, zero count, finiteness and moments of a score buffer from one read, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa import scorescan
from esa.scorescan import BLOCK, scan


def _brute(x: np.ndarray, nonzero_min: bool) -> tuple[list, list, int]:
    highs, lows = [], []
    for start in range(0, x.size, BLOCK):
        block = x[start : start + BLOCK]
        highs.append(float(block.max()))
        kept = block[block != 0] if nonzero_min else block
        lows.append(float(kept.min()) if kept.size else math.inf)
    return highs, lows, int((x == 0).sum())


# Blocks of one kind each: all zero, zeros mixed with positive values, mixed with negative values, no zeros.
block_kind = st.sampled_from(["zeros", "mixed", "signed", "dense"])


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(block_kind, min_size=1, max_size=12), tail=st.integers(0, BLOCK - 1), seed=st.integers(0, 99),
       nonzero_min=st.booleans(), small_chunks=st.booleans())
def test_block_extrema_and_zero_count_equal_brute_force(kinds, tail, seed, nonzero_min, small_chunks):
    """Every kind of block, a last block of any length (also all zero), chunks of one block or of many."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind in kinds:
        v = rng.random(BLOCK).astype(np.float32) + 0.1
        if kind == "zeros":
            v[:] = 0
        elif kind in ("mixed", "signed"):
            v[rng.random(BLOCK) < 0.5] = 0
            if kind == "signed":
                v[: BLOCK // 4] *= -1
        parts.append(v)
    parts.append(np.zeros(tail, np.float32) if seed % 2 else rng.random(tail).astype(np.float32))
    x = np.concatenate(parts)
    with pytest.MonkeyPatch.context() as patch:
        if small_chunks:
            patch.setattr(scorescan, "CPU_CHUNK", BLOCK)
        got = scan(torch.from_numpy(x), nonzero_min=nonzero_min)
    highs, lows, zeros = _brute(x, nonzero_min)
    assert got.finite and got.numel == x.size
    assert got.block_max.tolist() == highs and got.block_min.tolist() == lows and got.zeros == zeros


def test_moments_from_one_read_match_numpy_float64(monkeypatch):
    monkeypatch.setattr(scorescan, "CPU_CHUNK", 4 * BLOCK)
    x = torch.from_numpy(np.random.default_rng(2).lognormal(-4, 3, 10 * BLOCK + 77)).float()
    x[::5] = 0
    v = x.double().numpy()
    got = scan(x, shift=float(v[:100].mean()))
    mean, m2, m3, m4 = got.moments()
    d = v - v.mean()
    assert mean == pytest.approx(v.mean(), rel=1e-12) and got.zeros == int((v == 0).sum())
    assert (m2, m3, m4) == pytest.approx(((d**2).mean(), (d**3).mean(), (d**4).mean()), rel=1e-9)
    with pytest.raises(ValueError, match="shift"):
        scan(x).moments()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 4 * BLOCK + 1, 5 * BLOCK + 2])  # first block, a middle one, the short last one
def test_any_non_finite_value_is_seen(bad, where):
    x = torch.rand(5 * BLOCK + 3)
    x[where] = bad
    assert not scan(x).finite and not scan(x, shift=0.5, nonzero_min=True).finite
    assert scan(torch.rand(5 * BLOCK + 3)).finite


def test_empty_buffer():
    got = scan(torch.zeros(0))
    assert got.numel == 0 and got.zeros == 0 and got.finite and got.block_max.numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_chunk", [BLOCK * 3, scorescan.GPU_CHUNK])
def test_cuda_scan_and_selection_equal_the_cpu_ones(gpu_chunk, monkeypatch):
    """On a GPU the chunks are large and the power sums are the Triton kernel: the same extrema, zeros and
    selections as on the CPU, and the same moments to float64 rounding."""
    from esa.scorescan import block_select

    monkeypatch.setattr(scorescan, "GPU_CHUNK", gpu_chunk)
    rng = np.random.default_rng(5)
    x = rng.lognormal(-3, 2, 100 * BLOCK + 17).astype(np.float32)
    x[rng.random(x.size) < 0.3] = 0
    x[5 * BLOCK : 9 * BLOCK] = 0  # whole blocks of zeros
    cpu = torch.from_numpy(x)
    shift = float(cpu[:500].double().mean())
    a, b = scan(cpu, shift=shift, nonzero_min=True), scan(cpu.cuda(), shift=shift, nonzero_min=True)
    assert a.block_max.tolist() == b.block_max.cpu().tolist() and a.block_min.tolist() == b.block_min.cpu().tolist()
    assert a.zeros == b.zeros and b.finite
    assert b.moments() == pytest.approx(a.moments(), rel=1e-12)
    for largest in (True, False):
        ca = block_select(cpu, a, 10, largest=largest, skip_zeros=not largest)
        cb = block_select(cpu.cuda(), b, 10, largest=largest, skip_zeros=not largest)
        assert ca[1].tolist() == cb[1].cpu().tolist() and ca[0].tolist() == cb[0].cpu().tolist()


def test_a_large_cpu_buffer_takes_the_compiled_power_sums_with_the_same_moments(monkeypatch):
    """Above COMPILED_MIN_NUMEL (made small here) the scan takes its power sums from the compiled path in one more
    read: the same extrema and zeros, moments equal to float64 rounding."""
    from esa.kernels import moments
    from esa.kernels.dispatch import force_backend

    monkeypatch.setattr(moments, "COMPILED_MIN_NUMEL", 8 * BLOCK)
    monkeypatch.setattr(moments, "COMPILED_CHUNK", 4 * BLOCK)
    calls = []
    real = moments.power_sums_compiled
    monkeypatch.setattr(scorescan, "power_sums_compiled", lambda *a: calls.append(1) or real(*a))
    x = torch.from_numpy(np.random.default_rng(4).lognormal(-2, 2, 30 * BLOCK + 9)).float()
    x[: 3 * BLOCK] = 0
    compiled = scan(x, shift=0.2, nonzero_min=True)
    with force_backend("torch"):
        reference = scan(x, shift=0.2, nonzero_min=True)
    assert len(calls) == 2 and moments._compiled.get("fn") is not None  # the compiled path served the first
    assert compiled.block_max.tolist() == reference.block_max.tolist() and compiled.zeros == reference.zeros
    assert compiled.moments() == pytest.approx(reference.moments(), rel=1e-12)
