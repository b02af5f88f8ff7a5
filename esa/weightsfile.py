"""Selection files: ``top_weights.csv`` / ``bottom_weights.csv`` (and ``stability/top_weights_seed<S>.csv``).

One row per selected weight: rank, tensor, layer, component, expert, row, col, flat_index, score, weight (its
value when written; ``nan`` when the parameters were not given). Written by ``esa profile`` and ``esa perturb``;
read back by ``esa perturb --from-profile``, ``esa compare`` and ``esa report``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from esa.runio import atomic_write_csv, read_csv_rows
from esa.selection import WeightSet
from esa.tensors import TensorInfo

WEIGHTS_HEADER = ("rank", "tensor", "layer", "component", "expert", "row", "col", "flat_index", "score", "weight")


def weight_rows(ws: WeightSet, tensors: list[TensorInfo], params: dict[str, torch.Tensor]) -> list[tuple]:
    info = {t.name: t for t in tensors}
    rows = []
    by_tensor: dict[str, list[int]] = {}
    for i, name in enumerate(ws.tensor):
        by_tensor.setdefault(name, []).append(i)
    values = np.full(len(ws), np.nan)
    coords = {"expert": [None] * len(ws), "row": [None] * len(ws), "col": [None] * len(ws)}
    for name, positions in by_tensor.items():
        flat = torch.as_tensor(ws.flat_index[positions])
        if name in params:
            values[positions] = params[name].detach().reshape(-1)[flat.to(params[name].device)].double().cpu().numpy()
        c = info[name].coordinates(flat)
        for key in coords:
            for p, v in zip(positions, c[key].tolist() if c[key] is not None else [None] * len(positions)):
                coords[key][p] = v
    for i, name in enumerate(ws.tensor):
        t = info[name]
        expert = coords["expert"][i] if coords["expert"][i] is not None else t.expert
        rows.append((int(ws.rank[i]), name, "" if t.layer is None else t.layer, t.component,
                     "" if expert is None else expert, coords["row"][i], "" if coords["col"][i] is None else coords["col"][i],
                     int(ws.flat_index[i]), repr(float(ws.score[i])), repr(float(values[i]))))
    return rows


def write_weights(path: Path, ws: WeightSet, tensors: list[TensorInfo], params: dict[str, torch.Tensor]) -> None:
    atomic_write_csv(path, WEIGHTS_HEADER, weight_rows(ws, tensors, params))


def read_weights(path: Path, kind: str = "top_k") -> WeightSet:
    """A selection back from ``top_weights.csv``-style files (only tensor and flat_index are needed)."""
    rows = read_csv_rows(path, required=("tensor", "flat_index"))
    score = np.array([float(r["score"]) if r.get("score") not in (None, "") else np.nan for r in rows])
    rank = np.array([int(r["rank"]) if r.get("rank") not in (None, "") else i for i, r in enumerate(rows)], np.int64)
    return WeightSet([r["tensor"] for r in rows], np.array([int(r["flat_index"]) for r in rows], np.int64), score,
                     rank, kind)


def top_location_rows(path: Path) -> list[tuple]:
    """top_weights.csv as the tuples :func:`esa.plots.plot_top_locations` draws (row, col and score as numbers)."""
    return [(int(x["rank"]), x["tensor"], x["layer"], x["component"], x["expert"], int(x["row"]),
             "" if x["col"] == "" else int(x["col"]), int(x["flat_index"]), float(x["score"]))
            for x in read_csv_rows(path, required=("rank", "tensor", "component", "row", "col", "score"))]
