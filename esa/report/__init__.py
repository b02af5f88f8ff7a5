"""``esa report``: publication-ready results and the evidence checklist from run directories."""

from esa.callmodule import make_callable
from esa.report.build import write_report

__all__ = ["write_report"]

make_callable(__name__)  # esa.report(...) is esa.api.report (see esa.callmodule)
