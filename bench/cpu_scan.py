"""How fast a CPU reads a score buffer for selection and statistics (:func:`esa.scorescan.scan`), and how the float64
power sums are best taken on a CPU.

    python -m bench.cpu_scan [--elements 536870912] [--threads 2,16]

For each thread count: the achieved read bandwidth (4 bytes per float32 score) of a plain ``amax`` (what one read
of the buffer costs), of the block extrema alone (``amax`` + ``amin`` per block of 256), of the whole scan with the
power sums, and of three ways to take the four float64 power sums of a chunk held in cache — the one
:mod:`esa.kernels.moments` uses (row sums and a matrix-vector product over the pair y, y²), two ``torch.dot`` calls,
and elementwise products with sums — at two chunk sizes per thread. Writes bench/out/cpu_scan.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _pair_mv(y: torch.Tensor, sq: torch.Tensor, pair: torch.Tensor, sums: torch.Tensor) -> None:
    sums[:2] += pair.sum(dim=1)
    sums[2:] += torch.mv(pair, sq)


def _dots(y: torch.Tensor, sq: torch.Tensor, pair: torch.Tensor, sums: torch.Tensor) -> None:
    sums[0] += y.sum()
    sums[1] += sq.sum()
    sums[2] += torch.dot(sq, y)
    sums[3] += torch.dot(sq, sq)


def _products(y: torch.Tensor, sq: torch.Tensor, pair: torch.Tensor, sums: torch.Tensor) -> None:
    sums[0] += y.sum()
    sums[1] += sq.sum()
    sums[2] += torch.mul(sq, y, out=y).sum()
    sums[3] += torch.mul(sq, sq, out=sq).sum()


VARIANTS = {"pair_mv": _pair_mv, "dots": _dots, "products": _products}


def power_sums_variant(flat: torch.Tensor, shift: float, per_thread: int, variant) -> list[float]:
    step = per_thread * torch.get_num_threads()
    work = torch.empty((2, min(step, flat.numel())), dtype=torch.float64)
    sums = torch.zeros(4, dtype=torch.float64)
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        pair = work[:, : chunk.numel()]
        pair[0].copy_(chunk).sub_(shift)
        torch.mul(pair[0], pair[0], out=pair[1])
        variant(pair[0], pair[1], pair, sums)
    return sums.tolist()


def _rate(fn, n_bytes: int) -> float:
    fn()  # warm-up (pages, allocator)
    start = time.perf_counter()
    fn()
    return n_bytes / (time.perf_counter() - start) / 1e9


def run(elements: int, threads: list[int]) -> dict:
    from esa import scorescan

    x = torch.rand(elements, generator=torch.Generator().manual_seed(0)) ** 4
    n_bytes = 4 * elements
    out = {"elements": elements, "by_threads": {}}
    for t in threads:
        torch.set_num_threads(t)
        rows = x.view(-1, scorescan.BLOCK)
        row = {
            "amax_GBps": _rate(lambda: x.amax(), n_bytes),
            "block_extrema_GBps": _rate(lambda: scorescan.scan(x), n_bytes),
            "scan_with_moments_GBps": _rate(lambda: scorescan.scan(x, shift=0.1), n_bytes),
            "block_amax_amin_GBps": _rate(lambda: (rows.amax(1), rows.amin(1)), n_bytes),
        }
        for per_thread in (1 << 16, 1 << 17):
            for name, variant in VARIANTS.items():
                row[f"{name}_{per_thread >> 10}k_GBps"] = _rate(
                    lambda: power_sums_variant(x, 0.1, per_thread, variant), n_bytes)
        out["by_threads"][t] = row
        print(f"{t} threads: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 29)
    parser.add_argument("--threads", default="2")
    args = parser.parse_args(argv)
    result = run(args.elements, [int(t) for t in args.threads.split(",")])
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "cpu_scan.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
