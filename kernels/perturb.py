"""In-place perturbation of selected weight elements, with bit-exact restoration.

``apply_perturbation_(weight, indices, kind, ...)`` rewrites ``weight.view(-1)[indices]`` and returns the original
bit patterns of those elements (int16 for bf16/fp16, int32 for fp32); ``restore_(weight, indices, bits)`` writes
them back, so a perturbed model returns to exactly its former bytes.

Kinds (w is an element, all arithmetic in fp32, the result rounded to the weight dtype to nearest even):

- ``zero``: w <- +0.0.
- ``sign_flip``: w <- -s*w. For s == 1 this is done as an XOR of the sign bit (exact for every value, NaN included,
  and immune to subnormal flushing); otherwise fp32(w) * fp32(-s).
- ``gauss_noise``: w <- w + s*|w|*eps with eps ~ N(0, 1) given per element ("s = 0.02 is 2% relative noise"); the
  evaluation order is ((s*|w|)*eps) + w, as in the eager expression, and the Triton kernel is launched with fp
  contraction disabled so that no FMA changes the rounding.
- ``bit_flip``: bits <- bits XOR mask, one mask per element (zero: not flipped), see :func:`bit_flip_masks`.

Preconditions: ``weight`` contiguous; ``indices`` int64, unique (otherwise the saved "original" of a repeated element
may already be perturbed), in range (checked), on the weight's device, in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from esa.kernels import rng
from esa.kernels.dispatch import backend_for, cdiv, tl, triton
from esa.kernels.floatbits import FLOAT_DTYPES, bits_to_fp32, dtype_code, fp32_to_bits, int_view_dtype

KINDS = ("zero", "sign_flip", "gauss_noise", "bit_flip")
BIT_CLASSES = ("any", "sign", "exponent", "mantissa")

# Kernel codes. sign_flip has two: an exact sign-bit XOR for scale == 1, fp32 multiplication otherwise.
_ZERO, _SIGN_BIT, _SIGN_SCALE, _GAUSS, _XOR = range(5)

#: Selected elements per Triton program.
BLOCK = 1024

# (sign, exponent, mantissa) widths of each storage format.
_LAYOUT = {torch.bfloat16: (1, 8, 7), torch.float16: (1, 5, 10), torch.float32: (1, 8, 23)}


def bit_layout(dtype: torch.dtype) -> dict[str, list[int]]:
    """Bit positions (0 = least significant, ascending) of the sign, exponent and mantissa fields, and of "any".

    bf16: sign 15, exponent 14..7, mantissa 6..0; fp16: sign 15, exponent 14..10, mantissa 9..0;
    fp32: sign 31, exponent 30..23, mantissa 22..0.
    """
    if dtype not in _LAYOUT:
        raise ValueError(f"unsupported dtype {dtype}: expected one of bfloat16, float16, float32")
    _, exponent, mantissa = _LAYOUT[dtype]
    width = 1 + exponent + mantissa
    return {
        "sign": [width - 1],
        "exponent": list(range(mantissa, mantissa + exponent)),
        "mantissa": list(range(mantissa)),
        "any": list(range(width)),
    }


def eligible_bits(dtype: torch.dtype, bits: str | Sequence[int]) -> list[int]:
    """The sorted bit positions that ``bits`` ("any", "sign", "exponent", "mantissa" or explicit positions) allows."""
    layout = bit_layout(dtype)
    if isinstance(bits, str):
        if bits not in BIT_CLASSES:
            raise ValueError(f"bits={bits!r}: expected one of {', '.join(BIT_CLASSES)} or a list of bit positions")
        return layout[bits]
    positions = list(bits)
    width = len(layout["any"])
    if not positions:
        raise ValueError("bits: the list of bit positions is empty")
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < width:
            raise ValueError(f"bit position {p!r} is not an integer in [0, {width - 1}] for {dtype}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"bits: repeated bit positions in {positions}")
    return sorted(positions)


def bit_flip_masks(
    seed: int,
    stream: int,
    indices: torch.Tensor,
    dtype: torch.dtype,
    prob: float,
    bits: str | list[int],
) -> torch.Tensor:
    """XOR masks for ``bit_flip``: each element, with probability ``prob``, gets one eligible bit, uniformly chosen.

    Element i flips iff uniform(seed, stream, i, draw=0) < prob; the bit is eligible[floor(u * n_eligible)] with
    u = uniform(seed, stream, i, draw=1). Returns int16 (bf16/fp16) or int32 (fp32) masks on the indices' device;
    the sign bit appears as the negative value -2^15 / -2^31.
    """
    if not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0):
        raise ValueError(f"prob must be a probability in [0, 1], got {prob!r}")
    eligible = eligible_bits(dtype, bits)
    width = len(bit_layout(dtype)["any"])
    flip = rng.uniform(seed, stream, indices, 0) < prob
    choice = (rng.uniform(seed, stream, indices, 1) * len(eligible)).long().clamp_(max=len(eligible) - 1)
    position = torch.tensor(eligible, dtype=torch.int64, device=indices.device)[choice]
    mask = torch.where(flip, torch.ones_like(position) << position, torch.zeros_like(position))
    mask = torch.where(mask >= 1 << (width - 1), mask - (1 << width), mask)  # two's complement of the top bit
    return mask.to(int_view_dtype(dtype))


def gaussian_noise(seed: int, stream: int, indices: torch.Tensor) -> torch.Tensor:
    """fp32 N(0, 1) per index, a pure function of (seed, stream, index): ``rng.normal(seed, stream, indices)``."""
    return rng.normal(seed, stream, indices)


def _validate(
    weight: torch.Tensor,
    indices: torch.Tensor,
    kind: str,
    scale: float,
    noise: torch.Tensor | None,
    xor_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError for anything the kernels cannot take (including out-of-range indices)."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}: expected one of {', '.join(KINDS)}")
    _validate_target(weight, indices)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    extras = {"noise": (noise, "gauss_noise", torch.float32), "xor_mask": (xor_mask, "bit_flip", None)}
    for name, (value, owner, dtype) in extras.items():
        if kind != owner:
            if value is not None:
                raise ValueError(f"{name} is only used by kind {owner!r}, not {kind!r}")
            continue
        if value is None:
            raise ValueError(f"kind {kind!r} needs {name}")
        dtype = dtype or int_view_dtype(weight.dtype)
        if value.dtype != dtype or value.shape != indices.shape or value.device != weight.device:
            raise ValueError(
                f"{name} must be {dtype} of shape {tuple(indices.shape)} on {weight.device}, "
                f"got {value.dtype} {tuple(value.shape)} on {value.device}"
            )


def _validate_target(weight: torch.Tensor, indices: torch.Tensor) -> None:
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be bfloat16, float16 or float32, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D int64 tensor, got {indices.dtype} with shape {tuple(indices.shape)}")
    if indices.device != weight.device:
        raise ValueError(f"indices are on {indices.device} but weight is on {weight.device}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= weight.numel()):
        raise ValueError(f"indices out of range for a weight of {weight.numel()} elements")


def _kernel_code(kind: str, scale: float) -> int:
    if kind == "sign_flip":
        return _SIGN_BIT if scale == 1.0 else _SIGN_SCALE
    return {"zero": _ZERO, "gauss_noise": _GAUSS, "bit_flip": _XOR}[kind]


def _bit_view(weight: torch.Tensor) -> torch.Tensor:
    """The flat integer view of ``weight``'s storage (writes through it modify ``weight``)."""
    return weight.view(int_view_dtype(weight.dtype)).view(-1)


# --------------------------------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _perturb_kernel(
    bits_ptr,
    idx_ptr,
    orig_ptr,
    noise_ptr,
    xor_ptr,
    n,
    scale,
    KIND: tl.constexpr,
    DTYPE: tl.constexpr,
    SIGN_BIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Gather the selected elements' bits, save them to orig, write the perturbed bits back (codes: see _ZERO...)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    bits = tl.load(bits_ptr + idx, mask=mask, other=0)
    tl.store(orig_ptr + offs, bits, mask=mask)
    if KIND == 0:
        new = tl.zeros_like(bits)
    elif KIND == 1:
        new = (bits.to(tl.int64) ^ SIGN_BIT).to(bits.dtype)
    elif KIND == 2:
        new = fp32_to_bits(bits_to_fp32(bits, DTYPE) * -scale, DTYPE)
    elif KIND == 3:
        w = bits_to_fp32(bits, DTYPE)
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        new = fp32_to_bits(w + scale * tl.abs(w) * eps, DTYPE)
    else:
        new = bits ^ tl.load(xor_ptr + offs, mask=mask, other=0)
    tl.store(bits_ptr + idx, new, mask=mask)


@triton.jit
def _restore_kernel(bits_ptr, idx_ptr, orig_ptr, n, BLOCK: tl.constexpr):
    """bits[idx[i]] = orig[i]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.store(bits_ptr + idx, tl.load(orig_ptr + offs, mask=mask), mask=mask)


def apply_perturbation_triton(
    weight: torch.Tensor,
    indices: torch.Tensor,
    kind: str,
    *,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    xor_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`apply_perturbation_` (one launch: gather, save, compute, scatter)."""
    _validate(weight, indices, kind, scale, noise, xor_mask)
    bits = _bit_view(weight)
    original = torch.empty(indices.shape, dtype=bits.dtype, device=weight.device)
    n = indices.numel()
    if n == 0:
        return original
    _perturb_kernel[(cdiv(n, BLOCK),)](
        bits,
        indices,
        original,
        noise if noise is not None else original,
        xor_mask if xor_mask is not None else original,
        n,
        float(scale),
        KIND=_kernel_code(kind, scale),
        DTYPE=dtype_code(weight.dtype),
        SIGN_BIT=1 << (bits.element_size() * 8 - 1),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    return original


def restore_triton(weight: torch.Tensor, indices: torch.Tensor, original_bits: torch.Tensor) -> None:
    """Triton implementation of :func:`restore_`."""
    _validate_restore(weight, indices, original_bits)
    n = indices.numel()
    if n:
        _restore_kernel[(cdiv(n, BLOCK),)](_bit_view(weight), indices, original_bits, n, BLOCK=BLOCK)


# --------------------------------------------------------------------------------------------------------------------
# Torch reference


def _perturbed_bits_torch(
    kind: str,
    original: torch.Tensor,
    dtype: torch.dtype,
    scale: float,
    noise: torch.Tensor | None,
    xor_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The new bit patterns of the gathered elements (eager form of the module docstring's formulas)."""
    code = _kernel_code(kind, scale)
    if code == _ZERO:
        return torch.zeros_like(original)
    if code == _SIGN_BIT:
        return original ^ -(1 << (original.element_size() * 8 - 1))
    if code == _XOR:
        return original ^ xor_mask
    w = original.view(dtype).float()
    if code == _SIGN_SCALE:
        new = w * -scale
    else:
        new = w + scale * w.abs() * noise
    return new.to(dtype).view(original.dtype)


def apply_perturbation_torch(
    weight: torch.Tensor,
    indices: torch.Tensor,
    kind: str,
    *,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    xor_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference of :func:`apply_perturbation_`: gather on the integer view, compute, scatter."""
    _validate(weight, indices, kind, scale, noise, xor_mask)
    bits = _bit_view(weight)
    original = bits[indices]
    bits[indices] = _perturbed_bits_torch(kind, original, weight.dtype, scale, noise, xor_mask)
    return original


def _validate_restore(weight: torch.Tensor, indices: torch.Tensor, original_bits: torch.Tensor) -> None:
    _validate_target(weight, indices)
    int_dtype = int_view_dtype(weight.dtype)
    if original_bits.dtype != int_dtype or original_bits.shape != indices.shape:
        raise ValueError(
            f"original_bits must be {int_dtype} of shape {tuple(indices.shape)}, "
            f"got {original_bits.dtype} {tuple(original_bits.shape)}"
        )
    if original_bits.device != weight.device:
        raise ValueError(f"original_bits are on {original_bits.device} but weight is on {weight.device}")


def restore_torch(weight: torch.Tensor, indices: torch.Tensor, original_bits: torch.Tensor) -> None:
    """Eager reference of :func:`restore_`."""
    _validate_restore(weight, indices, original_bits)
    _bit_view(weight)[indices] = original_bits


# --------------------------------------------------------------------------------------------------------------------
# Public entry points


def apply_perturbation_(
    weight: torch.Tensor,
    indices: torch.Tensor,
    kind: str,
    *,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    xor_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Perturb ``weight.view(-1)[indices]`` in place; return their original bit patterns (see the module docstring).

    ``noise`` (fp32, one per index) is required for ``gauss_noise``, ``xor_mask`` (the weight's integer view dtype,
    one per index) for ``bit_flip``. Raises ValueError on a bad kind, dtype, shape or out-of-range index.
    """
    impl = apply_perturbation_triton if backend_for(weight) == "triton" else apply_perturbation_torch
    return impl(weight, indices, kind, scale=scale, noise=noise, xor_mask=xor_mask)


def restore_(weight: torch.Tensor, indices: torch.Tensor, original_bits: torch.Tensor) -> None:
    """Write the bit patterns saved by :func:`apply_perturbation_` back into ``weight`` (bit-exact)."""
    impl = restore_triton if backend_for(weight) == "triton" else restore_torch
    impl(weight, indices, original_bits)
