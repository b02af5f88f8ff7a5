"""Counter-based random numbers: pure functions of (seed, stream, element index, draw).

Nothing here has state. A random number for element ``i`` of a tensor is ``hash(seed, stream, i, draw)``, so the same
weight gets the same noise or bit flip whatever else is selected, in whatever order, on whatever device, and a trial
can be replayed from its seed alone. ``stream`` separates tensors (``stream_id(name)``), ``draw`` separates the
independent numbers one element needs (e.g. "flip or not" and "which bit").

All integer work is done in int64 with every intermediate below 2^63, so the uniforms are bit-identical on CPU and
CUDA. The normal draws use float64 ``log``/``cos`` (Box-Muller) and are returned as float32; the libm of different
devices may differ in the last float64 ulp, which survives the rounding to float32 only in rare half-way cases.
"""

from __future__ import annotations

import math
import zlib

import torch

MASK32 = 0xFFFFFFFF

# lowbias32 (Chris Wellons' hash-prospector): x ^= x >> 16; x *= C1; x ^= x >> 15; x *= C2; x ^= x >> 16.
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
# A fixed odd constant that starts the absorption of (seed, stream, draw, index).
_START = 0x9E3779B9


def stream_id(name: str) -> int:
    """Stable 32-bit id of a tensor name (CRC-32 of its UTF-8 bytes; independent of Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8")) & MASK32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 ``x`` in [0, 2^32), without any intermediate reaching 2^63.

    With c = c_hi * 2^16 + c_lo: x*c = x*c_lo + (x*c_hi) * 2^16, and only the low 16 bits of x*c_hi survive the
    shift modulo 2^32. Each product is below 2^48.
    """
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 mixer on the low 32 bits of each int64 entry; returns int64 values in [0, 2^32)."""
    if x.dtype != torch.int64:
        raise ValueError(f"hash32 needs an int64 tensor, got {x.dtype}")
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """lowbias32 on a Python int (same function as :func:`hash32`, for the scalar part of the key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _C1) & MASK32
    x ^= x >> 15
    x = (x * _C2) & MASK32
    return x ^ (x >> 16)


def _key_prefix(seed: int, stream: int, draw: int) -> int:
    """Absorb the per-call scalars: seed (low and high 32 bits), stream and draw, one 32-bit word at a time."""
    seed &= (1 << 64) - 1
    h = _START
    for word in (seed & MASK32, seed >> 32, stream & MASK32, draw & MASK32):
        h = _hash32_int(h ^ word)
    return h


def random_bits(seed: int, stream: int, indices: torch.Tensor, draw: int) -> torch.Tensor:
    """32 random bits per index (int64 in [0, 2^32)): the prefix hash, then the index's low and high words."""
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {indices.dtype}")
    h = hash32((indices & MASK32) ^ _key_prefix(seed, stream, draw))
    return hash32(h ^ ((indices >> 32) & MASK32))


def uniform(seed: int, stream: int, indices: torch.Tensor, draw: int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1): (bits + 0.5) / 2^32, a pure function of its arguments."""
    return (random_bits(seed, stream, indices, draw).double() + 0.5) * (1.0 / 4294967296.0)


def normal(seed: int, stream: int, indices: torch.Tensor, draw: int = 0) -> torch.Tensor:
    """float32 standard normals by Box-Muller from the uniform draws ``2*draw`` and ``2*draw + 1`` (float64 math).

    z = sqrt(-2 ln u1) * cos(2 pi u2). With u1 >= 2^-33 the largest |z| is about 6.8.
    """
    u1 = uniform(seed, stream, indices, 2 * draw)
    u2 = uniform(seed, stream, indices, 2 * draw + 1)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).float()
