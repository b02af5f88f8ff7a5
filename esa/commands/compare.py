"""``esa compare``: top-k agreement between profile runs (:mod:`esa.agreement`), written into ``--out`` when given.

Files: ``compare.json`` and ``overlap.csv`` / ``jaccard.csv`` / ``spearman.csv`` (square matrices, one row and column
per run), written atomically.
"""

from __future__ import annotations

from pathlib import Path

from esa.agreement import compare_runs
from esa.runio import atomic_write_csv, atomic_write_json


def run_compare(run_dirs: list[Path], out: Path | None = None) -> dict:
    """Compare the runs; with ``out``, write the comparison there. Returns the comparison (compare.json's)."""
    result = compare_runs([Path(d) for d in run_dirs])
    if out is not None:
        write_comparison(result, Path(out))
    return result


def write_comparison(result: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "compare.json", result)
    for key in ("overlap_at_k", "jaccard", "spearman"):
        rows = [[label, *[f"{v:.6g}" for v in row]] for label, row in zip(result["labels"], result[key])]
        atomic_write_csv(out_dir / f"{key.split('_')[0]}.csv", ["run", *result["labels"]], rows)
