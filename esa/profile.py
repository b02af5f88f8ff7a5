"""``esa profile``: score every weight, select the top-k / bottom-k, and describe the score distribution.

Files in the run directory:
- ``top_weights.csv`` / ``bottom_weights.csv``: rank, tensor, layer, component, expert, row, col, flat_index,
  score, weight (the selection that ``esa perturb --from-profile`` reuses);
- ``tensor_stats.csv``: per scored tensor, the statistics of :mod:`esa.tailstats`;
- ``score_stats.json``: the same for the whole model and per component, plus zero counts;
- ``locations.csv``: layer × component table of top-k counts and of score mass;
- ``experts.csv`` (mixture-of-experts models): per layer and expert, top-k count, share of top-k, share of score
  mass (of the model and of the layer's experts): see :mod:`esa.experts`;
- ``ccdf.csv``: per component, the score CCDF P(S ≥ x) at up to 400 log-spaced points (what the plots draw);
- ``metrics.json``: headline numbers (share of top-k in embeddings / lm_head, tail index, stability, and under
  ``bottom_k`` how many unused (zero-score) weights bottom-k left out: see :mod:`esa.selection`);
- ``stability.json`` and ``stability/top_weights_seed<S>.csv`` with ``--stability-check``;
- ``scores.safetensors`` with ``--save-scores`` (float32, one entry per tensor: 4 bytes per weight);
- ``plots/`` with ``--save-plots``; ``config.json``; ``experiment_manifest.json`` (last).

Score groups: the scored tensors are split into contiguous groups (``--score-groups``, or the plan's choice on
CUDA), each scored in its own pass over the same windows; of each buffer only its top and bottom candidates and
its tail summary are kept before the next group starts. Selections are merged from those candidates in model
order, so every file is byte-identical to a single-group run.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from esa import distributed, tailstats
from esa.callmodule import make_callable
from esa.ccdf import ccdf_curves, ccdf_rows
from esa.config import ProfileConfig, SelectionConfig, to_dict, validate
from esa.experts import EXPERTS_HEADER, expert_rows
from esa.manifest import Timer, build_manifest
from esa.placement import weight_tensors
from esa.plan import predicted_peak, refuse_if_it_cannot_fit, with_planned_batch_size
from esa.runio import MANIFEST, atomic_write_csv, atomic_write_json, begin_run, prepare_run_dir
from esa.scorefile import ScoreFile
from esa.scoreselect import (MIN_TAIL_VALUES, Selection, open_for_selection, resolved_for, score_and_select,
                             scored_tensors, seeded_selections)
from esa.scoring import needs_data
from esa.selection import WeightSet, jaccard
from esa.session import Session
from esa.tensors import TensorInfo
from esa.weightsfile import write_weights

STATS_COLUMNS = ("numel", "zeros", "mean", "std", "max", "max_over_mean", "q50", "q90", "q99", "q999", "gini",
                 "excess_kurtosis", "topk", "topk_mass_share", "tail_m", "hill_alpha", "best_fit",
                 "R_powerlaw_vs_exponential", "p_powerlaw_vs_exponential", "R_powerlaw_vs_lognormal",
                 "p_powerlaw_vs_lognormal", "stretched_exp_beta", "p_stretched_exp_vs_exponential",
                 "heavier_than_exponential")
EDGE_COMPONENTS = ("embed", "lm_head")














# ----------------------------------------------------------------------------------------------- weights files






# ----------------------------------------------------------------------------------------------- statistics
def _group_key(t: TensorInfo) -> str:
    return t.component


STATISTICS_WORKERS_MIN_TENSORS = 64  # below this many distributions the fits run in this process


def statistics_workers(n: int) -> int:
    """Worker processes for ``n`` tail fits: one per available core, none for fewer than
    :data:`STATISTICS_WORKERS_MIN_TENSORS` (starting a worker costs about what a few dozen fits do)."""
    if n < STATISTICS_WORKERS_MIN_TENSORS:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, n // 8) if cores > 1 else 0


def describe_all(summaries: list[tailstats.TensorSummary], k: int, *, workers: int | None = None,
                 fallback: bool = True) -> list[dict]:
    """:func:`esa.tailstats.describe` of each summary, in order. The fits (a Nelder–Mead lognormal and a bounded
    stretched-exponential maximum likelihood per distribution) are what the statistics phase costs, so with many
    distributions they run in ``workers`` spawned processes (default :func:`statistics_workers`); each is a pure
    function of its summary, so the results are the same floats either way. A pool that cannot start falls back
    to this process (``fallback=False``: the error is raised)."""
    workers = statistics_workers(len(summaries)) if workers is None else workers
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                return list(pool.map(tailstats.describe, summaries, itertools.repeat(k),
                                     chunksize=max(1, len(summaries) // (4 * workers))))
        except (OSError, BrokenProcessPool):
            if not fallback:
                raise
    return [tailstats.describe(s, k) for s in summaries]


def score_statistics(selection: Selection, k: int, *, workers: int | None = None) -> tuple[dict, list[tuple]]:
    """(score_stats.json content, tensor_stats.csv rows); the tail fits through :func:`describe_all`."""
    tail = max(k, MIN_TAIL_VALUES)
    components: dict[str, list[tailstats.TensorSummary]] = {}
    for t in selection.tensors:
        components.setdefault(_group_key(t), []).append(selection.summaries[t.name])
    pooled = [tailstats.combine(list(selection.summaries.values()), tail=tail)]
    pooled += [tailstats.combine(s, tail=tail) for s in components.values()]
    described = describe_all([selection.summaries[t.name] for t in selection.tensors] + pooled, k, workers=workers)
    per_tensor = {}
    rows = []
    for t, d in zip(selection.tensors, described):
        per_tensor[t.name] = d
        rows.append((t.name, "" if t.layer is None else t.layer, t.component, *[d.get(c, "") for c in STATS_COLUMNS]))
    model_wide = described[len(selection.tensors)]
    per_component = dict(zip(components, described[len(selection.tensors) + 1:]))
    return {"model": model_wide, "components": per_component, "tensors": per_tensor}, rows


def location_table(selection: Selection) -> tuple[list[tuple], dict]:
    """Rows (layer, component, topk_count, topk_share, score_mass_share) and a summary of edge components."""
    info = {t.name: t for t in selection.tensors}
    counts: dict[tuple, int] = {}
    for name in selection.top.tensor:
        key = (info[name].layer, info[name].component)
        counts[key] = counts.get(key, 0) + 1
    mass: dict[tuple, float] = {}
    for t in selection.tensors:
        key = (t.layer, t.component)
        mass[key] = mass.get(key, 0.0) + (selection.summaries[t.name].total if selection.summaries else 0.0)
    total_mass = sum(mass.values()) or 1.0
    n_top = max(1, len(selection.top))
    keys = sorted(set(counts) | set(mass), key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    rows = [("" if layer is None else layer, comp, counts.get((layer, comp), 0), counts.get((layer, comp), 0) / n_top,
             mass.get((layer, comp), 0.0) / total_mass) for layer, comp in keys]
    edge = {c: sum(v for (l, comp), v in counts.items() if comp == c) / n_top for c in EDGE_COMPONENTS}
    tensors_hit = len(set(selection.top.tensor))
    top_tensor_share = max(selection.top.counts().values()) / n_top if len(selection.top) else 0.0
    return rows, {"topk_share_embed": edge["embed"], "topk_share_lm_head": edge["lm_head"],
                  "tensors_with_topk": tensors_hit, "largest_single_tensor_share": top_tensor_share}


def experts_table(selection: Selection) -> list[tuple]:
    """experts.csv rows (:mod:`esa.experts`): per (layer, expert), top-k count and score mass; empty without
    expert tensors."""
    totals = {n: s.total for n, s in selection.summaries.items()}
    return expert_rows(selection.tensors, selection.top.tensor, selection.top.flat_index, totals,
                       selection.expert_mass)










# ----------------------------------------------------------------------------------------------- stability


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


# ----------------------------------------------------------------------------------------------- the command




def run_profile(config: ProfileConfig, *, command: str = "profile", session: Session | None = None) -> dict:
    """Score, select and write the run; ``session`` reuses a loaded model and its windows (``esa run``)."""
    validate(config)
    out_dir = prepare_run_dir(Path(config.out_dir), overwrite=config.overwrite)
    config = replace(config, data=with_planned_batch_size(config.model, config.selection, config.data,
                                                          command="profile"))
    timer = Timer()
    if session is None:
        refuse_if_it_cannot_fit(config.model, config.selection, config.data, command="profile")
    with timer.phase("load"):
        session = session or open_for_selection(config.model, config.data, config.selection)
    config = resolved_for(config, session)
    model = session.loaded.model
    params = weight_tensors(model, writable=False)  # offloaded weights: the copies accelerate keeps
    sel = config.selection
    score_file = _open_score_file(out_dir, model, sel, session.windows.n, config.data.batch_size) \
        if config.save_scores and distributed.is_main() else None  # under torchrun, rank 0 writes
    try:
        with timer.phase("score"):
            selection, scoring = score_and_select(
                session, sel, session.windows.input_ids, batch_size=config.data.batch_size, seed=config.data.seed,
                summarize=True,
                on_scores=None if score_file is None else lambda s: [score_file.add(n, v) for n, v in s.scores.items()])
        with timer.phase("statistics"):
            stats, stat_rows = score_statistics(selection, sel.topk)
            loc_rows, loc_summary = location_table(selection)
            curves = ccdf_curves(selection)
            exp_rows = experts_table(selection)
        stab = None
        if config.stability_check:
            with timer.phase("stability"):
                stab, seed_selections = stability(session, config)
        begin_run(out_dir, config.overwrite)
        if score_file is not None:
            score_file.commit()
    finally:
        if score_file is not None:
            score_file.close()
    atomic_write_json(out_dir / "config.json", to_dict(config))
    write_weights(out_dir / "top_weights.csv", selection.top, selection.tensors, params)
    write_weights(out_dir / "bottom_weights.csv", selection.bottom, selection.tensors, params)
    atomic_write_csv(out_dir / "tensor_stats.csv", ("tensor", "layer", "component", *STATS_COLUMNS), stat_rows)
    atomic_write_json(out_dir / "score_stats.json", stats)
    atomic_write_csv(out_dir / "ccdf.csv", ("component", "score", "ccdf"), ccdf_rows(curves))
    atomic_write_csv(out_dir / "locations.csv", ("layer", "component", "topk_count", "topk_share", "score_mass_share"),
                     loc_rows)
    if exp_rows:
        atomic_write_csv(out_dir / "experts.csv", EXPERTS_HEADER, exp_rows)
    if stab is not None:
        atomic_write_json(out_dir / "stability.json", stab)
        for s, chosen in seed_selections.items():
            write_weights(out_dir / "stability" / f"top_weights_seed{s}.csv", chosen.top, selection.tensors, params)
            write_weights(out_dir / "stability" / f"bottom_weights_seed{s}.csv", chosen.bottom, selection.tensors,
                          params)
    model_stats = stats["model"]
    metrics = {
        "metric": sel.metric,
        "mode": sel.mode,
        "topk": sel.topk,
        "selected": len(selection.top),
        "scored_tensors": len(selection.tensors),
        "scored_weights": int(sum(t.numel for t in selection.tensors)),
        "zero_scores": int(model_stats["zeros"]),
        "bottom_k": bottom_k_record(selection.bottom),
        "top1": _first(selection.top, selection.tensors),
        "topk_mass_share": model_stats["topk_mass_share"],
        "max_over_mean": model_stats["max_over_mean"],
        "excess_kurtosis": model_stats["excess_kurtosis"],
        "gini": model_stats["gini"],
        "hill_alpha": model_stats.get("hill_alpha"),
        "best_tail_fit": model_stats.get("best_fit"),
        "heavier_than_exponential": model_stats.get("heavier_than_exponential"),
        **loc_summary,
        "stability_mean_jaccard": stab["mean_jaccard"] if stab else None,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    if config.save_plots:
        with timer.phase("plots"):
            from esa.plots import profile_plots

            profile_plots(out_dir / "plots", selection, loc_rows, curves, metric=sel.metric)
    extra = {**session.describe(), "scoring": {"metric": sel.metric, "score_groups": scoring["score_groups"],
                                               "tensors": [t.name for t in selection.tensors], **scoring["meta"]}}
    planned = predicted_peak(model, list(selection.tensors), command="profile", metric=sel.metric,
                             seq_len=session.windows.input_ids.shape[1], n_windows=session.windows.n,
                             batch_size=config.data.batch_size, score_groups=scoring["score_groups"],
                             hutchinson_probes=sel.hutchinson_probes, device=str(session.loaded.device))
    atomic_write_json(out_dir / MANIFEST, build_manifest(command, timer=timer, extra=extra, planned_peak_bytes=planned))
    distributed.barrier()  # rank 0's files are complete before any rank goes on
    return {"out_dir": out_dir, "metrics": metrics, "stability": stab, "session": session, "selection": selection}


def bottom_k_record(bottom: WeightSet) -> dict:
    """How bottom_k was chosen: its size, and how many unused (zero-score) weights it left out (None when
    ``--bottom-k-include-unused`` let it pick them)."""
    return {"selected": len(bottom), "unused_left_out": bottom.meta.get("unused_left_out"),
            "include_unused": "unused_left_out" not in bottom.meta}


def _first(ws: WeightSet, tensors: list[TensorInfo]) -> dict | None:
    if not len(ws):
        return None
    info = {t.name: t for t in tensors}[ws.tensor[0]]
    c = info.coordinates(torch.tensor([int(ws.flat_index[0])]))
    expert = int(c["expert"][0]) if c["expert"] is not None else info.expert
    return {"tensor": ws.tensor[0], "layer": info.layer, "component": info.component, "expert": expert,
            "row": int(c["row"][0]), "col": None if c["col"] is None else int(c["col"][0]),
            "flat_index": int(ws.flat_index[0]), "score": float(ws.score[0])}




def _open_score_file(out_dir: Path, model: torch.nn.Module, sel: SelectionConfig, n_windows: int,
                     batch_size: int) -> ScoreFile:
    n_batches = -(-n_windows // batch_size) if needs_data(sel.metric) else 0
    tensors = [t for t, _ in scored_tensors(model, sel)]
    return ScoreFile(out_dir / "scores.safetensors", tensors, {"metric": sel.metric, "n_batches": n_batches})


make_callable(__name__)  # esa.profile(...) is esa.api.profile (see esa.callmodule)
