"""Command modules that are also the functions of :mod:`esa.api`: ``esa.profile(model=..., topk=50)`` calls
:func:`esa.api.profile`, while ``esa.profile.run_profile`` is still the module's own function.

A package attribute cannot be both: importing the submodule ``esa.profile`` binds the module to ``esa.profile``. So
the command modules whose names the API shares (baseline, profile, plan, superweights, validate, compare, report)
make themselves callable with :func:`make_callable`; the call finds the API function by name when it is made (the
API is built on these modules, so they must not import it).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any


class CommandModule(types.ModuleType):
    """A module whose call is the :mod:`esa.api` function of the same name."""

    def _function(self) -> Any:
        return getattr(importlib.import_module("esa.api"), self.__name__.rsplit(".", 1)[-1])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what a notebook shows for esa.profile(
        return inspect.signature(self._function())


def make_callable(module_name: str) -> None:
    """Make the (imported) module ``module_name`` callable as its :mod:`esa.api` function."""
    sys.modules[module_name].__class__ = CommandModule
