"""bench/gpu_check.sh and ``python -m bench gpu-check``: the no-CUDA stop, the budget, and the whole code path on CPU.

GPU time comes in short windows, so the script must not fail for the first time on a GPU: the ``--device cpu
--tiny`` dry run goes through every step (kernel tests, kernel benchmarks, the end-to-end child with esa's
baseline and profile) on a tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def _one_line_no_cuda(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == gpu_check.NO_CUDA_EXIT, proc.stdout + proc.stderr
    assert proc.stderr.strip() == gpu_check.NO_CUDA
    assert "Traceback" not in proc.stdout + proc.stderr


@no_cuda
def test_shell_script_stops_at_once_without_cuda(tmp_path: Path) -> None:
    """Before installing anything: the check comes first (a pip install here would touch this environment)."""
    env = gpu_check.child_env(PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out-dir", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    _one_line_no_cuda(proc)
    assert proc.stdout == ""
    assert not list(tmp_path.iterdir())


@no_cuda
def test_python_entry_stops_at_once_without_cuda(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--out-dir", str(tmp_path)], cwd=REPO,
                          env=gpu_check.child_env(), capture_output=True, text=True, timeout=120)
    _one_line_no_cuda(proc)
    assert not list(tmp_path.iterdir())


def test_cpu_is_only_the_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu"]) == gpu_check.NO_CUDA_EXIT
    assert "--tiny" in capsys.readouterr().err


def test_no_time_left_skips_every_step_and_still_writes_the_report(tmp_path: Path) -> None:
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "2", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["steps"]) == set(gpu_check.STEPS)
    assert all(s["status"] == "skipped" and "left of the 2 s budget" in s["note"] for s in report["steps"].values())
    assert "**skipped**" in (tmp_path / "gpu_check.md").read_text()


def test_a_step_is_killed_at_its_limit_and_keeps_its_output(tmp_path: Path) -> None:
    script = "import subprocess, sys, time; print('started', flush=True); " \
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    start = time.monotonic()
    result = gpu_check.run_limited([sys.executable, "-c", script], gpu_check.child_env(), 3.0, tmp_path / "log")
    assert result["timed_out"] and time.monotonic() - start < 30
    assert "started" in result["output_tail"]


def test_layers_that_fit_the_memory() -> None:
    config, _ = gpu_check.load_architecture(gpu_check.DEFAULT_CONFIG, tiny=False)  # or the built-in copy
    outside, block = gpu_check.count_parameters(config)
    assert outside + 32 * block == 8_030_261_248  # Llama-3.1-8B's published parameter count
    layers, n = gpu_check.layers_that_fit(config, 2048, 139 * 2**30)
    assert (layers, n) == (32, 8_030_261_248)
    small, n_small = gpu_check.layers_that_fit(config, 2048, 40 * 2**30)
    assert 1 <= small < 32 and n_small == outside + small * block
    need = 6 * n_small + 64 * 2048 * 4096 * small + 16 * 2048 * 128256
    assert need <= 0.85 * 40 * 2**30


@pytest.mark.slow
def test_tiny_dry_run_goes_through_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert printed.startswith((tmp_path / "gpu_check.md").read_text())
    steps = report["steps"]
    assert {name: s["status"] for name, s in steps.items()} == {name: "ok" for name in gpu_check.STEPS}, steps
    assert steps["kernel_tests"]["counts"].get("passed", 0) > 0 and not steps["kernel_tests"]["counts"].get("failed")
    families = steps["kernel_bench"]["families"]
    assert set(families) == set(gpu_check.KERNEL_FAMILIES)
    assert all(f["rows"] and f["peak_gbps"] > 0 for f in families.values())
    measured = steps["end_to_end"]["measured"]
    expected = {"model", "forward+backward", "profile scoring grad_x_weight", "one evaluation",
                "apply+restore k=100 +verify", "apply+restore k=100", "baseline (runbook)", "esa profile grad_x_weight per_layer",
                "esa profile grad_x_weight global", "esa profile hutchinson_diag global"}
    assert set(measured) == expected
    for name in ("esa profile grad_x_weight per_layer", "esa profile hutchinson_diag global"):  # the plan next to the measured peak
        assert measured[name]["planned_over_measured"] > 0, measured[name]
    errors = {k: v["note"] for k, v in measured.items() if str(v.get("note", "")).startswith("error")}
    assert not errors, errors
    assert measured["model"]["layers"] == 2 and measured["model"]["seq_len"] == 32
    assert all(measured[k]["ms"] > 0 for k in expected - {"model"})
    assert measured["profile scoring grad_x_weight"]["reference"] == "forward+backward"
    # A random model predicts about uniformly: its perplexity is about the vocabulary size (not a leak, not ~1).
    base = measured["baseline (runbook)"]
    assert 0.5 * base["uniform_guess_ppl"] < base["ppl"] < 2 * base["uniform_guess_ppl"]
    assert (tmp_path / "gpu_check_runs" / "profile_per_layer" / "top_weights.csv").exists()
    assert (tmp_path / "gpu_check_runs" / "baseline" / "metrics.json").exists()
    assert "## End to end" in printed and "esa profile grad_x_weight" in printed
