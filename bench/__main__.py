"""Benchmarks: ``python -m bench [accumulate] [topk] [perturb] [end_to_end] [--quick] [--sizes ...]`` from the repo
root; ``python -m bench gpu-check`` runs the one-command GPU measurement of :mod:`bench.gpu_check`.

Each family prints a table (median time, achieved GB/s over the minimal bytes moved, fraction of the peak measured
by a device-to-device copy in the same run, speedup over the eager torch form) and writes bench/out/<family>.csv
and .json. Without CUDA the Triton kernels run in Triton's CPU interpreter: the numbers then only show that the
benchmarks run, not how fast the kernels are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

FAMILIES = ("accumulate", "topk", "perturb", "end_to_end")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help=f"families to run: {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--only", help="comma-separated families, an alternative to the positional form")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU / smoke test)")
    parser.add_argument(
        "--sizes",
        help="override sizes: shapes like 4096x4096,14336x4096 (accumulate, topk) or selected counts like "
        "1000,100000 (perturb)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats on CPU (CUDA uses do_bench)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default=None, help="end_to_end: model id or directory (default: embedded tiny)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-check"]:
        from bench.gpu_check import main as gpu_check

        return gpu_check(argv[1:])
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        # Must be set before esa.kernels is imported: Triton decides at decoration time whether to interpret.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    families = list(args.families) or ([f.strip() for f in args.only.split(",")] if args.only else list(FAMILIES))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2

    from bench import accumulate, common, end_to_end, perturb, topk

    ctx = common.Context(device=device, quick=args.quick, repeats=args.repeats or (3 if args.quick else 5))
    ctx.meta = common.run_metadata(device)
    print(f"device: {ctx.meta['device']}")
    meta = ctx.meta
    print(f"torch {meta['torch']}, triton {meta['triton_version']}, interpreter: {meta['triton_interpret']}")
    if not ctx.cuda:
        print("no CUDA: Triton kernels run in the CPU interpreter; timings are NOT representative of GPU performance")
        if not args.quick:
            print("warning: the full sizes take hours in the interpreter; use --quick on a CPU")
    ctx.peak_gbps = common.measure_peak_gbps(ctx)
    print(f"measured copy bandwidth (read + write): {ctx.peak_gbps:.1f} GB/s")

    modules = {"accumulate": accumulate, "topk": topk, "perturb": perturb, "end_to_end": end_to_end}
    for family in families:
        start = time.perf_counter()
        if family == "end_to_end":
            rows = end_to_end.run(ctx, args.sizes, args.model)
        else:
            rows = modules[family].run(ctx, args.sizes)
        csv_path, json_path = common.write_results(family, rows, ctx)
        common.print_table(f"{family} on {ctx.meta['device']} ({time.perf_counter() - start:.1f} s)", rows)
        print(f"wrote {csv_path} and {json_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
