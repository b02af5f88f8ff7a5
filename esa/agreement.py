"""``esa compare``: how much the top-k sets of profile runs (e.g. different metrics) agree.

For every pair of runs A, B (their ``top_weights.csv``):
- overlap@k = |A ∩ B| / min(|A|, |B|) and Jaccard = |A ∩ B| / |A ∪ B|;
- Spearman rank correlation on the union U = A ∪ B. When both runs saved every score (``--save-scores``) the
  ranks are those of the exact scores over U — of |S| for the signed metrics (taylor, obd), which rank by |S|. Otherwise an element missing from a run's top-k gets that run's
  tied rank |run| + 1 ("below the list"), the usual convention for comparing top-k lists; the result says which.

Files: ``compare.json`` and ``overlap.csv`` / ``jaccard.csv`` / ``spearman.csv`` (square matrices), written
atomically into ``--out``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy import stats as sps

from esa.errors import EsaError
from esa.runio import MANIFEST, is_finished, read_json
from esa.scoring import SIGNED
from esa.selection import WeightSet, jaccard, overlap_at_k
from esa.weightsfile import read_weights


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "top_weights.csv").exists():
        raise EsaError(f"{run_dir} is not a profile run (no top_weights.csv)")
    if not is_finished(run_dir):
        raise EsaError(f"{run_dir} is not a finished run")
    config = read_json(run_dir / "config.json")
    manifest = read_json(run_dir / MANIFEST)
    sel = config.get("selection", {})
    label = f"{sel.get('metric', '?')}/{sel.get('mode', '?')}@{sel.get('topk', '?')}"
    return {"dir": run_dir, "label": label, "top": read_weights(run_dir / "top_weights.csv"),
            "model_id": manifest.get("model", {}).get("model_id"),
            "scores": run_dir / "scores.safetensors" if (run_dir / "scores.safetensors").exists() else None,
            "signed": sel.get("metric") in SIGNED}


def _exact_scores(path: Path, union: list[tuple[str, int]]) -> np.ndarray:
    from safetensors import safe_open

    out = np.empty(len(union))
    by_tensor: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(union):
        by_tensor.setdefault(name, []).append(i)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name, positions in by_tensor.items():
            if name not in names:
                out[positions] = np.nan
                continue
            flat = f.get_tensor(name).reshape(-1)
            out[positions] = flat[[union[p][1] for p in positions]].double().numpy()
    return out


def _ranked_scores(run: dict, union: list[tuple[str, int]]) -> np.ndarray:
    """The scores a run ranks by over ``union``: S, or |S| for a signed metric."""
    scores = _exact_scores(run["scores"], union)
    return np.abs(scores) if run.get("signed") else scores


def rank_correlation(a: dict, b: dict) -> dict:
    """Spearman ρ on the union of the two top-k sets (see the module docstring)."""
    union = sorted(a["top"].keys() | b["top"].keys())
    if len(union) < 3:
        return {"spearman": float("nan"), "basis": "too few weights"}
    if a["scores"] is not None and b["scores"] is not None:
        sa, sb = (_ranked_scores(run, union) for run in (a, b))
        if np.isfinite(sa).all() and np.isfinite(sb).all():
            return {"spearman": float(sps.spearmanr(sa, sb).statistic), "basis": "exact scores on the union"}

    def ranks(ws: WeightSet) -> np.ndarray:
        position = {key: r for r, key in enumerate(zip(ws.tensor, ws.flat_index.tolist()))}
        return np.array([position.get(key, len(ws)) for key in union], dtype=np.float64)

    rho = sps.spearmanr(ranks(a["top"]), ranks(b["top"])).statistic
    return {"spearman": float(rho), "basis": "top-k ranks, absent items tied below the list"}


def compare_runs(run_dirs: list[Path]) -> dict:
    if len(run_dirs) < 2:
        raise EsaError("esa compare needs at least two profile run directories")
    runs = [load_run(d) for d in run_dirs]
    models = {r["model_id"] for r in runs}
    if len(models) > 1:
        raise EsaError(f"the runs profile different models ({', '.join(sorted(map(str, models)))})")
    n = len(runs)
    overlap, jac, rho = np.eye(n), np.eye(n), np.eye(n)
    pairs = []
    for i, j in itertools.combinations(range(n), 2):
        a, b = runs[i], runs[j]
        o, jj = overlap_at_k(a["top"], b["top"]), jaccard(a["top"], b["top"])
        r = rank_correlation(a, b)
        overlap[i, j] = overlap[j, i] = o
        jac[i, j] = jac[j, i] = jj
        rho[i, j] = rho[j, i] = r["spearman"]
        pairs.append({"a": a["label"], "b": b["label"], "a_dir": str(a["dir"]), "b_dir": str(b["dir"]),
                      "overlap_at_k": o, "jaccard": jj, **r})
    labels = [r["label"] for r in runs]
    return {"runs": [{"label": r["label"], "dir": str(r["dir"]), "k": len(r["top"])} for r in runs],
            "labels": labels, "overlap_at_k": overlap.tolist(), "jaccard": jac.tolist(), "spearman": rho.tolist(),
            "pairs": pairs,
            "mean_overlap_at_k": float(np.mean([p["overlap_at_k"] for p in pairs]))}
