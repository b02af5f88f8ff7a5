"""``python -m esa`` is the ``esa`` command, and ``torchrun --nproc-per-node N -m esa ...`` its data-parallel form.

Under torchrun (see :mod:`esa.distributed`) the process group is started before the command runs and destroyed
after it; ranks other than 0 print nothing on stdout and draw no progress bars (rank 0 reports for all), and
commands that are not data parallel are refused.
"""

import os
import sys


def _refuse(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def main() -> None:
    from esa import distributed

    if not distributed.launched_by_torchrun():
        from esa.cli.main import main as cli_main

        cli_main()
        return
    from esa.errors import EsaError

    try:
        distributed.init_from_env()
        distributed.check_command(sys.argv[1:])
    except EsaError as e:
        distributed.shutdown()
        _refuse(f"{distributed.rank_label()}{e}")
    if not distributed.is_main():
        os.environ["ESA_PROGRESS"] = "0"  # read when esa.progress is imported, below
        sys.stdout = open(os.devnull, "w")
    try:
        from esa.cli.main import main as cli_main

        cli_main()
    except Exception as e:  # noqa: BLE001 - a peer's death surfaces here as a collective's error
        if not distributed.is_peer_failure(e):
            raise
        _refuse(f"{distributed.rank_label()}stopped because another rank failed (its error is above)")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
