"""Help output: a flag shows no value placeholder (``--overwrite``, not ``--overwrite <bool>``).

Why the placeholder appeared: typer 0.29 no longer formats help through the installed click (8.5.1); it vendors
click as ``typer._click`` and draws the rich help itself. Its options table (``typer.rich_utils``) prints
``param.display_type_rich(ctx)`` for every option, and ``typer.core.TyperOption.display_type_rich`` returns
``<bool>`` for flags as well, although a flag takes no value (``--overwrite true`` is refused as an extra
argument). typer's plain formatter (``TyperOption.get_help_record``) already skips flags; :func:`install` makes
the rich one do the same. Older typer versions have no ``display_type_rich`` and need nothing.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    """Make ``TyperOption.display_type_rich`` return nothing for flags (idempotent)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "esa_flags_untyped", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.esa_flags_untyped = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
