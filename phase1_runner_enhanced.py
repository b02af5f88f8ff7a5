#!/usr/bin/env python
"""The runbook's entry point, kept so that its commands run unchanged.

    python phase1_runner_enhanced.py --model M --metric METRIC --mode MODE --topk K --max-samples N \\
        --batch-size B --device DEV --save-plots --out-dir D \\
        [--perturb KIND --perturb-scale S | --perturb-prob P --controls random_k,bottom_k --seeds 0,1,2 --stability-check]

It is ``esa run`` (same flags, same library code): baseline → profile → perturb → report into D, taking every
option of those phases (``--help`` lists them). See docs/RUNBOOK.md for the nine experiments and how to read
their results. ``torchrun --nproc-per-node N phase1_runner_enhanced.py ...`` runs it data parallel, like
``torchrun -m esa run`` (README).
"""

from esa.__main__ import launch
from esa.cli.main import runbook_app

if __name__ == "__main__":
    launch(runbook_app, ["run"])
