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
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from esa import distributed, tailstats
from esa.baseline import begin_run
from esa.config import (ModelConfig, ProfileConfig, SelectionConfig, resolve_attention, resolve_seq_len, to_dict,
                        validate)
from esa.errors import EsaError
from esa.experts import EXPERTS_HEADER, expert_mass, expert_rows
from esa.manifest import Timer, build_manifest
from esa.placement import weight_tensors
from esa.plan import planned_groups, predicted_peak, refuse_if_it_cannot_fit, with_planned_batch_size
from esa.runio import MANIFEST, atomic_write_csv, atomic_write_json, prepare_run_dir, read_csv_rows
from esa.scorefile import ScoreFile
from esa.scoring import ScoreSet, compute_scores, needs_data, ranking_view
from esa.selection import Candidates, WeightSet, jaccard, merge_candidates, tensor_candidates
from esa.session import Session, open_session
from esa.tensors import TensorInfo, select_tensors
from esa.windows import Windows, seeded_subset, stability_subset_size

WEIGHTS_HEADER = ("rank", "tensor", "layer", "component", "expert", "row", "col", "flat_index", "score", "weight")
STATS_COLUMNS = ("numel", "zeros", "mean", "std", "max", "max_over_mean", "q50", "q90", "q99", "q999", "gini",
                 "excess_kurtosis", "topk", "topk_mass_share", "tail_m", "hill_alpha", "best_fit",
                 "R_powerlaw_vs_exponential", "p_powerlaw_vs_exponential", "R_powerlaw_vs_lognormal",
                 "p_powerlaw_vs_lognormal", "stretched_exp_beta", "p_stretched_exp_vs_exponential",
                 "heavier_than_exponential")
EDGE_COMPONENTS = ("embed", "lm_head")
MIN_TAIL_VALUES = 1000


@dataclass
class Selection:
    """Scores reduced to what later steps need: the chosen sets and the tensors they come from."""

    tensors: list[TensorInfo]
    top: WeightSet
    bottom: WeightSet
    summaries: dict[str, tailstats.TensorSummary] = field(default_factory=dict)
    expert_mass: dict[str, list[float]] = field(default_factory=dict)  # per fused expert stack: Σ|S| per expert


def scored_tensors(model: torch.nn.Module, sel: SelectionConfig) -> list[tuple[TensorInfo, torch.nn.Parameter]]:
    tensors = select_tensors(model, sel.include, sel.exclude, biases=sel.include_biases, norms=sel.include_norms)
    if not tensors:
        raise EsaError("no tensor matches --include/--exclude (see tensor names with `esa tensors`)")
    return tensors


def split_groups(tensors: list[TensorInfo], n: int) -> list[list[TensorInfo]]:
    """``min(n, len(tensors))`` contiguous groups in model order, of about equal numbers of weights."""
    n = max(1, min(n, len(tensors)))
    total = sum(t.numel for t in tensors)
    groups: list[list[TensorInfo]] = [[]]
    done = 0
    for i, t in enumerate(tensors):
        to_open = n - len(groups)
        # a new group starts where the next tensor would end nearer the following boundary than this one
        if groups[-1] and (to_open >= len(tensors) - i or (to_open > 0 and done + t.numel / 2 >= total * len(groups) / n)):
            groups.append([])
        groups[-1].append(t)
        done += t.numel
    return groups


@dataclass
class Reduced:
    """What selection and statistics keep of one tensor's scores once its buffer is freed."""

    top: Candidates
    bottom: Candidates
    summary: tailstats.TensorSummary | None
    expert_mass: list[float] | None = None  # a fused expert stack's Σ|S| per expert (with ``summarize``)


def reduce_scores(scores: ScoreSet, k: int, *, summarize: bool, seed: int, skip_unused: bool = True
                  ) -> dict[str, Reduced]:
    """Per scored tensor: its top-k and bottom-k candidates and, with ``summarize``, its tail-statistics summary
    (of |S| for a signed metric). ``skip_unused``: bottom-k leaves out zero-score weights (:mod:`esa.selection`).

    What each buffer costs, all on the score's device: the ranking view (|S|, a copy, for a signed metric only);
    with ``summarize`` the two streamed moment passes of :func:`esa.tailstats.moments`, whose sum also tells
    whether every score is finite, and whose zero count is bottom-k's unused count; the seeded sample; then two
    threshold selections (:func:`esa.selection.threshold_select`: one comparison pass each), the largest
    max(k, tail) scores serving both the top-k and the tail statistics. Without ``summarize``: one finiteness pass,
    one zero count and the two selections.
    """
    out = {}
    tail = max(k, MIN_TAIL_VALUES)
    for t in scores.tensors:
        if t.name not in scores.scores:
            continue
        s = scores.scores[t.name]
        view = ranking_view(s, scores.metric)
        flat = view.detach().reshape(-1)
        if summarize:
            stats = tailstats.moments(flat)
            finite = math.isfinite(stats[0])  # a float64 sum of float32 values overflows only through inf/NaN
            unused = stats[1]
        else:
            stats = None
            finite = bool(torch.isfinite(s).all())
            unused = None
        if not finite:
            raise EsaError(f"scores of {t.name} contain NaN or inf: the loss or the weights are broken "
                           "(check the baseline, or try --dtype float32)")
        sample = tailstats.draw_sample(flat, seed)
        top = tensor_candidates(t.name, s, tail if summarize else k, largest=True, metric=scores.metric, view=view,
                                sample=sample, checked=True)
        bottom = tensor_candidates(t.name, s, k, largest=False, metric=scores.metric, skip_unused=skip_unused,
                                   view=view, sample=sample, unused=unused, checked=True)
        summary = None
        if summarize:
            summary = tailstats.summarize(view, tail, seed=seed, top=top.values, sample=sample, stats=stats)
        out[t.name] = Reduced(top, bottom, summary, expert_mass(s) if summarize and t.is_expert_stack else None)
    return out


def score_and_select(session: Session, sel: SelectionConfig, windows: torch.Tensor, *, batch_size: int, seed: int,
                     summarize: bool = False, groups: int | None = None, on_scores=None) -> tuple[Selection, dict]:
    """Score the selected tensors in ``groups`` passes over ``windows`` (default: :func:`score_groups`), holding one
    group's score buffers at a time,
    keeping per tensor only its candidates and summary; ``on_scores(ScoreSet)`` sees each group's buffers first.

    Returns the selection and a description of the scoring (metric, batches, groups, the metric's notes).
    """
    tensors = scored_tensors(session.loaded.model, sel)
    if groups is None and sel.score_groups is None:
        groups = planned_groups(session.loaded.model, [t for t, _ in tensors], command="profile", metric=sel.metric,
                                seq_len=windows.shape[1], n_windows=windows.shape[0], batch_size=batch_size,
                                hutchinson_probes=sel.hutchinson_probes, device=str(session.loaded.device))
    split = split_groups([t for t, _ in tensors], groups or score_groups(sel))
    reduced: dict[str, Reduced] = {}
    described: dict = {"metric": sel.metric, "score_groups": len(split), "meta": {}}
    for group in split:
        scores = compute_scores(session.loaded.model, tensors, windows, sel.metric, batch_size=batch_size,
                                hutchinson_probes=sel.hutchinson_probes, hessian_budget=sel.hessian_budget, seed=seed,
                                group=[t.name for t in group])
        if on_scores is not None:
            on_scores(scores)
        reduced.update(reduce_scores(scores, sel.topk, summarize=summarize, seed=seed,
                                     skip_unused=not sel.bottom_k_include_unused))
        described["n_batches"] = scores.n_batches
        for key, value in scores.meta.items():  # act_mag lists skipped tensors per group
            described["meta"][key] = described["meta"].get(key, []) + value if isinstance(value, list) else value
        del scores
    infos = [t for t, _ in tensors if t.name in reduced]
    if not infos:
        raise EsaError("act_mag scores Linear, Embedding, router and expert weights only, and none is selected")
    top = merge_candidates(infos, {n: r.top for n, r in reduced.items()}, sel.topk, sel.mode, largest=True)
    bottom = merge_candidates(infos, {n: r.bottom for n, r in reduced.items()}, sel.topk, sel.mode, largest=False)
    summaries = {n: r.summary for n, r in reduced.items()} if summarize else {}
    masses = {n: r.expert_mass for n, r in reduced.items() if r.expert_mass is not None}
    return Selection(infos, top, bottom, summaries, masses), described


# ----------------------------------------------------------------------------------------------- weights files
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


CCDF_POINTS = 400  # per component in ccdf.csv: enough for a smooth log-log curve


def ccdf_curves(selection: Selection) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per component, the empirical CCDF P(S ≥ x) of its scores, thinned to log-spaced points.

    The tail comes from the exact top scores (P = i / n), the body from the seeded sample (P = i / sample size,
    kept no lower than the exact tail's last value, so that the curve is monotone); zero scores are left out (a log axis cannot show them; their count is in score_stats.json).
    """
    by_component: dict[str, list[tailstats.TensorSummary]] = {}
    for t in selection.tensors:
        by_component.setdefault(_group_key(t), []).append(selection.summaries[t.name])
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


# ----------------------------------------------------------------------------------------------- stability
def seeded_selections(session: Session, sel: SelectionConfig, seeds: list[int], fraction: float, *,
                      batch_size: int) -> dict[int, tuple[Selection, Windows]]:
    """Per seed, the selection made on a seeded subset of round(fraction · n) evaluation windows, and the subset."""
    n = session.windows.n
    size = stability_subset_size(n, fraction)
    out = {}
    for s in seeds:
        subset = session.windows.subset(seeded_subset(n, size, s))
        chosen, _ = score_and_select(session, sel, subset.input_ids, batch_size=batch_size, seed=s)
        out[s] = (chosen, subset)
    return out


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
def open_for_selection(config_model: ModelConfig, data, sel: SelectionConfig) -> Session:
    """The session ``sel`` scores on: eager attention when its metric needs double backward (none of the
    arguments is changed; the run records the resolved values, see :func:`resolved_for`)."""
    return open_session(resolve_attention(config_model, [sel.metric]), data)


def resolved_for(config, session: Session):
    """``config`` as it ran on ``session``: attention and sequence length resolved (for config.json)."""
    return replace(config, model=resolve_attention(config.model, [config.selection.metric]),
                   data=resolve_seq_len(config.data, session.loaded.max_positions))


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


def score_groups(sel: SelectionConfig) -> int:
    """The number of score groups forced by ``--score-groups``, else one (the plan decides on CUDA)."""
    return sel.score_groups or 1


def _open_score_file(out_dir: Path, model: torch.nn.Module, sel: SelectionConfig, n_windows: int,
                     batch_size: int) -> ScoreFile:
    n_batches = -(-n_windows // batch_size) if needs_data(sel.metric) else 0
    tensors = [t for t, _ in scored_tensors(model, sel)]
    return ScoreFile(out_dir / "scores.safetensors", tensors, {"metric": sel.metric, "n_batches": n_batches})
