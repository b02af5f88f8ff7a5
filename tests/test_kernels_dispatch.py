"""dispatch: ESA_KERNELS, force_backend, the manifest summary, and esa.kernels without Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from esa.kernels import backend_for, dispatch, force_backend, kernel_backend_summary
from esa.kernels.dispatch import HAS_TRITON


def test_auto_uses_torch_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESA_KERNELS", raising=False)
    assert backend_for(torch.zeros(1)) == "torch"
    if torch.cuda.is_available() and HAS_TRITON:
        assert backend_for(torch.zeros(1, device="cuda")) == "triton"


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESA_KERNELS", "torch")
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("ESA_KERNELS", "Torch ")
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("ESA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ESA_KERNELS"):
        backend_for(torch.zeros(1))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESA_KERNELS", "triton")
    if dispatch.triton_interpret():
        assert backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setattr(dispatch, "triton_interpret", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(torch.zeros(1))


def test_interpreter_state_is_that_of_the_decorated_kernels() -> None:
    if not HAS_TRITON:
        assert dispatch.triton_interpret() is False
        return
    expected = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it before esa.kernels is imported
    assert dispatch.triton_interpret() is expected


def test_force_backend_overrides_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESA_KERNELS", "auto")
    with force_backend("torch"):
        assert backend_for(torch.zeros(1)) == "torch"
        with force_backend("auto"):
            assert backend_for(torch.zeros(1)) == "torch"
    with pytest.raises(KeyError):
        with force_backend("torch"):
            raise KeyError("boom")
    assert dispatch.requested_backend() == "auto"
    with pytest.raises(ValueError, match="not one of"):
        with force_backend("gpu"):
            pass


def test_summary_for_the_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESA_KERNELS", "torch")
    summary = kernel_backend_summary()
    assert set(summary) == {"ESA_KERNELS", "triton_version", "triton_interpret", "triton_available"}
    assert summary["ESA_KERNELS"] == "torch"
    assert summary["triton_available"] is HAS_TRITON
    assert isinstance(summary["triton_interpret"], bool)
    if HAS_TRITON:
        import triton

        assert summary["triton_version"] == triton.__version__


def test_kernels_work_without_triton() -> None:
    """With triton unimportable, esa.kernels imports, runs the references, and forced Triton fails clearly."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import os, torch
        from esa.kernels import accumulate_, apply_perturbation_, backend_for, force_backend, restore_, topk
        from esa.kernels.dispatch import HAS_TRITON
        assert not HAS_TRITON
        s = torch.zeros(5)
        accumulate_("abs", s, torch.tensor([1.0, -2.0, 3.0, 0.0, -5.0]))
        values, indices = topk(s, 2)
        assert indices.tolist() == [4, 2], indices
        w = torch.ones(5, dtype=torch.bfloat16)
        saved = apply_perturbation_(w, torch.tensor([1, 3]), "zero")
        restore_(w, torch.tensor([1, 3]), saved)
        assert torch.equal(w, torch.ones(5, dtype=torch.bfloat16))
        with force_backend("triton"):
            try:
                backend_for(s)
            except RuntimeError as e:
                assert "not installed" in str(e)
            else:
                raise AssertionError("forced triton without triton must fail")
        print("OK")
        """
    )
    env = {**os.environ, "ESA_KERNELS": "auto"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
