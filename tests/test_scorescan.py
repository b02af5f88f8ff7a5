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
@pytest.mark.parametrize("absolute", [False, True])
def test_cuda_scan_and_selection_equal_the_cpu_ones(absolute):
    """On a GPU the scan is one Triton kernel (|S| taken as it reads) and block selection ranks by stable sorts:
    the same extrema, zeros and selections as the CPU's chunked scan and topk, the same moments to float64
    rounding."""
    from esa.scorescan import block_select

    rng = np.random.default_rng(5)
    x = rng.lognormal(-3, 2, 100 * BLOCK + 17).astype(np.float32)
    if absolute:
        x *= rng.choice([-1, 1], x.size).astype(np.float32)
    x[rng.random(x.size) < 0.3] = 0
    x[5 * BLOCK : 9 * BLOCK] = 0  # whole blocks of zeros
    x[-40:] = x[3]  # ties across blocks
    cpu = torch.from_numpy(x)
    shift = float(cpu[:500].abs().double().mean())
    a = scan(cpu, shift=shift, nonzero_min=True, absolute=absolute)
    b = scan(cpu.cuda(), shift=shift, nonzero_min=True, absolute=absolute)
    assert a.block_max.tolist() == b.block_max.cpu().tolist() and a.block_min.tolist() == b.block_min.cpu().tolist()
    assert a.zeros == b.zeros and b.finite
    assert b.moments() == pytest.approx(a.moments(), rel=1e-12)
    for largest in (True, False):
        ca = block_select(cpu, a, 10, largest=largest, skip_zeros=not largest, absolute=absolute)
        cb = block_select(cpu.cuda(), b, 10, largest=largest, skip_zeros=not largest, absolute=absolute)
        assert ca[1].tolist() == cb[1].cpu().tolist() and ca[0].tolist() == cb[0].cpu().tolist()


def test_a_large_cpu_buffer_takes_the_compiled_scan_with_the_same_results(monkeypatch):
    """Above COMPILED_MIN_NUMEL (made small here) the scan takes its power sums and block extrema from the compiled
    path in one read, and the rest (a partial chunk, a short last block) chunk by chunk: the same extrema and
    zeros, moments equal to float64 rounding; a NaN inside the compiled part is still caught."""
    from esa.kernels import moments
    from esa.kernels.dispatch import force_backend

    monkeypatch.setattr(moments, "COMPILED_MIN_NUMEL", 8 * BLOCK)
    monkeypatch.setattr(moments, "COMPILED_CHUNK", 4 * BLOCK)
    calls = []
    real = moments.compiled_scan
    monkeypatch.setattr(scorescan, "compiled_scan", lambda *a: calls.append(1) or real(*a))
    x = torch.from_numpy(np.random.default_rng(4).lognormal(-2, 2, 30 * BLOCK + 9)).float()
    x[: 3 * BLOCK] = 0
    compiled = scan(x, shift=0.2, nonzero_min=True)
    with force_backend("torch"):
        reference = scan(x, shift=0.2, nonzero_min=True)
    assert len(calls) == 2 and moments._compiled.get("fn") is not None  # the compiled path served the first
    assert compiled.block_max.tolist() == reference.block_max.tolist()
    assert compiled.block_min.tolist() == reference.block_min.tolist() and compiled.zeros == reference.zeros
    assert compiled.moments() == pytest.approx(reference.moments(), rel=1e-12)
    x[5 * BLOCK + 3] = math.nan
    assert not scan(x, shift=0.2).finite


@pytest.mark.parametrize("absolute", [False, True])
def test_the_fused_triton_scan_equals_the_cpu_scan(absolute):
    """On a GPU ``scan`` is one Triton kernel (:mod:`esa.kernels.blockscan`, interpreted here), |S| taken as it
    reads: the same extrema, zero count and finiteness as the CPU's chunked scan of the materialised view, moments
    equal to float64 rounding."""
    from esa.kernels.dispatch import HAS_TRITON, force_backend

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    rng = np.random.default_rng(11)
    x = (rng.lognormal(-3, 2, 40 * BLOCK + 9) * rng.choice([-1, 1], 40 * BLOCK + 9)).astype(np.float32)
    x[rng.random(x.size) < 0.3] = 0
    x[2 * BLOCK : 5 * BLOCK] = 0
    x = torch.from_numpy(x)
    view = x.abs() if absolute else x
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted elsewhere
    with force_backend("torch"):
        reference = scan(view, shift=0.01, nonzero_min=True)
    with force_backend("triton"):
        fused = scan(x.to(device), shift=0.01, nonzero_min=True, absolute=absolute)
    assert fused.block_max.tolist() == reference.block_max.tolist()
    assert fused.block_min.tolist() == reference.block_min.tolist()
    assert fused.zeros == reference.zeros and fused.finite and reference.finite
    assert fused.moments() == pytest.approx(reference.moments(), rel=1e-12)
    x[17] = math.nan
    with force_backend("triton"):
        assert not scan(x.to(device), absolute=absolute).finite


def test_signed_scores_are_ranked_by_magnitude_without_a_copy_and_reported_with_their_sign():
    """A signed metric's selection ranks |S| through the scan's ``absolute`` (no |S| buffer), both block-selection
    strategies give the full sort's result, and the reported scores keep their sign."""
    from esa.selection import tensor_candidates

    rng = np.random.default_rng(3)
    n = 110_000  # 50 blocks are under 1/BLOCK_SELECT_SHARE of it: the block path
    x = torch.from_numpy((rng.standard_normal(n) ** 3).astype(np.float32))
    x[rng.random(n) < 0.2] = 0
    order = np.lexsort((np.arange(n), -np.abs(x.numpy())))[:50]
    got = tensor_candidates("t", x, 50, largest=True, metric="taylor")
    assert got.index.tolist() == order.tolist()
    assert got.values.tolist() == np.abs(x.numpy()[order]).tolist()
    assert got.reported.tolist() == x.numpy()[order].tolist()
    scanned = scan(x, absolute=True)
    for by_sort in (False, True):
        values, index = scorescan.block_select(x, scanned, 50, largest=True, absolute=True, by_sort=by_sort)
        assert index.tolist() == order.tolist() and values.tolist() == got.values.tolist()
