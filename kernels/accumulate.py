"""Fused, in-place accumulation of per-weight sensitivity scores into an fp32 buffer.

``accumulate_(op, score, a, b)`` adds one batch's contribution to ``score`` (all math in fp32, inputs upcast first):

=============  ====================  ==================================================
op             update                used by
=============  ====================  ==================================================
abs_product    score += |a * b|      grad_x_weight (a = gradient, b = weight)
square         score += a * a        grad_squared (empirical Fisher diagonal)
product        score += a * b        hutchinson_diag (a = z, b = Hz; signed)
abs            score += |a|          magnitude
abs_scaled     score += |a| * s      act_mag: |w_ij| * ||x_j||, s = row_scale[i] or col_scale[j]
=============  ====================  ==================================================

Inputs are bf16, fp16 or fp32 (upcast exactly); float64 is also taken and rounded to fp32 first.

For ``abs_scaled``, ``a`` is viewed as the matrix ``a.reshape(-1, a.shape[-1])``; ``row_scale`` has one fp32 entry per
row, ``col_scale`` one per column, and exactly one of them is given.

The Triton kernel reads each input once and reads and writes ``score`` once (the eager form materialises the fp32
upcasts and the product as temporaries). It is launched with fp contraction disabled so that ``score + a * a``
is not fused into an FMA: both backends then round exactly like the eager expression, bit for bit.
"""

from __future__ import annotations

import torch

from esa.kernels.dispatch import backend_for, cdiv, tl, triton
from esa.kernels.floatbits import INPUT_DTYPES, dtype_code, kernel_view, load_fp32

OPS = ("abs_product", "square", "product", "abs", "abs_scaled")
_NEEDS_B = ("abs_product", "product")
_OP_CODE = {name: code for code, name in enumerate(OPS)}

#: Elements per chunk of the torch reference (bounds its fp32 temporaries to 16 MiB each).
TORCH_CHUNK = 1 << 22
#: Elements per Triton program.
BLOCK = 2048


def _validate(
    op: str,
    score: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
) -> None:
    """Raise ValueError with a clear message for any argument the kernels cannot take."""
    if op not in _OP_CODE:
        raise ValueError(f"unknown accumulate op {op!r}: expected one of {', '.join(OPS)}")
    if score.dtype != torch.float32:
        raise ValueError(f"score must be float32, got {score.dtype}")
    if not score.is_contiguous():
        raise ValueError("score must be contiguous")
    tensors = {"a": a}
    if op in _NEEDS_B:
        if b is None:
            raise ValueError(f"op {op!r} needs a second input b")
        tensors["b"] = b
    elif b is not None:
        raise ValueError(f"op {op!r} takes no second input b")
    for name, t in tensors.items():
        if t.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16, float32 or float64, got {t.dtype}")
        if t.shape != score.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but score has shape {tuple(score.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != score.device:
            raise ValueError(f"{name} is on {t.device} but score is on {score.device}")
    if op == "abs_scaled":
        _validate_scales(a, row_scale, col_scale)
    elif row_scale is not None or col_scale is not None:
        raise ValueError(f"row_scale/col_scale are only used by op 'abs_scaled', not {op!r}")


def _validate_scales(a: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None) -> None:
    if (row_scale is None) == (col_scale is None):
        raise ValueError("op 'abs_scaled' needs exactly one of row_scale or col_scale")
    if a.dim() == 0:
        raise ValueError("op 'abs_scaled' needs a tensor with at least one dimension")
    cols = a.shape[-1]
    rows = a.numel() // cols if cols else 0
    name, scale, expected = ("row_scale", row_scale, rows) if row_scale is not None else ("col_scale", col_scale, cols)
    if scale.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {scale.dtype}")
    if scale.shape != (expected,):
        raise ValueError(f"{name} must have shape ({expected},), got {tuple(scale.shape)}")
    if not scale.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if scale.device != a.device:
        raise ValueError(f"{name} is on {scale.device} but a is on {a.device}")


# --------------------------------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _accumulate_kernel(
    score_ptr,
    a_ptr,
    b_ptr,
    scale_ptr,
    n,
    cols,
    OP: tl.constexpr,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """score[i] += f(a[i], b[i]) for one BLOCK of the flat buffers (op codes follow ``OPS``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = load_fp32(a_ptr, offs, mask, A_DTYPE)
    if OP == 0:
        update = tl.abs(a * load_fp32(b_ptr, offs, mask, B_DTYPE))
    elif OP == 1:
        update = a * a
    elif OP == 2:
        update = a * load_fp32(b_ptr, offs, mask, B_DTYPE)
    elif OP == 3:
        update = tl.abs(a)
    else:
        if ROW_SCALE:
            scale = tl.load(scale_ptr + offs // cols, mask=mask, other=0.0)
        else:
            scale = tl.load(scale_ptr + offs % cols, mask=mask, other=0.0)
        update = tl.abs(a) * scale
    score = tl.load(score_ptr + offs, mask=mask, other=0.0)
    tl.store(score_ptr + offs, score + update, mask=mask)


def accumulate_triton(
    op: str,
    score: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> None:
    """Triton implementation of :func:`accumulate_` (one launch, BLOCK elements per program)."""
    _validate(op, score, a, b, row_scale, col_scale)
    n = score.numel()
    if n == 0:
        return
    scale = row_scale if row_scale is not None else col_scale
    b_arg = b if b is not None else a
    _accumulate_kernel[(cdiv(n, BLOCK),)](
        score,
        kernel_view(a),
        kernel_view(b_arg),
        scale if scale is not None else score,
        n,
        a.shape[-1] if a.dim() else 1,
        OP=_OP_CODE[op],
        A_DTYPE=dtype_code(a.dtype),
        B_DTYPE=dtype_code(b_arg.dtype),
        ROW_SCALE=row_scale is not None,
        BLOCK=BLOCK,
        num_warps=8,
        enable_fp_fusion=False,
    )


# --------------------------------------------------------------------------------------------------------------------
# Torch reference


def _update_torch(op: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The eager fp32 update for one chunk (the formulas of the module docstring)."""
    af = a.float()
    if op == "abs_product":
        return (af * b.float()).abs_()  # in place: one temporary per chunk
    if op == "square":
        return af * af
    if op == "product":
        return af * b.float()
    return af.abs()


def _accumulate_scaled_torch(
    score: torch.Tensor,
    a: torch.Tensor,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    chunk: int,
) -> None:
    """score += |a| * s over the [rows, cols] view, a block of whole rows at a time."""
    cols = a.shape[-1]
    if cols == 0:
        return
    s2, a2 = score.view(-1, cols), a.reshape(-1, cols)
    rows_per_chunk = max(1, chunk // cols)
    for r0 in range(0, a2.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        scale = row_scale[rows, None] if row_scale is not None else col_scale[None, :]
        s2[rows] += a2[rows].float().abs() * scale


def accumulate_torch(
    op: str,
    score: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    chunk: int = TORCH_CHUNK,
) -> None:
    """Eager reference of :func:`accumulate_`, processed in chunks of at most ``chunk`` elements."""
    _validate(op, score, a, b, row_scale, col_scale)
    if op == "abs_scaled":
        _accumulate_scaled_torch(score, a, row_scale, col_scale, chunk)
        return
    s, x = score.view(-1), a.view(-1)
    y = b.view(-1) if b is not None else None
    for start in range(0, s.numel(), chunk):
        part = slice(start, start + chunk)
        s[part] += _update_torch(op, x[part], y[part] if y is not None else None)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point


def accumulate_(
    op: str,
    score: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> None:
    """Add ``op(a, b)`` to the fp32 buffer ``score`` in place (see the module docstring for the ops).

    ``score`` is contiguous float32 with the shape of ``a``; ``a`` and ``b`` are contiguous bf16/fp16/fp32/fp64
    (they may differ). Raises ValueError on an unknown op, a missing ``b``, mismatched shapes or dtypes.
    """
    impl = accumulate_triton if backend_for(score) == "triton" else accumulate_torch
    impl(op, score, a, b, row_scale=row_scale, col_scale=col_scale)
