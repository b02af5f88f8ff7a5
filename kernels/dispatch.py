"""Choose between the Triton kernels and their plain-torch references.

The choice comes from the environment variable ``ESA_KERNELS``:

- ``auto`` (default): Triton for CUDA tensors when Triton imports, torch otherwise;
- ``triton``: always Triton. CPU tensors then need ``TRITON_INTERPRET=1`` set *before* ``esa.kernels`` is imported
  (Triton decides at decoration time whether a kernel is compiled or interpreted);
- ``torch``: always the eager references.

``force_backend(name)`` overrides the variable for the duration of a ``with`` block (tests, benchmarks).

Triton is an optional dependency: when it does not import, this module exposes small stand-ins for ``triton`` and
``triton.language`` so that the kernel modules still import (their ``@triton.jit`` functions then raise when called)
and everything runs on the torch references.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "ESA_KERNELS"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_VERSION: str | None = triton.__version__
except ImportError:  # pragma: no cover - exercised in a subprocess test
    HAS_TRITON = False
    TRITON_VERSION = None

    class _MissingTritonLanguage:
        """Stand-in for ``triton.language``: any attribute (``tl.constexpr`` in annotations) resolves to None."""

        def __getattr__(self, name: str) -> Any:
            return None

    class _MissingTriton:
        """Stand-in for ``triton``: ``triton.jit`` returns a function that explains why it cannot run."""

        __version__ = None

        @staticmethod
        def jit(fn: Any = None, **_kwargs: Any) -> Any:
            def wrap(f: Any) -> Any:
                def unavailable(*_args: Any, **_kw: Any) -> None:
                    raise RuntimeError(f"Triton kernel {f.__name__} called but triton is not installed")

                unavailable.__name__ = f.__name__
                return _Unlaunchable(unavailable)

            return wrap(fn) if fn is not None else wrap

    class _Unlaunchable:
        """``kernel[grid](...)`` on a missing Triton: indexing returns the raising function."""

        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, _grid: Any) -> Any:
            return self.fn

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTritonLanguage()  # type: ignore[assignment]

# A process-wide override (not thread-local: autograd runs gradient hooks of CUDA tensors on its own threads).
_forced: list[str] = []


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids."""
    return -(-a // b)


def triton_interpret() -> bool:
    """Whether esa's Triton kernels run in Triton's CPU interpreter.

    Triton makes that choice when a kernel is decorated, from ``TRITON_INTERPRET`` at that moment; so this looks at
    a decorated kernel (the accumulation kernel, looked up in ``sys.modules`` rather than imported: that module
    imports this one) rather than at the current environment, which it reads only before any kernel exists.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    accumulate = sys.modules.get("esa.kernels.accumulate")
    if accumulate is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(accumulate._accumulate_kernel, InterpretedFunction)


def requested_backend() -> str:
    """The active choice: a ``force_backend`` override, else ``ESA_KERNELS``, else ``auto``."""
    name = _forced[-1] if _forced else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def backend_for(t: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"``: which implementation handles ops on tensor ``t``.

    Raises RuntimeError when Triton is forced but cannot run on ``t`` (not installed, or a CPU tensor without the
    interpreter).
    """
    choice = requested_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if (t.is_cuda and HAS_TRITON) else "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install 'esa[triton]')")
    if not t.is_cuda and not triton_interpret():
        raise RuntimeError(
            f"{ENV_VAR}=triton on a {t.device.type} tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before esa.kernels is imported, or use ESA_KERNELS=torch or auto"
        )
    return "triton"


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` ("auto", "triton", "torch") inside the block, whatever ``ESA_KERNELS`` says."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def kernel_backend_summary() -> dict:
    """What the run manifest records about the kernel path."""
    return {
        ENV_VAR: os.environ.get(ENV_VAR, "auto"),
        "triton_version": TRITON_VERSION,
        "triton_interpret": triton_interpret(),
        "triton_available": HAS_TRITON,
    }
