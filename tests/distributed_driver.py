"""Launched by tests/test_distributed.py under torchrun (``python -m torch.distributed.run``); not a test itself.

``commands FILE``: start the process group once and run each command line of the JSON list in FILE through the
``esa`` CLI, in order (so one launch covers several commands). ``fail RANK ARGS...``: ``python -m esa ARGS``, with
the evaluation of rank RANK made to raise, to check that one failing rank stops the run with its error.
"""

from __future__ import annotations

import json
import os
import sys


def run_commands(path: str) -> None:
    from esa import distributed
    from esa.cli.main import app

    distributed.init_from_env()
    try:
        for argv in json.loads(open(path).read()):
            app(argv, standalone_mode=False)
    finally:
        distributed.shutdown()


def fail_on(rank: int, argv: list[str]) -> None:
    import esa.evaluate
    from esa.errors import EsaError

    if int(os.environ["RANK"]) == rank:
        def broken(*args, **kwargs):
            raise EsaError(f"injected failure on rank {rank}")

        esa.evaluate.window_nll = broken
    from esa.__main__ import main

    sys.argv = ["esa", *argv]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "commands":
        run_commands(sys.argv[2])
    else:
        fail_on(int(sys.argv[2]), sys.argv[3:])
