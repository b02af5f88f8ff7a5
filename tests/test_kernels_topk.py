"""topk / merge_topk: both implementations equal a full stable sort, ties included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.kernels import force_backend, merge_topk, topk
from esa.kernels.dispatch import HAS_TRITON
from esa.kernels.topk import HIST_BLOCK, SELECT_BLOCK, topk_torch, topk_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMAX = torch.finfo(torch.float32).max
TINY = torch.finfo(torch.float32).tiny

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def sorted_reference(score: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """First k entries of the stable sort of the flat scores by (-value, index) or (value, index), on the CPU."""
    flat = score.detach().cpu().reshape(-1) + 0.0  # -0.0 -> +0.0
    order = torch.sort(flat, descending=largest, stable=True).indices[:k]
    return flat[order], order


def small_chunk_torch(score: torch.Tensor, k: int, largest: bool = True):
    """The reference with small chunks and tie blocks, so that its multi-chunk merge and tie scan are exercised."""
    if score.numel() <= 2000:
        return topk_torch(score, k, largest, chunk_size=97, tie_block=13)
    return topk_torch(score, k, largest, chunk_size=4099, tie_block=257)


IMPLS = [
    pytest.param(topk_triton, marks=needs_triton, id="triton"),
    pytest.param(topk_torch, id="torch"),
    pytest.param(small_chunk_torch, id="torch-small-chunks"),
]


def assert_matches_sort(impl, score: torch.Tensor, k: int, largest: bool) -> None:
    values, indices = impl(score, k, largest)
    ref_values, ref_indices = sorted_reference(score, k, largest)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(values.cpu().view(torch.int32), ref_values.view(torch.int32))  # +0.0, never -0.0


# Values with many exact ties: small integers, both zeros, infinities, extremes and subnormals.
tie_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 3.0, -2.5, FMAX, -FMAX, TINY, -TINY / 4, math.inf, -math.inf])
any_values = st.floats(allow_nan=False, width=32)


@st.composite
def score_and_k(draw, values=tie_values, max_size=300):
    data = draw(st.lists(values, min_size=1, max_size=max_size))
    k = draw(st.integers(0, len(data)))
    return torch.tensor(data, dtype=torch.float32), k


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=100, deadline=None)
@given(case=score_and_k(), largest=st.booleans())
def test_heavy_ties_match_stable_sort(impl, case, largest: bool) -> None:
    score, k = case
    assert_matches_sort(impl, score.to(DEVICE), k, largest)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=50, deadline=None)
@given(case=score_and_k(values=any_values), largest=st.booleans())
def test_arbitrary_floats_match_stable_sort(impl, case, largest: bool) -> None:
    score, k = case
    assert_matches_sort(impl, score.to(DEVICE), k, largest)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 3 * max(HIST_BLOCK, SELECT_BLOCK)),
    levels=st.integers(1, 4),
    data=st.data(),
    largest=st.booleans(),
)
def test_multi_block_ties_match_stable_sort(impl, n: int, levels: int, data, largest: bool) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    score = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(seed)).float()
    k = data.draw(st.integers(0, n))
    assert_matches_sort(impl, score.to(DEVICE), k, largest)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("largest", [True, False])
def test_k_zero_and_k_numel(impl, largest: bool) -> None:
    score = torch.randint(-2, 3, (1001,), generator=torch.Generator().manual_seed(1)).float().to(DEVICE)
    for k in (0, 1, 1000, 1001):
        assert_matches_sort(impl, score, k, largest)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_zeros_cut_in_the_middle_of_the_ties(impl) -> None:
    # Several blocks of exact zeros (half of them -0.0); k ends inside the zeros, so the compaction must keep the
    # lowest-index ties, across blocks.
    n = 3 * max(HIST_BLOCK, SELECT_BLOCK) + 17
    g = torch.Generator().manual_seed(2)
    score = torch.zeros(n)
    score[torch.rand(n, generator=g) < 0.5] = -0.0
    score[torch.randperm(n, generator=g)[:50]] = torch.rand(50, generator=g) + 1.0
    score[torch.randperm(n, generator=g)[:50]] = -torch.rand(50, generator=g) - 1.0
    score = score.to(DEVICE)
    for k in (60, n // 2, n - 60):
        for largest in (True, False):
            assert_matches_sort(impl, score, k, largest)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_block_continuous_scores_and_shapes(impl) -> None:
    score = torch.rand(2 * HIST_BLOCK + 3, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for k in (1, 257, 5000):
        assert_matches_sort(impl, score, k, largest=True)
        assert_matches_sort(impl, score, k, largest=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input_uses_row_major_flat_indices(impl) -> None:
    base = torch.randint(0, 5, (40, 30), generator=torch.Generator().manual_seed(4)).float().to(DEVICE)
    transposed = base.t()
    values, indices = impl(transposed, 25, True)
    ref_values, ref_indices = sorted_reference(transposed.contiguous(), 25, True)
    assert torch.equal(indices.cpu(), ref_indices) and torch.equal(values.cpu(), ref_values)


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_arguments(impl) -> None:
    score = torch.zeros(10, device=DEVICE)
    for k in (-1, 11):
        with pytest.raises(ValueError, match="outside"):
            impl(score, k, True)
    with pytest.raises(ValueError, match="float32"):
        impl(score.double(), 1, True)
    for k in (0, 3):
        bad = score.clone()
        bad[7] = math.nan
        with pytest.raises(ValueError, match="score contains NaN"):
            impl(bad, k, True)
        with pytest.raises(ValueError, match="score contains NaN"):
            impl(bad, k, False)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_score(impl) -> None:
    values, indices = impl(torch.zeros(0, device=DEVICE), 0, True)
    assert values.shape == (0,) and indices.shape == (0,)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_public_topk_dispatches(backend: str) -> None:
    score = torch.tensor([0.5, 2.0, -1.0, 2.0, 0.0], device=DEVICE)
    with force_backend(backend):
        values, indices = topk(score, 3)
        low_values, low_indices = topk(score, 2, largest=False)
    assert indices.tolist() == [1, 3, 0] and values.tolist() == [2.0, 2.0, 0.5]
    assert low_indices.tolist() == [2, 4] and low_values.tolist() == [-1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# merge_topk


def merged_reference(tensors: list[torch.Tensor], k: int, largest: bool) -> list[tuple[int, float, int]]:
    """Full sort of every element of every tensor by (value, tensor position, flat index)."""
    rows = [(float(v) + 0.0, p, i) for p, t in enumerate(tensors) for i, v in enumerate(t.reshape(-1).tolist())]
    rows.sort(key=lambda r: (-r[0] if largest else r[0], r[1], r[2]))
    return rows[:k]


@st.composite
def tensors_and_k(draw):
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=6))
    tensors = [torch.tensor(draw(st.lists(tie_values, min_size=s, max_size=s)), dtype=torch.float32) for s in sizes]
    k = draw(st.integers(0, sum(sizes)))
    return tensors, k


@settings(max_examples=100, deadline=None)
@given(case=tensors_and_k(), largest=st.booleans())
def test_merge_topk_equals_full_sort_of_the_concatenation(case, largest: bool) -> None:
    tensors, k = case
    candidates = [topk_torch(t, min(k, t.numel()), largest) for t in tensors]
    positions, values, indices = merge_topk(candidates, k, largest)
    got = list(zip(positions.tolist(), values.tolist(), indices.tolist()))
    assert [(p, v, i) for v, p, i in merged_reference(tensors, k, largest)] == got
    assert positions.dtype == indices.dtype == torch.int64 and values.dtype == torch.float32


def test_merge_topk_errors_and_empty() -> None:
    candidates = [(torch.tensor([1.0]), torch.tensor([0]))]
    with pytest.raises(ValueError, match="outside"):
        merge_topk(candidates, 2)
    with pytest.raises(ValueError, match="NaN"):
        merge_topk([(torch.tensor([math.nan]), torch.tensor([0]))], 1)
    positions, values, indices = merge_topk([], 0)
    assert positions.numel() == values.numel() == indices.numel() == 0
