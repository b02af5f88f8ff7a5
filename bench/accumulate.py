"""accumulate_: fused Triton kernel vs the plain eager expression, bf16 inputs into an fp32 score.

Minimal bytes per element: each bf16 input read once (2 B), the fp32 score read and written (4 + 4 B); abs_scaled
also reads its scale vector (counted once).
"""

from __future__ import annotations

import torch

from bench.common import Context, gbps, median_ms, parse_shapes, shape_str

DEFAULT_SHAPES = [(1024, 1024), (4096, 4096), (14336, 4096), (128256, 4096)]
QUICK_SHAPES = [(64, 64), (256, 256)]
OPS = ("abs_product", "square", "product", "abs", "abs_scaled")


def _eager(op: str, score: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
    """The eager form each op replaces (what a scorer would write without the kernel)."""
    if op == "abs_product":
        return lambda: score.add_((a.float() * b.float()).abs())
    if op == "square":
        return lambda: score.add_(a.float() * a.float())
    if op == "product":
        return lambda: score.add_(a.float() * b.float())
    if op == "abs":
        return lambda: score.add_(a.float().abs())
    return lambda: score.add_(a.float().abs() * scale)


def _min_bytes(op: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    inputs = 2 if op in ("abs_product", "product") else 1
    extra = 4 * shape[-1] if op == "abs_scaled" else 0
    return numel * (2 * inputs + 8) + extra


def run(ctx: Context, sizes: str | None) -> list[dict]:
    from esa.kernels.accumulate import accumulate_triton

    shapes = parse_shapes(sizes, QUICK_SHAPES if ctx.quick else DEFAULT_SHAPES)
    rows = []
    for shape in shapes:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        a = torch.randn(shape, generator=g, device=ctx.device).to(torch.bfloat16)
        b = torch.randn(shape, generator=g, device=ctx.device).to(torch.bfloat16)
        scale = torch.rand(shape[-1], generator=g, device=ctx.device)
        score = torch.zeros(shape, device=ctx.device)
        for op in OPS:
            b_arg = b if op in ("abs_product", "product") else None
            kwargs = {"col_scale": scale} if op == "abs_scaled" else {}
            fused_ms = median_ms(lambda: accumulate_triton(op, score, a, b_arg, **kwargs), ctx)
            eager_ms = median_ms(_eager(op, score, a, b, scale), ctx)
            rate = gbps(_min_bytes(op, shape), fused_ms)
            rows.append(
                {
                    "op": op,
                    "shape": shape_str(shape),
                    "triton_ms": fused_ms,
                    "triton_GBps": rate,
                    "frac_peak": rate / ctx.peak_gbps if ctx.peak_gbps else float("nan"),
                    "eager_ms": eager_ms,
                    "eager_GBps": gbps(_min_bytes(op, shape), eager_ms),
                    "speedup": eager_ms / fused_ms,
                }
            )
        del a, b, score
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows
