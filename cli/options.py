"""The Typer face of esa's options: each :class:`esa.options.Opt` as a ``typer.Option``, and :func:`takes`, which
gives a command one parameter per option of its :class:`esa.options.Command`.

The options themselves (names, types, help, panels, defaults, where their values go) are declared once, in
:mod:`esa.options`, which the Python API (:mod:`esa.api`) reads too; its docstring says how to add one. What is
here is what only the command line has: the Typer parameters, the positional arguments and ``--version``.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from esa import options as opts
from esa.options import COMMANDS, Command, Opt


def option(opt: Opt) -> Any:
    """``typer.Option`` for ``opt``: its flags, help and help panel."""
    return typer.Option(*opt.decls, help=opt.help, rich_help_panel=opt.panel)


def annotated(opt: Opt) -> Any:
    """``Annotated[type, typer.Option(...)]``, for a parameter written out in a command."""
    return Annotated[opt.type, option(opt)]


# Parameters written out in a command (options no configuration holds, and the positional arguments).
PlanCommand, DeviceMemory, Json = (annotated(COMMANDS["plan"].opt(p)) for p in ("command", "device_memory",
                                                                                  "json_output"))
CompareOut = annotated(COMMANDS["compare"].opt("out"))
TinyOutDir, TinySteps, TinySeed, TinyOverwrite = (annotated(COMMANDS["tiny_train"].opt(p))
                                                  for p in ("out_dir", "steps", "seed", "overwrite"))
RunDirs = Annotated[list[Path], typer.Argument(help="two or more finished profile run directories")]
ReportRunDirs = Annotated[list[Path], typer.Argument(help="run directories, or folders of them (e.g. an esa run "
                                                     "out-dir)")]


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("esa")
        except PackageNotFoundError:  # run from a checkout that is not installed
            number = "unknown (not installed)"
        typer.echo(f"esa {number}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", help="print esa's version and exit", callback=version_callback,
                                       is_eager=True)]


def takes(command: str | Command) -> Callable[[Callable], Callable]:
    """Decorate a command ``fn(<own parameters>, config)``: typer sees the own parameters (arguments, options no
    configuration holds) followed by one keyword parameter per option of ``command`` (:data:`esa.options.COMMANDS`),
    defaults from its configuration; ``fn`` is called with ``config=`` the configuration built from them
    (:meth:`esa.options.Command.config`)."""
    spec = COMMANDS[command] if isinstance(command, str) else command
    options = spec.options
    opts.check_unique((*spec.own, *options))
    defaults = spec.config_type()

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "config"]
        clash = {p.name for p in own} & {o.param for o in options}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also options of its configuration")
        generated = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.cli_default(defaults),
                                       annotation=annotated(o)) for o in options]

        @functools.wraps(fn)
        def command_fn(**kwargs: Any) -> Any:
            values = {o.param: kwargs.pop(o.param) for o in options}
            return fn(**kwargs, config=spec.config(values))

        command_fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated)
        command_fn.options = options  # type: ignore[attr-defined]
        return command_fn

    return decorate
