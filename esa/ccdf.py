"""Score CCDFs: per component, the empirical P(S ≥ x) of the scores, as ``ccdf.csv`` stores it and the plots draw it.

``ccdf.csv`` has the columns component, score, ccdf; at most :data:`CCDF_POINTS` log-spaced points per component.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esa import tailstats
from esa.runio import atomic_write_csv, read_csv_rows

if TYPE_CHECKING:  # reading ccdf.csv (esa report) needs neither torch nor the scoring modules
    from esa.scoreselect import Selection

CCDF_HEADER = ("component", "score", "ccdf")
CCDF_POINTS = 400  # per component in ccdf.csv: enough for a smooth log-log curve


def ccdf_curves(selection: Selection) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per component, the empirical CCDF P(S ≥ x) of its scores, thinned to log-spaced points.

    The tail comes from the exact top scores (P = i / n), the body from the seeded sample (P = i / sample size,
    kept no lower than the exact tail's last value, so that the curve is monotone); zero scores are left out (a log axis cannot show them; their count is in score_stats.json).
    """
    by_component: dict[str, list[tailstats.TensorSummary]] = {}
    for t in selection.tensors:
        by_component.setdefault(t.component, []).append(selection.summaries[t.name])
    tail = max(s.top.size for s in selection.summaries.values())
    curves = {}
    for comp, summaries in by_component.items():
        pooled = tailstats.combine(summaries, tail=tail)
        body = np.sort(pooled.sample[pooled.sample > 0])[::-1]
        p_body = np.arange(1, body.size + 1) / max(pooled.sample.size, 1)
        top = pooled.top[pooled.top > 0]
        p_top = np.arange(1, top.size + 1) / pooled.numel
        keep = body < (top[-1] if top.size else np.inf)
        x = np.concatenate([top, body[keep]])
        # The exact tail bounds the sampled body from below: P(S ≥ x) cannot drop as x falls.
        p = np.maximum.accumulate(np.concatenate([p_top, p_body[keep]]))
        if x.size > CCDF_POINTS:
            idx = np.unique(np.geomspace(1, x.size, CCDF_POINTS).astype(np.int64) - 1)
            x, p = x[idx], p[idx]
        curves[comp] = (x, p)
    return curves


def ccdf_rows(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
    return [(comp, repr(float(xi)), repr(float(pi))) for comp, (x, p) in sorted(curves.items()) for xi, pi in zip(x, p)]


def read_ccdf(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves: dict[str, tuple[list, list]] = {}
    for r in read_csv_rows(path, required=("component", "score", "ccdf")):
        xs, ps = curves.setdefault(r["component"], ([], []))
        xs.append(float(r["score"]))
        ps.append(float(r["ccdf"]))
    return {c: (np.array(x), np.array(p)) for c, (x, p) in curves.items()}


def write_ccdf(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    atomic_write_csv(path, CCDF_HEADER, ccdf_rows(curves))
