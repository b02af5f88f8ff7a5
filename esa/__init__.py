"""esa: Extreme Sensitivity Analysis.

From Python, every command is a function taking the command line's options as keyword arguments (see
:mod:`esa.api`): ``esa.baseline``, ``esa.profile``, ``esa.perturb``, ``esa.report``, ``esa.run``, ``esa.plan``,
``esa.superweights``, ``esa.validate``, ``esa.compare``. ``import esa`` stays light: :mod:`esa.api` is imported on
first use. No module of esa has one of these names (the commands live in :mod:`esa.commands`), so each name is
always the function.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["baseline", "profile", "perturb", "report", "run", "plan", "superweights", "validate", "compare"]


def __getattr__(name: str) -> Any:
    """``esa.profile`` etc.: the :mod:`esa.api` functions, imported on first use."""
    if name in __all__:
        return getattr(importlib.import_module("esa.api"), name)
    raise AttributeError(f"module 'esa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
