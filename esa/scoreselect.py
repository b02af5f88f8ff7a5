"""Scores → selection: score a session's tensors in groups and keep, per tensor, its top / bottom candidates and
tail summary; merge them into the top-k and bottom-k of :mod:`esa.selection` (per_layer or global).

Score groups: the scored tensors are split into contiguous groups (``--score-groups``, or the plan's choice on
CUDA), each scored in its own pass over the same windows; of each buffer only its top and bottom candidates and
its tail summary are kept before the next group starts. Selections are merged from those candidates in model
order, so the result is identical to a single-group run.

Used by ``esa profile``, ``esa perturb`` (re-selection, stability) and ``esa validate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from esa import tailstats
from esa.config import ModelConfig, SelectionConfig, resolve_attention, resolve_seq_len
from esa.experts import expert_mass
from esa.planning import planned_groups
from esa.scorescan import scan
from esa.scoregroups import score_groups, split_groups
from esa.scoring import ScoreSet, compute_scores, is_signed, require_act_mag_tensors
from esa.selection import Candidates, WeightSet, merge_candidates, tensor_candidates
from esa.session import Session, open_session
from esa.tensors import TensorInfo, scored_tensors
from esa.windows import Windows, seeded_subset, stability_subset_size

MIN_TAIL_VALUES = 1000


@dataclass
class Selection:
    """Scores reduced to what later steps need: the chosen sets and the tensors they come from."""

    tensors: list[TensorInfo]
    top: WeightSet
    bottom: WeightSet
    summaries: dict[str, tailstats.TensorSummary] = field(default_factory=dict)
    expert_mass: dict[str, list[float]] = field(default_factory=dict)  # per fused expert stack: Σ|S| per expert


@dataclass
class Reduced:
    """What selection and statistics keep of one tensor's scores once its buffer is freed."""

    top: Candidates
    bottom: Candidates
    summary: tailstats.TensorSummary | None
    expert_mass: list[float] | None = None  # a fused expert stack's Σ|S| per expert (with ``summarize``)


def reduce_scores(scores: ScoreSet, k: int, *, summarize: bool, seed: int, skip_unused: bool = True,
                  on_summary: Callable[[str, tailstats.TensorSummary], None] | None = None) -> dict[str, Reduced]:
    """Per scored tensor: its top-k and bottom-k candidates and, with ``summarize``, its tail-statistics summary
    (of |S| for a signed metric). ``skip_unused``: bottom-k leaves out zero-score weights (:mod:`esa.selection`).

    What each buffer costs, all on the score's device: with ``summarize`` the seeded sample
    (:func:`esa.tailstats.draw_sample`); one read (:func:`esa.scorescan.scan`, of |S| for a signed metric, never
    materialised on a GPU) that gives the block extrema, the zero count, finiteness and, with ``summarize``, the
    float64 power sums about the sample's mean; then two selections among the best k blocks
    (:func:`esa.scorescan.block_select`), the largest max(k, tail) scores serving both the top-k and the tail
    statistics. ``on_summary(name, summary)`` sees each summary as soon as it exists.
    """
    out = {}
    tail = max(k, MIN_TAIL_VALUES)
    absolute = is_signed(scores.metric)  # rank |S|, taken as each element is read (no copy of the buffer)
    for t in scores.tensors:
        if t.name not in scores.scores:
            continue
        s = scores.scores[t.name]
        flat = s.detach().reshape(-1)
        sample = tailstats.draw_sample(flat, seed) if summarize else None
        sample = sample.abs() if sample is not None and absolute else sample
        shift = float(sample.double().mean()) if sample is not None else None
        scanned = scan(flat, shift=shift, nonzero_min=skip_unused, absolute=absolute)
        top = tensor_candidates(t.name, s, tail if summarize else k, largest=True, metric=scores.metric,
                                scanned=scanned)
        bottom = tensor_candidates(t.name, s, k, largest=False, metric=scores.metric, skip_unused=skip_unused,
                                   scanned=scanned)
        summary = None
        if summarize:
            summary = tailstats.summarize(s, tail, seed=seed, top=top.values, sample=sample,
                                          stats=tailstats.scan_moments(scanned, float(top.values[0])))
            if on_summary is not None:
                on_summary(t.name, summary)
        out[t.name] = Reduced(top, bottom, summary, expert_mass(s) if summarize and t.is_expert_stack else None)
    return out


def score_and_select(session: Session, sel: SelectionConfig, windows: torch.Tensor, *, batch_size: int, seed: int,
                     summarize: bool = False, groups: int | None = None, on_scores=None, fits=None
                     ) -> tuple[Selection, dict]:
    """Score the selected tensors in ``groups`` passes over ``windows`` (default: :func:`score_groups`), holding one
    group's score buffers at a time,
    keeping per tensor only its candidates and summary; ``on_scores(ScoreSet)`` sees each group's buffers first;
    ``fits`` (:class:`esa.scorestats.FitWorkers`) gets each summary as it is made, to fit it while selection goes on.

    Returns the selection and a description of the scoring (metric, batches, groups, the metric's notes, and
    ``selection_s``: the seconds of it spent on selection and summaries, between the scores' completion and the
    candidates' arrival on the host).
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
        started = _settled(session)
        reduced.update(reduce_scores(scores, sel.topk, summarize=summarize, seed=seed,
                                     skip_unused=not sel.bottom_k_include_unused,
                                     on_summary=None if fits is None else partial(fits.prefetch, k=sel.topk)))
        described["selection_s"] = described.get("selection_s", 0.0) + _settled(session) - started
        described["n_batches"] = scores.n_batches
        for key, value in scores.meta.items():  # act_mag lists skipped tensors per group
            described["meta"][key] = described["meta"].get(key, []) + value if isinstance(value, list) else value
        del scores
    infos = [t for t, _ in tensors if t.name in reduced]
    require_act_mag_tensors(len(infos))  # only act_mag leaves tensors out
    top = merge_candidates(infos, {n: r.top for n, r in reduced.items()}, sel.topk, sel.mode, largest=True)
    bottom = merge_candidates(infos, {n: r.bottom for n, r in reduced.items()}, sel.topk, sel.mode, largest=False)
    summaries = {n: r.summary for n, r in reduced.items()} if summarize else {}
    masses = {n: r.expert_mass for n, r in reduced.items() if r.expert_mass is not None}
    return Selection(infos, top, bottom, summaries, masses), described


def _settled(session: Session) -> float:
    """time.perf_counter() once the session's device has finished its queued work (CUDA runs asynchronously)."""
    if session.loaded.device.type == "cuda":
        torch.cuda.synchronize(session.loaded.device)
    return time.perf_counter()


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


def open_for_selection(config_model: ModelConfig, data, sel: SelectionConfig) -> Session:
    """The session ``sel`` scores on: eager attention when its metric needs double backward (none of the
    arguments is changed; the run records the resolved values, see :func:`resolved_for`)."""
    return open_session(resolve_attention(config_model, [sel.metric]), data)


def resolved_for(config, session: Session):
    """``config`` as it ran on ``session``: attention and sequence length resolved (for config.json)."""
    return replace(config, model=resolve_attention(config.model, [config.selection.metric]),
                   data=resolve_seq_len(config.data, session.loaded.max_positions))
