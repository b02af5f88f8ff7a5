"""Bit-level helpers shared by the kernels: integer views of float dtypes and exact bf16 <-> fp32 conversions.

The Triton helpers convert bf16 with integer arithmetic instead of ``x.to(tl.bfloat16)``:

- bf16 -> fp32 is exact: the bf16 bits are the top 16 bits of the fp32 value, ``fp32_bits = bf16_bits << 16``.
- fp32 -> bf16 rounds to nearest, ties to even: ``bf16_bits = (b + 0x7FFF + ((b >> 16) & 1)) >> 16`` for finite and
  infinite ``b`` (overflow correctly rounds up to inf, subnormals round like normal numbers because bf16 and fp32
  share the exponent range); NaN becomes 0x7FFF, the canonical NaN of the CUDA conversion. This is the rounding of
  c10::BFloat16, so the kernels match torch bit for bit on every non-NaN value. (NaN payloads are not portable
  anyway: torch's CPU conversion gives 0xFFFF, its CUDA conversion 0x7FFF.)

On a GPU both are what the hardware conversion does anyway; the reason to spell them out is Triton's CPU
interpreter (triton 3.9), whose fp32 -> bf16 cast truncates instead of rounding and mishandles subnormals.
"""

from __future__ import annotations

import torch

from esa.kernels.dispatch import tl, triton

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Inputs accumulate_ also takes: float64 (e.g. a float64 model in exactness tests) is rounded to fp32 on load.
INPUT_DTYPES = (*FLOAT_DTYPES, torch.float64)

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# Small integer codes passed to kernels as constexpr arguments.
BF16, FP16, FP32, FP64 = 0, 1, 2, 3
_DTYPE_CODE = {torch.bfloat16: BF16, torch.float16: FP16, torch.float32: FP32, torch.float64: FP64}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the same width as float ``dtype`` (int16 for bf16/fp16, int32 for fp32)."""
    try:
        return _INT_VIEW[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: expected one of bfloat16, float16, float32") from None


def dtype_code(dtype: torch.dtype) -> int:
    """The constexpr code (BF16, FP16, FP32, FP64) that kernels use to pick a conversion."""
    try:
        return _DTYPE_CODE[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: expected one of bfloat16, float16, float32, float64") from None


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel receives for a float tensor: bf16 as its int16 bit view (see the module docstring)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def bf16_bits_to_fp32(bits):
    """int16 bf16 bit patterns -> exact fp32 values."""
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits(x):
    """fp32 values -> int16 bf16 bit patterns, round to nearest even (NaN -> 0x7FFF)."""
    b = x.to(tl.int32, bitcast=True)
    # Computed in int64 so that b + 0x7FFF cannot overflow; the shift keeps the low 16 bits of the result.
    rounded = (b.to(tl.int64) + 0x7FFF + ((b >> 16) & 1)) >> 16
    is_nan = (b & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FFF, rounded).to(tl.int16)


@triton.jit
def load_fp32(ptr, offs, mask, DTYPE: tl.constexpr):
    """Load elements of a bf16 (int16 bit view), fp16, fp32 or fp64 tensor as fp32 (exact, fp64 rounded to nearest)."""
    if DTYPE == 0:
        x = bf16_bits_to_fp32(tl.load(ptr + offs, mask=mask, other=0))
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def bits_to_fp32(bits, DTYPE: tl.constexpr):
    """Stored bit patterns (int16 for bf16/fp16, int32 for fp32) -> exact fp32 values."""
    if DTYPE == 0:
        x = bf16_bits_to_fp32(bits)
    elif DTYPE == 1:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def fp32_to_bits(x, DTYPE: tl.constexpr):
    """fp32 values -> bit patterns of the storage dtype, round to nearest even."""
    if DTYPE == 0:
        bits = fp32_to_bf16_bits(x)
    elif DTYPE == 1:
        bits = x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
    return bits
