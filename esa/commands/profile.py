"""``esa profile``: score every weight, select the top-k / bottom-k, and describe the score distribution.

Files in the run directory:
- ``top_weights.csv`` / ``bottom_weights.csv``: rank, tensor, layer, component, expert, row, col, flat_index,
  score, weight (the selection that ``esa perturb --from-profile`` reuses);
- ``tensor_stats.csv``: per scored tensor, the statistics of :mod:`esa.tailstats` (computed by :mod:`esa.scorestats`);
- ``score_stats.json``: the same for the whole model and per component, plus zero counts;
- ``locations.csv``: layer × component table of top-k counts and of score mass;
- ``experts.csv`` (mixture-of-experts models): per layer and expert, top-k count, share of top-k, share of score
  mass (of the model and of the layer's experts): see :mod:`esa.experts`;
- ``ccdf.csv``: per component, the score CCDF P(S ≥ x) at up to 400 log-spaced points (what the plots draw);
- ``metrics.json``: headline numbers (share of top-k in embeddings / lm_head, tail index, stability, and under
  ``bottom_k`` how many unused (zero-score) weights bottom-k left out: see :mod:`esa.selection`);
- ``stability.json`` and ``stability/top_weights_seed<S>.csv`` with ``--stability-check``;
- ``scores.safetensors`` with ``--save-scores`` (float32, one entry per tensor: 4 bytes per weight);
- ``plots/`` with ``--save-plots``; ``config.json``; ``experiment_manifest.json`` (last; its ``timings_s`` gives
  the phases: ``score`` the scoring passes, ``selection`` selecting and summarising each group's scores,
  ``statistics`` the tail fits and tables, ...).

Score groups: the scored tensors are split into contiguous groups (``--score-groups``, or the plan's choice on
CUDA), each scored in its own pass over the same windows; of each buffer only its top and bottom candidates and
its tail summary are kept before the next group starts. Selections are merged from those candidates in model
order, so every file is byte-identical to a single-group run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from esa import distributed
from esa.ccdf import ccdf_curves, ccdf_rows
from esa.config import ProfileConfig, SelectionConfig, to_dict, validate
from esa.experts import EXPERTS_HEADER
from esa.manifest import Timer, build_manifest
from esa.placement import weight_tensors
from esa.planning import predicted_peak, refuse_if_it_cannot_fit, with_planned_batch_size
from esa.runio import MANIFEST, atomic_write_csv, atomic_write_json, begin_run, prepare_run_dir
from esa.scorefile import ScoreFile
from esa.scoreselect import open_for_selection, resolved_for, score_and_select
from esa.scorestats import (STATS_COLUMNS, FitWorkers, bottom_k_record, experts_table, location_table,
                            score_statistics, statistics_workers, top1_record)
from esa.scoring import needs_data
from esa.session import Session
from esa.stability import stability
from esa.tensors import scored_tensors
from esa.weightsfile import write_weights


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
    # On a GPU the tail fits' worker processes start now, while the model is scored, and each tensor's fits start
    # as soon as its summary exists; on a CPU they would take the cores that score (one distribution per scored
    # tensor, per component and the model's; one core is left to this process).
    on_gpu = session.loaded.device.type == "cuda"
    fits = FitWorkers(statistics_workers(len(scored_tensors(model, sel)) + 1, leave=int(on_gpu)), early=on_gpu)
    try:
        with fits:
            with timer.phase("score"):
                selection, scoring = score_and_select(
                    session, sel, session.windows.input_ids, batch_size=config.data.batch_size,
                    seed=config.data.seed, summarize=True, fits=fits,
                    on_scores=None if score_file is None else lambda s: [score_file.add(n, v)
                                                                         for n, v in s.scores.items()])
            timer.split("score", "selection", scoring["selection_s"])
            with timer.phase("statistics"):
                stats, stat_rows = score_statistics(selection, sel.topk, fits=fits)
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
        "top1": top1_record(selection.top, selection.tensors),
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


def _open_score_file(out_dir: Path, model: torch.nn.Module, sel: SelectionConfig, n_windows: int,
                     batch_size: int) -> ScoreFile:
    n_batches = -(-n_windows // batch_size) if needs_data(sel.metric) else 0
    tensors = [t for t, _ in scored_tensors(model, sel)]
    return ScoreFile(out_dir / "scores.safetensors", tensors, {"metric": sel.metric, "n_batches": n_batches})
