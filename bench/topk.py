"""topk: streaming radix select (Triton) vs torch.topk on the whole buffer and vs the chunked torch reference.

Minimal bytes: one read of the fp32 scores (4 B per element); the radix select actually reads them 5-6 times
(4 histogram passes, 1-2 compaction passes), so its GB/s column is "useful bytes per second".
Scores are uniform in [0, 1) (continuous: no cut ties, the single-compaction path) and, in the "ties" rows,
90% exact zeros with k falling inside the zeros (the ordered two-pass compaction).
"""

from __future__ import annotations

import torch

from bench.common import Context, gbps, median_ms, parse_shapes, shape_str

DEFAULT_SHAPES = [(1024, 1024), (4096, 4096), (14336, 4096), (128256, 4096)]
QUICK_SHAPES = [(64, 64), (256, 256)]
DEFAULT_KS = (1000, 100_000)
QUICK_KS = (10, 1000)


def _scores(shape: tuple[int, ...], ties: bool, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    score = torch.rand(shape, generator=g, device=device)
    if ties:
        score[torch.rand(shape, generator=g, device=device) < 0.9] = 0.0
    return score


def run(ctx: Context, sizes: str | None) -> list[dict]:
    from esa.kernels.topk import topk_torch, topk_triton

    shapes = parse_shapes(sizes, QUICK_SHAPES if ctx.quick else DEFAULT_SHAPES)
    rows = []
    for shape in shapes:
        for ties in (False, True):
            score = _scores(shape, ties, ctx.device)
            numel = score.numel()
            ks = QUICK_KS if ctx.quick else DEFAULT_KS
            # With ties, k = 15% of the scores: past the 10% nonzeros, so the cut falls inside the zeros.
            for k in sorted({min(k, numel) for k in ks}) if not ties else [numel * 3 // 20]:
                radix_ms = median_ms(lambda: topk_triton(score, k), ctx)
                torch_ms = median_ms(lambda: torch.topk(score.view(-1), k), ctx)
                ref_ms = median_ms(lambda: topk_torch(score, k), ctx)
                rate = gbps(4 * numel, radix_ms)
                rows.append(
                    {
                        "shape": shape_str(shape),
                        "scores": "90% zeros" if ties else "uniform",
                        "k": k,
                        "triton_ms": radix_ms,
                        "triton_GBps": rate,
                        "frac_peak": rate / ctx.peak_gbps if ctx.peak_gbps else float("nan"),
                        "torch_topk_ms": torch_ms,
                        "speedup": torch_ms / radix_ms,
                        "reference_ms": ref_ms,
                    }
                )
            del score
            if ctx.cuda:
                torch.cuda.empty_cache()
    return rows
