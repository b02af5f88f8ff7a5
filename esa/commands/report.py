"""``esa report``: figures, tables and the evidence checklist from finished runs (:mod:`esa.reporting`), into
``--out``."""

from __future__ import annotations

from pathlib import Path

from esa.config import ReportConfig, validate
from esa.reporting import write_report


def run_report(run_dirs: list[Path], config: ReportConfig) -> dict:
    """Write the report of ``run_dirs`` (run directories, or folders of them) into ``config.out``; returns its
    summary (report.json's)."""
    validate(config)
    return write_report([Path(d) for d in run_dirs], Path(config.out), overwrite=config.overwrite)
