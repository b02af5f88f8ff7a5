"""esa: Extreme Sensitivity Analysis.

From Python, every command is a function taking the command line's options as keyword arguments (see
:mod:`esa.api`): ``esa.baseline``, ``esa.profile``, ``esa.perturb``, ``esa.report``, ``esa.run``, ``esa.plan``,
``esa.superweights``, ``esa.validate``, ``esa.compare``. ``import esa`` stays light: each is imported on first use.
Where a command module has the same name (``esa.profile`` is also the module of ``esa profile``), the module itself
is callable as the API function (:mod:`esa.callmodule`).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = ("baseline", "profile", "report", "plan", "superweights", "validate", "compare")  # callable modules
_FUNCTIONS = ("perturb", "run")  # esa.api functions with no module of that name
__all__ = [*_MODULES, *_FUNCTIONS]


def __getattr__(name: str) -> Any:
    """``esa.perturb`` / ``esa.run``: the :mod:`esa.api` functions; ``esa.profile`` etc.: the (callable) command
    modules, imported on first use (once imported, Python finds them without asking here)."""
    if name in _MODULES:
        return importlib.import_module(f"esa.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module("esa.api"), name)
    raise AttributeError(f"module 'esa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
