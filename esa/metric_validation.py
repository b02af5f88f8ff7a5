"""``esa validate``: which metric predicts the true effect of removing a weight?

Protocol.
1. Score every selected tensor with every metric (``--metrics``; default: all, ``hessian_diag`` only when the scored
   weights fit ``--hessian-budget``) on the evaluation windows, one metric at a time.
2. The ablated weights: a seeded sample of ``--sample`` weights stratified over the scored tensors (proportional
   allocation by size, largest remainder, at least one per tensor; uniform without replacement within a tensor),
   plus every metric's global top-k (``--topk``, by |score| for the signed metrics). The plan — each weight with
   every metric's score and where it came from — is written to ``plan.csv`` before any ablation.
3. For each planned weight alone: perturb it in place (``zero`` or ``sign_flip``), evaluate all windows, restore it
   bit-exactly (:func:`esa.perturbation.perturbed`, fingerprint-checked). ΔNLL = mean next-token NLL (nats per
   token, over every predicted token of every window) perturbed minus intact. Each result is appended to
   ``ablations.jsonl`` at once; rerunning the same command resumes. One forward pass per ablation over all
   windows: several ablations cannot share a forward, because every window reads the same (shared) weights.
4. Per metric, on the seeded sample only (the top-k rows are biased towards each metric's own favourites):
   Spearman ρ and Kendall τ of the metric's |score| with |ΔNLL|, and of its score with the signed ΔNLL;
   precision@k = |metric's top-k ∩ true top-k by |ΔNLL|| / k within the sample (k = min(--topk, sample/10));
   each with a percentile bootstrap 95% CI over the sampled weights (``--n-bootstrap`` resamples). Also the mean
   |ΔNLL| of the metric's own global top-k (what ablating its favourites costs).

Files: ``config.json``, ``plan.csv``, ``ablations.jsonl``, ``validate.csv`` (tensor, flat_index, row, col, expert,
source, delta_nll, one score column per metric), ``validate.json``, ``plots/scatter_<metric>.png|pdf`` (|score| vs
|ΔNLL|, log-log, colour = sign agreement), ``experiment_manifest.json`` (last).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from esa.config import VALIDATE_KINDS, ValidateConfig
from esa.runio import atomic_write_csv, read_csv_rows
from esa.tensors import scored_tensors
from esa.scoring import METRICS, compute_scores, is_signed
from esa.seeding import stream_seed
from esa.selection import sample_distinct, select_extreme
from esa.tensors import TensorInfo

ABLATIONS = "ablations.jsonl"
KINDS = VALIDATE_KINDS  # the ablations whose effect every metric predicts


def default_metrics(n_weights: int, hessian_budget: int) -> list[str]:
    return [m for m in METRICS if m != "hessian_diag" or n_weights <= hessian_budget]


def stratified_sample(tensors: list[TensorInfo], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct weights (or all, if fewer), proportional to tensor size with at least one per tensor."""
    sizes = np.array([t.numel for t in tensors], dtype=np.float64)
    n = min(n, int(sizes.sum()))
    quota = np.minimum(np.maximum(1, np.floor(n * sizes / sizes.sum())), sizes).astype(np.int64)
    remainder = n * sizes / sizes.sum() - np.floor(n * sizes / sizes.sum())
    for i in np.argsort(-remainder, kind="stable"):  # largest remainder first, until the total is n
        if quota.sum() >= n:
            break
        if quota[i] < sizes[i]:
            quota[i] += 1
    while quota.sum() > n:  # the "at least one" floor overshot: trim the largest quotas
        quota[int(np.argmax(quota))] -= 1
    out = []
    for t, q in zip(tensors, quota.tolist()):
        gen = torch.Generator().manual_seed(stream_seed(seed, f"validate|{t.name}"))
        out += [(t.name, i) for i in sample_distinct(t.numel, q, set(), gen)]
    return out


# ----------------------------------------------------------------------------------------------- plan
def build_plan(config: ValidateConfig, session, metrics: list[str]) -> tuple[list[dict], dict]:
    """Rows {tensor, flat_index, source, <metric>: score} for the sample and every metric's top-k."""
    model = session.loaded.model
    tensors = scored_tensors(model, config.selection)
    infos = [t for t, _ in tensors]
    sample = stratified_sample(infos, config.sample, config.data.seed)
    rows: dict[tuple[str, int], dict] = {key: {"tensor": key[0], "flat_index": key[1], "source": ["sample"]}
                                         for key in sample}
    by_metric: dict[str, dict[str, torch.Tensor]] = {}
    meta = {}
    sel = config.selection
    for metric in metrics:
        scores = compute_scores(model, tensors, session.windows.input_ids, metric, batch_size=config.data.batch_size,
                                hutchinson_probes=sel.hutchinson_probes, hessian_budget=sel.hessian_budget,
                                seed=config.data.seed)
        top = select_extreme(scores, config.topk, "global")
        for name, idx in zip(top.tensor, top.flat_index.tolist()):
            rows.setdefault((name, idx), {"tensor": name, "flat_index": idx, "source": []})["source"].append(
                f"top:{metric}")
        # A later metric's top-k needs this metric's scores too: keep a host copy (4 bytes per scored weight per
        # metric; narrow the tensors with --include on a large model).
        by_metric[metric] = {n: s.detach().cpu() for n, s in scores.scores.items()}
        meta[metric] = scores.meta
        del scores
    for key, row in rows.items():
        for metric in metrics:
            s = by_metric[metric].get(key[0])
            row[metric] = float(s.reshape(-1)[key[1]]) if s is not None else float("nan")
    ordered = sorted(rows.values(), key=lambda r: (r["source"][0] != "sample", r["tensor"], r["flat_index"]))
    return ordered, meta


PLAN_FIXED = ("tensor", "flat_index", "source")


def write_plan(path: Path, plan: list[dict], metrics: list[str]) -> None:
    atomic_write_csv(path, (*PLAN_FIXED, *metrics), [(r["tensor"], r["flat_index"], ";".join(r["source"]),
                                                      *[repr(r[m]) for m in metrics]) for r in plan])


def read_plan(path: Path, metrics: list[str]) -> list[dict]:
    return [{"tensor": r["tensor"], "flat_index": int(r["flat_index"]), "source": r["source"].split(";"),
             **{m: float(r[m]) for m in metrics}} for r in read_csv_rows(path, required=(*PLAN_FIXED, *metrics))]


# ----------------------------------------------------------------------------------------------- statistics
def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(sps.spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    return float(sps.kendalltau(x, y).statistic) if len(x) > 2 else float("nan")


def precision_at_k(score: np.ndarray, truth: np.ndarray, k: int) -> float:
    """|top-k by score ∩ top-k by truth| / k (ties broken by position, stably)."""
    if k < 1:
        return float("nan")
    a = set(np.argsort(-score, kind="stable")[:k].tolist())
    b = set(np.argsort(-truth, kind="stable")[:k].tolist())
    return len(a & b) / k


def metric_figures(score: np.ndarray, delta: np.ndarray, metric: str, k: int, n_boot: int, seed: int) -> dict:
    """Point estimates and bootstrap 95% CIs of the correlations and precision@k (module docstring, step 4)."""
    rank_score = np.abs(score) if is_signed(metric) else score
    absolute = np.abs(delta)
    stats = {
        "spearman_abs": lambda i: _spearman(rank_score[i], absolute[i]),
        "kendall_abs": lambda i: _kendall(rank_score[i], absolute[i]),
        "spearman_signed": lambda i: _spearman(score[i], delta[i]),
        "kendall_signed": lambda i: _kendall(score[i], delta[i]),
        "precision_at_k": lambda i: precision_at_k(rank_score[i], absolute[i], k),
    }
    everything = np.arange(len(delta))
    gen = np.random.default_rng(seed)
    draws = [gen.integers(0, len(delta), len(delta)) for _ in range(n_boot)]
    out = {}
    for name, f in stats.items():
        boot = np.array([f(i) for i in draws])
        boot = boot[np.isfinite(boot)]
        out[name] = f(everything)
        out[f"{name}_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot.size else None
    return out


def summarize(plan: list[dict], done: dict, metrics: list[str], config: ValidateConfig) -> dict:
    sample = [r for r in plan if "sample" in r["source"]]
    delta = np.array([done[key_of(r)]["delta_nll"] for r in sample])
    k = max(1, min(config.topk, len(sample) // 10))
    out = {"n_sample": len(sample), "n_ablations": len(plan), "precision_k": k, "perturb": config.perturb,
           "metric_list": metrics,
           "baseline_mean_nll": done["baseline"]["mean_nll"], "metrics": {}}
    for m in metrics:
        score = np.array([r[m] for r in sample])
        ok = np.isfinite(score)
        figures = metric_figures(score[ok], delta[ok], m, k, config.n_bootstrap, config.data.seed)
        own = [done[key_of(r)]["delta_nll"] for r in plan if f"top:{m}" in r["source"]]
        figures["own_topk_mean_abs_delta_nll"] = float(np.mean(np.abs(own))) if own else None
        figures["signed"] = is_signed(m)
        figures["n_scored"] = int(ok.sum())
        out["metrics"][m] = figures
    return out


def key_of(row: dict) -> str:
    return f"{row['tensor']}:{row['flat_index']}"


def scatter_plots(plan: list[dict], done: dict, metrics: list[str], plot_dir: Path) -> None:
    """Per metric, |score| against |ΔNLL| of the sampled weights on log axes; colour = sign of ΔNLL."""
    from esa import plots

    sample = [r for r in plan if "sample" in r["source"]]
    delta = np.array([done[key_of(r)]["delta_nll"] for r in sample])
    for m in metrics:
        score = np.abs(np.array([r[m] for r in sample]))
        keep = (score > 0) & (np.abs(delta) > 0) & np.isfinite(score)
        fig, ax = plots.plt.subplots(figsize=(5.2, 4.4))
        for sign, colour, label in ((1, "tab:red", "ΔNLL > 0"), (-1, "tab:blue", "ΔNLL < 0")):
            at = keep & (np.sign(delta) == sign)
            ax.scatter(score[at], np.abs(delta[at]), s=6, alpha=0.5, c=colour, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"|{m}|")
        ax.set_ylabel("|ΔNLL| (nats/token)")
        ax.set_title(f"{m}: {int(keep.sum())} sampled weights")
        ax.legend(fontsize=8)
        plots.save(fig, plot_dir / f"scatter_{m}")
