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

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from esa.callmodule import make_callable
from esa.config import VALIDATE_KINDS, ValidateConfig, resolve_attention, to_dict, validate
from esa.errors import EsaError
from esa.evaluate import evaluate, require_finite
from esa.fingerprint import model_fingerprint
from esa.manifest import Timer, build_manifest
from esa.perturbation import PerturbSpec, perturbed
from esa.plan import with_planned_batch_size
from esa.runio import (MANIFEST, append_jsonl, atomic_write_csv, atomic_write_json, atomic_write_jsonl,
                       begin_run, clear_run_files, prepare_resumable_run, read_csv_rows, read_jsonl)
from esa.scoreselect import scored_tensors
from esa.scoring import METRICS, compute_scores, is_signed, needs_double_backward
from esa.seeding import stream_seed
from esa.selection import WeightSet, sample_distinct, select_extreme
from esa.session import Session, open_session
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


# ----------------------------------------------------------------------------------------------- the command
def key_of(row: dict) -> str:
    return f"{row['tensor']}:{row['flat_index']}"


def _prepare(config: ValidateConfig) -> tuple[Path, bool]:
    return prepare_resumable_run(Path(config.out_dir), config, overwrite=config.overwrite, marker="plan.csv",
                                 command="validate")


def run_validate(config: ValidateConfig, *, session: Session | None = None) -> dict:
    """Ablate, compare and write the run; ``session`` reuses a loaded model and its windows (``esa.api``)."""
    validate(config)
    second_order = any(needs_double_backward(m) for m in (config.metrics or ["hutchinson_diag"]))
    # scoring (the costliest metric asked for) and single-weight evaluations: perturb's phases
    config = replace(config, data=with_planned_batch_size(
        config.model, replace(config.selection, metric="hutchinson_diag" if second_order else "grad_x_weight"),
        config.data, command="perturb"))
    out_dir, resuming = _prepare(config)
    requested = to_dict(config)  # config.json: what was asked (a resumed run must ask the same)
    timer = Timer()
    with timer.phase("load"):  # every metric by default, hutchinson_diag among them
        session = session or open_session(resolve_attention(config.model, config.metrics or ["hutchinson_diag"]),
                                          config.data)
    model = session.loaded.model
    params = dict(model.named_parameters())
    metrics = list(config.metrics) or default_metrics(
        sum(t.numel for t, _ in scored_tensors(model, config.selection)), config.selection.hessian_budget)
    score_meta: dict = {}
    if resuming:
        plan = read_plan(out_dir / "plan.csv", metrics)
    else:
        with timer.phase("score"):
            plan, score_meta = build_plan(config, session, metrics)
        begin_run(out_dir, True)
        clear_run_files(out_dir, [ABLATIONS, "validate.csv", "validate.json"])
        write_plan(out_dir / "plan.csv", plan, metrics)
        atomic_write_json(out_dir / "config.json", requested)

    path = out_dir / ABLATIONS
    records = read_jsonl(path)
    if records:  # rewrite without a torn tail, so the next append starts on a line of its own
        atomic_write_jsonl(path, records)
    done = {r["key"]: r for r in records}
    windows = session.windows.input_ids
    bs = config.data.batch_size
    fingerprint = model_fingerprint(model)
    spec = PerturbSpec(config.perturb)
    with timer.phase("ablations"):
        if "baseline" not in done:
            base = evaluate(model, windows, batch_size=bs, description="baseline")
            require_finite(base)
            done["baseline"] = {"key": "baseline", "mean_nll": base.mean_nll,
                                "windows_sha256": session.windows.token_sha256()}
            append_jsonl(path, done["baseline"])
        elif done["baseline"]["windows_sha256"] != session.windows.token_sha256():
            raise EsaError(f"{out_dir}: the evaluation windows differ from the interrupted run's; use --overwrite")
        base_nll = done["baseline"]["mean_nll"]
        for row in plan:
            key = key_of(row)
            if key in done:
                continue
            t0 = time.perf_counter()
            one = WeightSet([row["tensor"]], np.array([row["flat_index"]]), np.array([np.nan]), np.array([0]),
                            "explicit")
            with perturbed(params, one, spec, seed=0):
                result = evaluate(model, windows, batch_size=bs, description=key)
            done[key] = {"key": key, "delta_nll": result.mean_nll - base_nll, "mean_nll": result.mean_nll,
                         "finite": result.finite, "seconds": round(time.perf_counter() - t0, 4)}
            append_jsonl(path, done[key])
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the model's weights changed during the ablations: restoration failed")

    with timer.phase("statistics"):
        summary = summarize(plan, done, metrics, config)
    infos = {t.name: t for t, _ in scored_tensors(model, config.selection)}
    csv_rows = []
    for r in plan:
        info = infos[r["tensor"]]
        c = info.coordinates(torch.tensor([r["flat_index"]]))
        csv_rows.append((r["tensor"], r["flat_index"], int(c["row"][0]), "" if c["col"] is None else int(c["col"][0]),
                         "" if c["expert"] is None else int(c["expert"][0]), ";".join(r["source"]),
                         repr(done[key_of(r)]["delta_nll"]), *[repr(r[m]) for m in metrics]))
    atomic_write_csv(out_dir / "validate.csv", ("tensor", "flat_index", "row", "col", "expert", "source", "delta_nll",
                                                *metrics), csv_rows)
    atomic_write_json(out_dir / "validate.json", summary)
    with timer.phase("plots"):
        scatter_plots(plan, done, metrics, out_dir / "plots")
    extra = {**session.describe(), "model_fingerprint": fingerprint, "resumed": resuming,
             "scoring": {"metrics": metrics, "meta": score_meta}}
    atomic_write_json(out_dir / MANIFEST, build_manifest("validate", timer=timer, extra=extra))
    return {"out_dir": out_dir, "summary": summary}


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


make_callable(__name__)  # esa.validate(...) is esa.api.validate (see esa.callmodule)
