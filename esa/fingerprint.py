"""Fast, exact-change-detecting fingerprints of tensors, computed where the tensor lives.

Hashing every weight with SHA-256 on the host costs seconds per GB; restoring a perturbed model is verified on
every trial, so esa uses a modular checksum computed on the tensor's own device instead:

    F_l(t) = Σ_i limb_l(bits_i) · (i mod (P−1) + 1)   (mod P),   P = 2^31 − 1 (prime),

for each 16-bit limb ``l`` of the element's bit pattern. A change of any single element changes some limb by
0 < |Δ| < 2^16 < P, and Δ · m_i ≢ 0 (mod P) because P is prime and m_i ∈ [1, P−1]: a single changed element is
always detected, and arbitrary changes are missed with probability about P^-(limbs). Every intermediate stays
below 2^63, so the int64 arithmetic never overflows on any device. The digest mixes in dtype and shape.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_P = (1 << 31) - 1
_ROW = 1 << 16  # row sums of limb·m stay < 2^16 · 2^16 · 2^31 = 2^63
_CHUNK = 1 << 22

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _limb_sums(t: torch.Tensor) -> list[int]:
    flat = t.detach().reshape(-1)
    size = flat.element_size()
    bits = flat.view(_INT_VIEW[size]) if flat.dtype != _INT_VIEW[size] else flat
    n_limbs = max(1, size // 2)
    sums = [0] * n_limbs
    for start in range(0, flat.numel(), _CHUNK):
        x = bits[start : start + _CHUNK].to(torch.int64)
        count = x.numel()
        pos = torch.arange(start, start + count, device=x.device, dtype=torch.int64)
        m = pos % (_P - 1) + 1
        pad = (-count) % _ROW
        for limb in range(n_limbs):
            # Arithmetic shift then mask extracts the 16-bit limb for signed views too.
            part = (x >> (16 * limb)) & 0xFFFF if size > 1 else x & 0xFF
            prod = part * m
            if pad:
                prod = torch.nn.functional.pad(prod, (0, pad))
            rows = prod.view(-1, _ROW).sum(dim=1) % _P
            sums[limb] = (sums[limb] + int(rows.sum().item())) % _P
    return sums


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Hex digest identifying ``t``'s exact bit pattern, dtype and shape (see the module docstring)."""
    sums = _limb_sums(t)
    text = f"{t.dtype}|{tuple(t.shape)}|{','.join(map(str, sums))}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def named_fingerprints(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {name: tensor_fingerprint(t) for name, t in named_tensors}


def model_fingerprint(model: torch.nn.Module) -> str:
    """One digest over every parameter (by name), e.g. to record which weights a run measured; each is hashed on
    its own device (a split model's too; offloaded weights through the copies accelerate keeps)."""
    from esa.placement import weight_tensors

    h = hashlib.sha256()
    for name, fp in named_fingerprints(weight_tensors(model, writable=False).items()).items():
        h.update(f"{name}={fp};".encode())
    return h.hexdigest()
