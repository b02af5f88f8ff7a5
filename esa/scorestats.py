"""Statistics of a profile's scores and of its selection: what ``esa profile`` writes besides the weights.

- :func:`score_statistics`: per scored tensor, per component and for the whole model, the heavy-tail statistics
  of :mod:`esa.tailstats` (``tensor_stats.csv`` rows in :data:`STATS_COLUMNS`, ``score_stats.json``); the fits
  run in worker processes when there are many (:func:`describe_all`);
- :func:`location_table`: per (layer, component), the top-k count, its share of the top-k and the share of the
  score mass (``locations.csv``), and the share of the top-k in the embeddings and the LM head;
- :func:`experts_table`: the same per (layer, expert) of a mixture of experts (``experts.csv``, :mod:`esa.experts`);
- :func:`bottom_k_record`, :func:`top1_record`: how bottom-k was chosen and where the top-1 weight is
  (``metrics.json``).
"""

from __future__ import annotations

import itertools
import os

import torch

from esa import distributed, tailstats
from esa.experts import expert_rows
from esa.scoreselect import MIN_TAIL_VALUES, Selection
from esa.selection import WeightSet
from esa.tensors import TensorInfo

STATS_COLUMNS = ("numel", "zeros", "mean", "std", "max", "max_over_mean", "q50", "q90", "q99", "q999", "gini",
                 "excess_kurtosis", "topk", "topk_mass_share", "tail_m", "hill_alpha", "best_fit",
                 "R_powerlaw_vs_exponential", "p_powerlaw_vs_exponential", "R_powerlaw_vs_lognormal",
                 "p_powerlaw_vs_lognormal", "stretched_exp_beta", "p_stretched_exp_vs_exponential",
                 "heavier_than_exponential")
EDGE_COMPONENTS = ("embed", "lm_head")


def _group_key(t: TensorInfo) -> str:
    return t.component


STATISTICS_WORKERS_MIN_TENSORS = 64  # below this many distributions the fits run in this process


def statistics_workers(n: int, *, leave: int = 0) -> int:
    """Worker processes for ``n`` tail fits: one per available core but ``leave`` (kept for this process), the
    cores shared by the ranks of a torchrun launch on this machine; none for fewer than
    :data:`STATISTICS_WORKERS_MIN_TENSORS` distributions (starting a worker costs about what a few dozen fits do)
    or when fewer than two cores would work."""
    if n < STATISTICS_WORKERS_MIN_TENSORS:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = cores // distributed.local_world_size() - leave
    return min(cores, n // 8) if cores > 1 else 0


class FitWorkers:
    """The worker processes of :func:`describe_all`, as a context manager that always shuts them down.

    Each worker is a spawned interpreter that imports numpy and scipy before its first fit (about a second).
    Opened before the scores exist, as ``esa profile`` does, the workers start while the model is scored, so that
    start is not paid in the statistics phase; and each tensor's fits start as soon as its summary exists
    (:meth:`prefetch`, called during selection), so only the pooled distributions are left for the statistics
    phase. That pays where this process mostly waits for a GPU; where it scores on the CPU, the workers would
    only take its cores, so ``early=False`` starts them at the first :meth:`describe` and ignores prefetches.
    ``workers`` ≤ 1: no processes, the fits run in this process. A pool
    that cannot start leaves the fits to this process, unless ``describe(..., fallback=False)``, which raises."""

    def __init__(self, workers: int, *, early: bool = True) -> None:
        self.workers = workers
        self.early = early
        self._pool = None
        self._error: BaseException | None = None
        self._prefetched: dict[str, tuple] = {}  # key -> (summary, k, future), from prefetch()

    def __enter__(self) -> FitWorkers:
        if self.early:
            self._start()
        return self

    def _start(self) -> None:
        if self.workers <= 1 or self._pool is not None or self._error is not None:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):  # a task per worker starts every worker now, in the background
                self._pool.submit(tailstats.ready)
        except OSError as e:
            self._error = e
            self._shut()

    def __exit__(self, *exc) -> bool:
        self._shut()
        return False

    def _shut(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def prefetch(self, key: str, summary: tailstats.TensorSummary, k: int) -> None:
        """Start the fits of ``summary`` in a worker now (while later tensors are still being selected);
        :meth:`describe` collects them under ``key``. Without started workers (none, or not ``early``) nothing
        happens here."""
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is not None:
            try:
                self._prefetched[key] = (summary, k, self._pool.submit(tailstats.describe, summary, k))
            except (RuntimeError, BrokenProcessPool):  # a broken pool: describe() falls back
                pass

    def describe(self, summaries: list[tailstats.TensorSummary], k: int, *, keys: list[str | None] | None = None,
                 fallback: bool = True) -> list[dict]:
        """:func:`esa.tailstats.describe` of each summary, in order, in the workers when there are some; a summary
        prefetched under its key (the same object, the same k) is not fitted again."""
        from concurrent.futures.process import BrokenProcessPool

        self._start()
        if self._error is not None and not fallback:
            raise self._error
        if self._pool is not None:
            found = [self._prefetched.get(key) for key in keys or [None] * len(summaries)]
            found = [f if f is not None and f[0] is s and f[1] == k else None for f, s in zip(found, summaries)]
            try:
                rest = [s for s, f in zip(summaries, found) if f is None]
                fitted = iter(self._pool.map(tailstats.describe, rest, itertools.repeat(k),
                                             chunksize=max(1, len(rest) // (4 * self.workers))))
                return [next(fitted) if f is None else f[2].result() for f in found]
            except (OSError, BrokenProcessPool):
                if not fallback:
                    raise
        return [tailstats.describe(s, k) for s in summaries]


def describe_all(summaries: list[tailstats.TensorSummary], k: int, *, workers: int | None = None,
                 fallback: bool = True, fits: FitWorkers | None = None, keys: list[str | None] | None = None
                 ) -> list[dict]:
    """:func:`esa.tailstats.describe` of each summary, in order. The fits (a Nelder–Mead lognormal and a bounded
    stretched-exponential maximum likelihood per distribution) are what the statistics phase costs, so with many
    distributions they run in worker processes: ``fits`` (opened earlier by the caller), else ``workers`` of them
    started here (default :func:`statistics_workers`). Each fit is a pure function of its summary, so the results
    are the same floats either way. A pool that cannot start falls back to this process (``fallback=False``: the
    error is raised). ``keys``: the names under which ``fits`` may hold summaries prefetched during selection."""
    if fits is not None:
        return fits.describe(summaries, k, keys=keys, fallback=fallback)
    with FitWorkers(statistics_workers(len(summaries)) if workers is None else workers) as started:
        return started.describe(summaries, k, fallback=fallback)


def score_statistics(selection: Selection, k: int, *, workers: int | None = None, fits: FitWorkers | None = None
                     ) -> tuple[dict, list[tuple]]:
    """(score_stats.json content, tensor_stats.csv rows); the tail fits through :func:`describe_all` (in ``fits``
    when the caller opened them)."""
    tail = max(k, MIN_TAIL_VALUES)
    components: dict[str, list[tailstats.TensorSummary]] = {}
    for t in selection.tensors:
        components.setdefault(_group_key(t), []).append(selection.summaries[t.name])
    pooled = [tailstats.combine(list(selection.summaries.values()), tail=tail)]
    pooled += [tailstats.combine(s, tail=tail) for s in components.values()]
    described = describe_all([selection.summaries[t.name] for t in selection.tensors] + pooled, k, workers=workers,
                             fits=fits, keys=[t.name for t in selection.tensors] + [None] * len(pooled))
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


def bottom_k_record(bottom: WeightSet) -> dict:
    """How bottom_k was chosen: its size, and how many unused (zero-score) weights it left out (None when
    ``--bottom-k-include-unused`` let it pick them)."""
    return {"selected": len(bottom), "unused_left_out": bottom.meta.get("unused_left_out"),
            "include_unused": "unused_left_out" not in bottom.meta}


def top1_record(ws: WeightSet, tensors: list[TensorInfo]) -> dict | None:
    """The first weight of ``ws`` (the top-1 of a top-k): tensor, layer, component, expert, row, col, flat index and
    score; None for an empty set."""
    if not len(ws):
        return None
    info = {t.name: t for t in tensors}[ws.tensor[0]]
    c = info.coordinates(torch.tensor([int(ws.flat_index[0])]))
    expert = int(c["expert"][0]) if c["expert"] is not None else info.expert
    return {"tensor": ws.tensor[0], "layer": info.layer, "component": info.component, "expert": expert,
            "row": int(c["row"][0]), "col": None if c["col"] is None else int(c["col"][0]),
            "flat_index": int(ws.flat_index[0]), "score": float(ws.score[0])}
