"""What an experiment ran on: code version, command line, packages, hardware, seeds, timings.

Written as ``experiment_manifest.json`` in every run directory, last, with ``"status": "complete"``.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from esa import distributed

_PACKAGES = ("esa", "torch", "transformers", "tokenizers", "safetensors", "triton", "accelerate", "datasets",
             "numpy", "scipy", "matplotlib", "typer", "rich")


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def kernel_path(device: str | None = None) -> dict[str, Any]:
    """The kernel settings, and with ``device`` the path that ran there ("backend": "triton" or "torch")."""
    try:
        from esa.kernels.dispatch import backend_for, kernel_backend_summary
    except ImportError:
        return {"ESA_KERNELS": os.environ.get("ESA_KERNELS", "auto"), "triton_available": False, "backend": "torch"}
    info = kernel_backend_summary()
    if device is not None:
        try:
            info["backend"] = backend_for(torch.empty(0, device=device))
        except (RuntimeError, ValueError) as e:
            info["backend"] = f"unavailable: {e}"
    return info


def measured_peak_memory(device: str | None) -> dict[str, Any]:
    """The peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on CUDA, else the peak RSS."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return {"measured_peak_bytes": int(torch.cuda.max_memory_allocated(torch.device(device))),
                "measured_as": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"measured_peak_bytes": int(rss if sys.platform == "darwin" else rss * 1024),  # Linux reports KiB
            "measured_as": "peak RSS of the process (resource.getrusage)"}


class Timer:
    """Named wall-clock phases, for the manifest's ``timings_s``."""

    def __init__(self) -> None:
        self.started = time.time()
        self.phases: dict[str, float] = {}

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.t0
                return False

        return _Phase()

    def split(self, phase: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of ``phase`` into a phase of their own, ``part`` (phases never overlap)."""
        self.phases[phase] -= seconds
        self.phases[part] = self.phases.get(part, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in self.phases.items()}, "total": round(time.time() - self.started, 4)}


def build_manifest(command: str, *, timer: Timer, extra: dict[str, Any], status: str = "complete",
                   planned_peak_bytes: int | None = None) -> dict[str, Any]:
    """The manifest; ``memory`` holds the measured peak next to the plan's prediction (:mod:`esa.planning`) when given."""
    device = extra.get("model", {}).get("device")
    return {
        "esa_command": command,
        "status": status,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "git": _git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "distributed": distributed.describe(),
        "kernels": kernel_path(extra.get("model", {}).get("device")),
        "timings_s": timer.as_dict(),
        "memory": {**measured_peak_memory(device), "planned_peak_bytes": planned_peak_bytes},
        **extra,
    }
