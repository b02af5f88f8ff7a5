"""``python -m esa`` is the ``esa`` command, and ``torchrun --nproc-per-node N -m esa ...`` its data-parallel form.

Under torchrun (see :mod:`esa.distributed`) the process group is started before the command runs and destroyed
after it; ranks other than 0 print nothing on stdout and draw no progress bars (rank 0 reports for all), and
commands that are not data parallel are refused.
"""

import contextlib
import os
import sys
from typing import Callable, Sequence


def _refuse(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def launch(entry: Callable[[], None], argv: Sequence[str]) -> None:
    """Run the CLI ``entry`` (which reads ``sys.argv``) in this process, or as one rank of a torchrun launch;
    ``argv`` names the command, to refuse those that are not data parallel."""
    from esa import distributed

    if not distributed.launched_by_torchrun():
        entry()
        return
    from esa.errors import EsaError

    try:
        distributed.init_from_env()
        distributed.check_command(argv)
    except EsaError as e:
        distributed.shutdown()
        _refuse(f"{distributed.rank_label()}{e}")
    from esa.progress import quiet

    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")
    try:
        with quiet() if not distributed.is_main() else contextlib.nullcontext():
            entry()
    except Exception as e:  # noqa: BLE001 - a peer's death surfaces here as a collective's error
        if not distributed.is_peer_failure(e):
            raise
        _refuse(f"{distributed.rank_label()}stopped because another rank failed (its error is above)")
    finally:
        distributed.shutdown()


def main() -> None:
    def cli() -> None:
        from esa.cli.main import main as cli_main

        cli_main()

    launch(cli, sys.argv[1:])


if __name__ == "__main__":
    main()
