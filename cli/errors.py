"""Turn expected failures into one line on stderr and a non-zero exit status, never a traceback."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console

from esa.errors import EsaError

F = TypeVar("F", bound=Callable)
_stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USAGE) -> None:
    from esa.distributed import rank_label  # "rank R/N: " under torchrun, so the failing rank is named

    _stderr.print(f"[bold red]error:[/] {rank_label()}{message}", markup=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Decorator for commands: EsaError and out-of-memory become ``error: ...`` and exit 2; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EsaError as e:
            fail(str(e))
        except KeyboardInterrupt:
            _stderr.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            fail("out of host memory; lower --batch-size or --max-samples, or use a smaller model")
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                fail("out of device memory; lower --batch-size (or --seq-len), or use a GPU with more memory")
            raise

    return wrapper  # type: ignore[return-value]
