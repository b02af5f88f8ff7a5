"""Perturb selected weights in place for the duration of a ``with`` block, then restore them bit-exactly.

Kinds (see :mod:`esa.kernels.perturb` for the arithmetic): ``zero`` (w ← 0), ``sign_flip`` (w ← −s·w),
``gauss_noise`` (w ← w + s·|w|·ε, ε ~ N(0, 1): s = 0.02 is 2% relative noise), ``bit_flip`` (with probability p,
one bit of the stored representation — bf16/fp16/fp32 as loaded — chosen uniformly among the eligible ones).
Random draws are counter-based: ε and the flipped bit of a weight depend only on (seed, tensor name, flat index),
so the same seed gives the same perturbation on every run, whatever else is selected.

Restoration keeps the original bit patterns of the touched elements and writes them back in ``finally``: an
exception or Ctrl-C inside the block leaves the model as it was. Each touched tensor's fingerprint
(:mod:`esa.fingerprint`) is compared before and after; a mismatch raises at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from esa.config import validate_perturbation
from esa.errors import EsaError
from esa.fingerprint import tensor_fingerprint
from esa.kernels import apply_perturbation_, bit_flip_masks, gaussian_noise, restore_, stream_id
from esa.kernels.perturb import BIT_CLASSES, eligible_bits
from esa.selection import WeightSet


@dataclass(frozen=True)
class PerturbSpec:
    kind: str
    scale: float = 1.0  # sign_flip: w ← −scale·w; gauss_noise: relative noise level
    prob: float = 1.0  # bit_flip: probability that a selected weight gets one bit flipped
    bits: str = "any"  # bit_flip: any | sign | exponent | mantissa | comma-separated positions (0 = LSB)

    def bit_positions(self) -> str | list[int]:
        if self.bits in BIT_CLASSES:
            return self.bits
        try:
            return [int(b) for b in self.bits.split(",") if b.strip()]
        except ValueError:
            raise EsaError(f"--bits {self.bits!r}: use any, sign, exponent, mantissa or positions like 14,13") from None


def validate_spec(spec: PerturbSpec, dtype: torch.dtype | None = None) -> None:
    """The configuration's checks (:func:`esa.config.validate_perturbation`), and with ``dtype`` the bits."""
    validate_perturbation(spec.kind, spec.scale, spec.prob, spec.bits)
    if spec.kind == "bit_flip" and dtype is not None:
        try:
            eligible_bits(dtype, spec.bit_positions())
        except ValueError as e:
            raise EsaError(f"--bits: {e}") from None


@dataclass
class Applied:
    """What a perturbation did: touched tensors and, for bit_flip, how many bits were flipped."""

    tensors: list[str] = field(default_factory=list)
    n_weights: int = 0
    bits_flipped: int = 0


@contextlib.contextmanager
def perturbed(params: dict[str, torch.Tensor], weights: WeightSet, spec: PerturbSpec, seed: int,
              *, verify: bool = True) -> Iterator[Applied]:
    """Apply ``spec`` to ``weights`` in place; restore bit-exactly on exit (also on error or Ctrl-C)."""
    groups = weights.by_tensor()
    missing = [n for n in groups if n not in params]
    if missing:
        raise EsaError(f"the model has no tensor named {missing[0]!r} (from the weight set)")
    offloaded = [n for n in groups if params[n].device.type == "meta"]
    if offloaded:
        raise EsaError(f"{offloaded[0]} is offloaded (on the meta device): perturb the copies that "
                       "esa.placement.weight_tensors(model) gives")
    before = {name: tensor_fingerprint(params[name]) for name in groups} if verify else {}
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    applied = Applied()
    try:
        with torch.no_grad():
            for name, idx in groups.items():
                w = params[name].data  # on its own device: a split model is perturbed where each tensor lives
                idx = idx.to(w.device)
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.numel()):
                    raise EsaError(f"flat index out of range for {name} ({w.numel()} elements)")
                kwargs = {}
                stream = stream_id(name)
                if spec.kind == "gauss_noise":
                    kwargs["noise"] = gaussian_noise(seed, stream, idx)
                elif spec.kind == "bit_flip":
                    mask = bit_flip_masks(seed, stream, idx, w.dtype, spec.prob, spec.bit_positions())
                    kwargs["xor_mask"] = mask
                    applied.bits_flipped += int((mask != 0).sum())
                original = apply_perturbation_(w, idx, spec.kind, scale=spec.scale, **kwargs)
                saved.append((w, idx, original))
                applied.tensors.append(name)
                applied.n_weights += int(idx.numel())
        yield applied
    finally:
        with torch.no_grad():
            for w, idx, original in reversed(saved):
                restore_(w, idx, original)
        for name, fp in before.items():
            if tensor_fingerprint(params[name]) != fp:
                raise RuntimeError(f"restoring {name} failed: its bits differ from before the perturbation")
