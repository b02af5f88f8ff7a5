"""apply_perturbation_ + restore_ of m selected elements of a 4096x14336 bf16 weight: Triton vs torch index ops.

One timed iteration = apply (gather, save, perturb, scatter) + restore (scatter the saved bits back), including the
index-range validation both paths share. Minimal bytes per selected element: apply reads the index (8 B), the
weight (2 B) and the noise/mask (4/2 B; none for zero), writes the saved bits (2 B) and the weight (2 B); restore
reads the index and the saved bits (8 + 2 B) and writes the weight (2 B). The accesses are scattered, so each
element really costs a 32-byte memory sector: read the GB/s as "useful bytes", not as a bandwidth bound.
"""

from __future__ import annotations

import torch

from bench.common import Context, gbps, median_ms, parse_shapes, shape_str

DEFAULT_WEIGHT = (4096, 14336)
QUICK_WEIGHT = (256, 512)
DEFAULT_COUNTS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_COUNTS = (100, 1_000)
KINDS = ("zero", "gauss_noise", "bit_flip")
_EXTRA_BYTES = {"zero": 0, "gauss_noise": 4, "bit_flip": 2}


def run(ctx: Context, sizes: str | None) -> list[dict]:
    """``sizes`` overrides the selected-element counts ('1000,100000')."""
    from esa.kernels import bit_flip_masks, gaussian_noise
    from esa.kernels.perturb import (
        apply_perturbation_torch,
        apply_perturbation_triton,
        restore_torch,
        restore_triton,
    )

    shape = QUICK_WEIGHT if ctx.quick else DEFAULT_WEIGHT
    counts = [s[0] for s in parse_shapes(sizes, [(c,) for c in (QUICK_COUNTS if ctx.quick else DEFAULT_COUNTS)])]
    weight = torch.randn(shape, device=ctx.device).to(torch.bfloat16)
    rows = []
    for count in counts:
        count = min(count, weight.numel())
        g = torch.Generator(device=ctx.device).manual_seed(count)
        idx = torch.randperm(weight.numel(), generator=g, device=ctx.device)[:count]
        args = {
            "zero": {},
            "gauss_noise": {"scale": 0.02, "noise": gaussian_noise(0, 1, idx)},
            "bit_flip": {"xor_mask": bit_flip_masks(0, 1, idx, torch.bfloat16, 0.5, "any")},
        }
        for kind in KINDS:

            def fused(kind=kind):
                restore_triton(weight, idx, apply_perturbation_triton(weight, idx, kind, **args[kind]))

            def eager(kind=kind):
                restore_torch(weight, idx, apply_perturbation_torch(weight, idx, kind, **args[kind]))

            fused_ms, eager_ms = median_ms(fused, ctx), median_ms(eager, ctx)
            nbytes = count * (8 + 2 + _EXTRA_BYTES[kind] + 2 + 2 + 8 + 2 + 2)
            rate = gbps(nbytes, fused_ms)
            rows.append(
                {
                    "kind": kind,
                    "shape": shape_str(shape),
                    "selected": count,
                    "triton_ms": fused_ms,
                    "triton_GBps": rate,
                    "frac_peak": rate / ctx.peak_gbps if ctx.peak_gbps else float("nan"),
                    "torch_ms": eager_ms,
                    "speedup": eager_ms / fused_ms,
                }
            )
    return rows
