"""Shared benchmark plumbing: timing, peak bandwidth, device description, output files and the printed table."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Where results go: bench/out, or $ESA_BENCH_OUT (python -m bench gpu-check --out-dir sends the families there).
OUT_DIR = Path(os.environ.get("ESA_BENCH_OUT") or Path(__file__).resolve().parent / "out")


@dataclass
class Context:
    """What every benchmark needs to know about this run."""

    device: torch.device
    quick: bool
    repeats: int
    peak_gbps: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def run_metadata(device: torch.device) -> dict:
    from esa.kernels import kernel_backend_summary

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **kernel_backend_summary(),
    }


def median_ms(fn: Callable[[], object], ctx: Context) -> float:
    """Median wall time of ``fn`` in ms: triton.testing.do_bench on CUDA, perf_counter with repeats on CPU."""
    if ctx.cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for i in range(ctx.repeats + 1):
        start = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - start) * 1e3
        if i:  # the first call is a warm-up (compilation, allocator)
            times.append(elapsed)
    return statistics.median(times)


def measure_peak_gbps(ctx: Context) -> float:
    """Device memory bandwidth from a large device-to-device copy, counting read + write bytes."""
    numel = (1 << 28) if ctx.cuda else ((1 << 22) if ctx.quick else (1 << 25))  # 1 GiB / 16 MiB / 128 MiB
    src = torch.empty(numel, dtype=torch.float32, device=ctx.device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), ctx)
    return gbps(2 * src.numel() * src.element_size(), ms)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def parse_shapes(text: str | None, default: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """'4096x4096,1000' -> [(4096, 4096), (1000,)]."""
    if not text:
        return default
    return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item.strip()]


def shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def write_results(name: str, rows: list[dict], ctx: Context) -> tuple[Path, Path]:
    """bench/out/<name>.csv and .json (the JSON also holds the run metadata and the measured peak)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = OUT_DIR / f"{name}.csv", OUT_DIR / f"{name}.json"
    columns = list(rows[0]) if rows else []
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    payload = {"benchmark": name, "meta": ctx.meta, "peak_gbps": ctx.peak_gbps, "quick": ctx.quick, "rows": rows}
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def print_table(title: str, rows: list[dict]) -> None:
    """A rich table of the rows (floats rounded for reading; the files keep full precision)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("op", "shape", "kind", "dtype") else "right")
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in columns))
    Console(width=160).print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
