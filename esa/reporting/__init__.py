"""Reports (``esa report``): publication-ready results and the evidence checklist from run directories."""

from esa.reporting.build import write_report

__all__ = ["write_report"]
