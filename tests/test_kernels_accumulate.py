"""accumulate_: Triton kernel vs torch reference for every op and input dtype, plus argument errors."""

from __future__ import annotations

import pytest
import torch

from esa.kernels import accumulate_, force_backend
from esa.kernels.accumulate import BLOCK, OPS, accumulate_torch, accumulate_triton
from esa.kernels.dispatch import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SHAPES = ((1,), (7,), (1000,), (4097,), (33, 31), (3 * BLOCK + 5,))
TWO_INPUTS = ("abs_product", "product")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _inputs(op: str, shape: tuple[int, ...], a_dtype: torch.dtype, seed: int = 0) -> dict:
    """Random a (and b of another dtype, and a scale where the op needs one) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * 3).to(a_dtype)
    b_dtype = torch.bfloat16 if a_dtype != torch.bfloat16 else torch.float32
    b = torch.randn(shape, generator=g).to(b_dtype) if op in TWO_INPUTS else None
    kwargs: dict = {}
    if op == "abs_scaled":
        kwargs["col_scale"] = torch.rand(shape[-1], generator=g).to(DEVICE)
    return {"a": a.to(DEVICE), "b": b.to(DEVICE) if b is not None else None, **kwargs}


def _eager(op: str, score: torch.Tensor, a, b=None, row_scale=None, col_scale=None) -> torch.Tensor:
    """The plain expression, written out once more independently of the module."""
    af = a.float()
    if op == "abs_product":
        return score + (af * b.float()).abs()
    if op == "square":
        return score + af * af
    if op == "product":
        return score + af * b.float()
    if op == "abs":
        return score + af.abs()
    a2 = af.reshape(-1, a.shape[-1]).abs()
    scaled = a2 * (row_scale[:, None] if row_scale is not None else col_scale[None, :])
    return score + scaled.reshape(score.shape)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_repeated(op: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    start = torch.rand(shape, device=DEVICE)
    s_triton, s_torch = start.clone(), start.clone()
    for step in range(3):
        inputs = _inputs(op, shape, dtype, seed=step)
        accumulate_triton(op, s_triton, **inputs)
        accumulate_torch(op, s_torch, **inputs)
    # Both round like the eager expression (no FMA contraction), so they agree bit for bit; the tolerance is the
    # documented contract.
    torch.testing.assert_close(s_triton, s_torch, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_reference_is_the_eager_expression_in_any_chunking(op: str, dtype: torch.dtype) -> None:
    shape = (37, 11)
    inputs = _inputs(op, shape, dtype)
    start = torch.rand(shape, device=DEVICE)
    expected = _eager(op, start, **inputs)
    for chunk in (5, 11, 1 << 26):
        score = start.clone()
        accumulate_torch(op, score, **inputs, chunk=chunk)
        assert torch.equal(score, expected)


IMPLS = [pytest.param(accumulate_triton, marks=needs_triton, id="triton"), pytest.param(accumulate_torch, id="torch")]


@pytest.mark.parametrize("impl", IMPLS)
def test_abs_scaled_rows_and_columns(impl) -> None:
    a = torch.randn(2, 3, 5, device=DEVICE).to(torch.bfloat16)  # viewed as [6, 5]
    row_scale = torch.arange(1, 7, dtype=torch.float32, device=DEVICE)
    col_scale = torch.arange(1, 6, dtype=torch.float32, device=DEVICE)
    rows = torch.zeros(2, 3, 5, device=DEVICE)
    impl("abs_scaled", rows, a, row_scale=row_scale)
    assert torch.equal(rows, (a.float().abs().reshape(6, 5) * row_scale[:, None]).reshape(2, 3, 5))
    cols = torch.zeros(2, 3, 5, device=DEVICE)
    impl("abs_scaled", cols, a, col_scale=col_scale)
    assert torch.equal(cols, a.float().abs() * col_scale)
    one_d = torch.zeros(5, device=DEVICE)
    impl("abs_scaled", one_d, a[0, 0].contiguous(), row_scale=row_scale[:1].contiguous())
    assert torch.equal(one_d, a[0, 0].float().abs())


def test_bf16_subnormals_and_extremes_are_upcast_exactly() -> None:
    bits = torch.tensor([1, -32767, 0x7F7F, 0x0080, -1 - 0x7F7F, 0], dtype=torch.int16)
    a = bits.view(torch.bfloat16).to(DEVICE)
    for backend in (["triton"] if HAS_TRITON else []) + ["torch"]:
        score = torch.zeros(6, device=DEVICE)
        with force_backend(backend):
            accumulate_("abs", score, a)
        assert torch.equal(score, a.float().abs()), backend


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensors_are_a_no_op(impl) -> None:
    score = torch.zeros(0, 4, device=DEVICE)
    impl("square", score, torch.zeros(0, 4, device=DEVICE))
    impl("abs_scaled", score, torch.zeros(0, 4, device=DEVICE), col_scale=torch.ones(4, device=DEVICE))
    assert score.shape == (0, 4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_public_entry_point_dispatches(backend: str) -> None:
    g = torch.randn(64, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(64, device=DEVICE).to(torch.bfloat16)
    score = torch.zeros(64, device=DEVICE)
    with force_backend(backend):
        accumulate_("abs_product", score, g, w)
        accumulate_("abs_product", score, g, w)
    assert torch.equal(score, 2 * (g.float() * w.float()).abs())


def _call(op="abs_product", score=None, a=None, b="default", **kwargs) -> None:
    score = torch.zeros(4, 3) if score is None else score
    a = torch.ones(4, 3) if a is None else a
    b = torch.ones(4, 3) if isinstance(b, str) else b
    accumulate_torch(op, score, a, b, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"op": "cube"}, "unknown accumulate op"),
        ({"b": None}, "needs a second input b"),
        ({"op": "square"}, "takes no second input"),
        ({"score": torch.zeros(4, 3, dtype=torch.float64)}, "score must be float32"),
        ({"score": torch.zeros(3, 4).t()}, "score must be contiguous"),
        ({"a": torch.ones(12)}, "shape"),
        ({"b": torch.ones(4, 4)}, "shape"),
        ({"a": torch.ones(3, 4).t()}, "a must be contiguous"),
        ({"a": torch.ones(4, 3, dtype=torch.int32)}, "bfloat16, float16, float32 or float64"),
        ({"op": "abs", "b": None, "row_scale": torch.ones(4)}, "only used by op 'abs_scaled'"),
        ({"op": "abs_scaled", "b": None}, "exactly one of row_scale or col_scale"),
        ({"op": "abs_scaled", "b": None, "row_scale": torch.ones(4), "col_scale": torch.ones(3)}, "exactly one"),
        ({"op": "abs_scaled", "b": None, "row_scale": torch.ones(3)}, r"row_scale must have shape \(4,\)"),
        ({"op": "abs_scaled", "b": None, "col_scale": torch.ones(3, dtype=torch.float64)}, "col_scale must be float32"),
    ],
)
def test_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)
