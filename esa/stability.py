"""How stable a selection is across seeds: the top-k chosen on seeded subsets of the evaluation windows (a
fraction of them each, ``--stability-fraction``) and their pairwise Jaccard index |A ∩ B| / |A ∪ B|, for the
whole top-k and per tensor (``stability.json`` of ``esa profile --stability-check``)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from esa.config import ProfileConfig
from esa.scoreselect import Selection, seeded_selections
from esa.selection import jaccard
from esa.session import Session


def stability(session: Session, config: ProfileConfig) -> tuple[dict, dict[int, Selection]]:
    """Top-k from seeded subsets of the evaluation windows (a fraction of them each) and their pairwise Jaccard."""
    chosen = seeded_selections(session, config.selection, config.seeds, config.stability_fraction,
                               batch_size=config.data.batch_size)
    sets = {s: sel for s, (sel, _) in chosen.items()}
    subsets = {s: subset.window_index for s, (_, subset) in chosen.items()}
    size = next(iter(chosen.values()))[1].n
    n = session.windows.n
    pairs = {}
    per_tensor: dict[str, list[float]] = {}
    for a, b in itertools.combinations(config.seeds, 2):
        pairs[f"{a}-{b}"] = jaccard(sets[a].top, sets[b].top)
        ta, tb = sets[a].top.by_tensor(), sets[b].top.by_tensor()
        for name in set(ta) | set(tb):
            ka = set(ta.get(name, torch.empty(0, dtype=torch.int64)).tolist())
            kb = set(tb.get(name, torch.empty(0, dtype=torch.int64)).tolist())
            per_tensor.setdefault(name, []).append(len(ka & kb) / len(ka | kb) if ka | kb else 1.0)
    values = list(pairs.values())
    result = {
        "seeds": config.seeds,
        "fraction": config.stability_fraction,
        "windows_per_seed": size,
        "windows": {str(s): w for s, w in subsets.items()},
        "pairwise_jaccard": pairs,
        "mean_jaccard": float(np.mean(values)) if values else float("nan"),
        "min_jaccard": float(np.min(values)) if values else float("nan"),
        "per_tensor_mean_jaccard": {k: float(np.mean(v)) for k, v in per_tensor.items()},
    }
    if size == n:
        result["warning"] = "every seed used all windows (too few windows): Jaccard is trivially 1"
    return result, sets
