"""From scores to sets of weights: top-k, bottom-k and random-k, per tensor or over the whole model.

Order and ties: elements are ranked by score (descending for top-k, ascending for bottom-k); equal scores are
broken by the tensor's position in the model (earlier first), then by flat index (lower first). Global top-k is
exact without concatenating all scores: the k best of the union are among the k best of each tensor under the same
total order, so merging per-tensor candidates suffices (:func:`esa.kernels.merge_topk`). The merge runs tensor by
tensor, keeping only the best k so far, so it holds and sorts at most 2k candidates (k ≤ 2^30) whatever the number
of tensors. Per-tensor selection reads the buffer once (:func:`esa.scorescan.scan`: the largest and smallest value
of each block of 256 elements) and then selects exactly among the elements of the best k blocks
(:func:`esa.scorescan.block_select`); a buffer of few blocks goes through :func:`esa.kernels.topk`, which never
sorts more than 2^31 elements at once. Signed metrics (``taylor``, ``obd``) are ranked by |S|, one tensor's |S| at a time,
and the selected weights keep their signed score.

Unused weights and bottom-k: a weight whose score is exactly zero (its gradient is zero on every window, e.g. the
embedding row of a token that never occurs) is *unused* by the evaluation, not "least sensitive": perturbing it
cannot move the loss, so a bottom-k control made of such weights tests nothing. Bottom-k therefore ranks only the
weights with a non-zero score (``skip_unused=True``) and records how many were left out
(``meta["unused_left_out"]``); with fewer used weights than k it returns fewer than k.

``random_k`` draws uniformly without replacement, never picking an element of the top-k set; by default it is
stratified to the top-k set's per-tensor counts, so the control differs in *which* weights, not *where*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from esa.config import MODES  # noqa: F401 - re-exported
from esa.errors import EsaError
from esa.kernels import merge_topk, topk
from esa.scorescan import Scan, block_select, scan
from esa.scoring import ScoreSet, is_signed, ranking_view
from esa.seeding import stream_seed
from esa.tensors import TensorInfo

MAX_GLOBAL_K = 1 << 30  # the running merge sorts up to 2k candidates: at most 2^31


@dataclass
class WeightSet:
    """Selected elements, one entry per weight, in rank order (per tensor for per_layer, global for global)."""

    tensor: list[str]
    flat_index: np.ndarray  # int64
    score: np.ndarray  # float64; NaN where the set was not chosen by score
    rank: np.ndarray  # int64, 0-based, within the tensor (per_layer) or the model (global)
    kind: str = "top_k"  # top_k, bottom_k, random_k, explicit
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensor)

    def by_tensor(self) -> dict[str, torch.Tensor]:
        """Flat indices per tensor (int64, CPU), in first-appearance order."""
        groups: dict[str, list[int]] = {}
        for name, idx in zip(self.tensor, self.flat_index.tolist()):
            groups.setdefault(name, []).append(idx)
        return {name: torch.tensor(v, dtype=torch.int64) for name, v in groups.items()}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.tensor:
            out[name] = out.get(name, 0) + 1
        return out

    def keys(self) -> set[tuple[str, int]]:
        return set(zip(self.tensor, self.flat_index.tolist()))


@dataclass
class Candidates:
    """The exact best ``len(values)`` scores of one tensor in the total order above (CPU tensors): ``values`` the
    ranked values (float32: |S| for a signed metric), ``index`` the flat indices (int64), ``reported`` the scores
    to report (signed for a signed metric, else ``values``), ``unused`` the number of the tensor's zero-score
    weights that a bottom-k left out (None when it did not leave them out). A prefix of the best m is the best m' < m, so one selection serves
    several k."""

    values: torch.Tensor
    index: torch.Tensor
    reported: torch.Tensor
    unused: int | None = None

    def head(self, k: int) -> "Candidates":
        return Candidates(self.values[:k], self.index[:k], self.reported[:k], self.unused)


def tensor_candidates(name: str, score: torch.Tensor, k: int, *, largest: bool = True, metric: str = "",
                      skip_unused: bool = False, scanned: Scan | None = None) -> Candidates:
    """The best ``min(k, numel)`` of one score buffer, ranked by :func:`esa.scoring.ranking_view` for ``metric``
    (|S| of a signed metric: taken as the elements are read on the block path, a copy only where the whole
    buffer is selected, i.e. small buffers or large k); NaN or inf scores are refused. ``skip_unused`` (bottom-k only): zero scores are not ranked (module docstring), so fewer
    than k may come back.

    ``scanned`` (:func:`esa.scorescan.scan` of the ranking view, with ``nonzero_min`` for a bottom-k that skips
    unused weights) saves a caller that has it the buffer's read: the selection then reads only the best k blocks
    of the buffer (:func:`esa.scorescan.block_select`).
    """
    flat = score.detach().reshape(-1)
    absolute = is_signed(metric)
    skip_unused = skip_unused and not largest
    if scanned is None:
        scanned = scan(flat, nonzero_min=skip_unused, absolute=absolute)
    if not scanned.finite:
        raise EsaError(f"scores of {name} contain NaN or inf: the loss or the weights are broken "
                       "(check the baseline, or try --dtype float32)")
    unused = scanned.zeros if skip_unused else None
    k = min(k, score.numel())
    found = None
    if flat.numel() > max(BLOCK_SELECT_MIN_NUMEL, 8 * k):
        found = block_select(flat, scanned, k, largest=largest, skip_zeros=bool(unused), absolute=absolute)
    if found is None:  # the exact selection over the whole buffer
        view = ranking_view(flat, metric)
        ranked = view.masked_fill(view == 0, math.inf) if unused else view  # +inf never precedes a used weight
        values, idx = topk(ranked, k, largest=largest)
        if unused:
            used = torch.isfinite(values)
            values, idx = values[used], idx[used]
    else:
        values, idx = found
    reported = flat[idx] if absolute else values
    return Candidates(values.cpu(), idx.cpu(), reported.float().cpu(), unused)


BLOCK_SELECT_MIN_NUMEL = 1 << 16  # smaller buffers go straight to topk


def _empty(kind: str, meta: dict) -> WeightSet:
    return WeightSet([], np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), kind, meta)


def _check_args(k: int, mode: str) -> None:
    if mode not in MODES:
        raise EsaError(f"unknown --mode {mode!r}; use per_layer or global")
    if k < 1:
        raise EsaError(f"--topk must be at least 1 (got {k})")


def select_extreme(scores: ScoreSet, k: int, mode: str, *, largest: bool = True,
                   skip_unused: bool = False) -> WeightSet:
    """Top-k (``largest``) or bottom-k of ``scores`` in ``per_layer`` or ``global`` mode; exact, ties as above.
    ``skip_unused``: see :func:`tensor_candidates`."""
    _check_args(k, mode)
    infos = [t for t in scores.tensors if t.name in scores.scores]
    candidates = {t.name: tensor_candidates(t.name, scores.scores[t.name], k, largest=largest, metric=scores.metric,
                                            skip_unused=skip_unused) for t in infos}
    return merge_candidates(infos, candidates, k, mode, largest=largest)


def merge_candidates(infos: list[TensorInfo], candidates: dict[str, Candidates], k: int, mode: str, *,
                     largest: bool = True) -> WeightSet:
    """The selection from per-tensor candidates (each the best min(k', numel) with k' ≥ k), ``infos`` in model order.

    Exact whatever the tensors were scored together or in groups: only each tensor's own best k enter. When the
    candidates left out unused weights, ``meta["unused_left_out"]`` counts them over every tensor.
    """
    _check_args(k, mode)
    kind = "top_k" if largest else "bottom_k"
    cands = {t.name: candidates[t.name].head(min(k, t.numel)) for t in infos}
    meta: dict = {"mode": mode, "k": k}
    if not largest and any(c.unused is not None for c in cands.values()):
        meta["unused_left_out"] = sum(c.unused or 0 for c in cands.values())
    if mode == "per_layer":
        names, flat, vals, ranks = [], [], [], []
        for info in infos:
            c = cands[info.name]
            names += [info.name] * c.index.numel()
            flat.append(c.index.numpy())
            vals.append(c.reported.double().numpy())
            ranks.append(np.arange(c.index.numel()))
        if not names:
            return _empty(kind, meta)
        return WeightSet(names, np.concatenate(flat), np.concatenate(vals), np.concatenate(ranks), kind, meta)
    if k > MAX_GLOBAL_K:
        raise EsaError(f"--topk {k:,} is too large for global mode (at most {MAX_GLOBAL_K:,})")
    k = min(k, sum(t.numel for t in infos))
    # Running merge: (tensor position, position among that tensor's candidates, value) of the best k so far, in the
    # total order. Passing the running set to merge_topk with its ranks as indices keeps that order among equal
    # values, and puts it before the new tensor's candidates (a later tensor), exactly as the full merge would; a
    # tensor's candidates are in its own total order, so their positions order ties as their flat indices do.
    run_pos = torch.empty(0, dtype=torch.int64)
    run_at = torch.empty(0, dtype=torch.int64)
    run_val = torch.empty(0, dtype=torch.float32)
    for p, info in enumerate(infos):
        values = cands[info.name].values
        which, merged_val, merged_at = merge_topk(
            [(run_val, torch.arange(run_val.numel())), (values, torch.arange(values.numel()))],
            min(k, run_val.numel() + values.numel()), largest=largest)
        from_run = which == 0
        new_pos = torch.full_like(merged_at, p)
        new_pos[from_run] = run_pos[merged_at[from_run]]
        new_at = merged_at.clone()
        new_at[from_run] = run_at[merged_at[from_run]]
        run_pos, run_at, run_val = new_pos, new_at, merged_val
    names = [infos[p].name for p in run_pos.tolist()]
    flat = torch.empty_like(run_at)
    reported = torch.empty(run_at.numel(), dtype=torch.float32)
    for p in run_pos.unique().tolist():
        at = run_pos == p
        flat[at] = cands[infos[p].name].index[run_at[at]]
        reported[at] = cands[infos[p].name].reported[run_at[at]]
    if not names:
        return _empty(kind, meta)
    meta["k"] = k
    return WeightSet(names, flat.numpy(), reported.double().numpy(), np.arange(len(names)), kind, meta)


def sample_distinct(n: int, count: int, excluded: set[int], gen: torch.Generator) -> list[int]:
    """``count`` distinct integers of [0, n) not in ``excluded``, uniformly, in draw order.

    A permutation of [0, n) for small tensors (or large draws from mid-sized ones), otherwise rejection sampling,
    which holds only what it draws."""
    available = n - len(excluded)
    if count > available:
        raise EsaError(f"cannot draw {count} random weights from {available} eligible ones")
    if n <= 1 << 20 or (count > available // 4 and n <= 1 << 26):  # a permutation is cheap up to 64M elements
        perm = torch.randperm(n, generator=gen).tolist()
        return [i for i in perm if i not in excluded][:count]
    chosen: list[int] = []
    seen = set(excluded)
    while len(chosen) < count:
        for d in torch.randint(0, n, (2 * (count - len(chosen)) + 16,), generator=gen).tolist():
            if d not in seen:
                seen.add(d)
                chosen.append(d)
                if len(chosen) == count:
                    break
    return chosen


def select_random(tensors: list[TensorInfo], reference: WeightSet, seed: int, *, stratified: bool = True) -> WeightSet:
    """random_k: as many elements as ``reference`` (the top-k set), none of them in it, reproducible per seed.

    Stratified: the same count in each tensor as ``reference``. Otherwise uniform over all elements of
    ``tensors`` (each element equally likely, so large tensors get more).
    """
    taken: dict[str, set[int]] = {}
    for name, idx in zip(reference.tensor, reference.flat_index.tolist()):
        taken.setdefault(name, set()).add(idx)
    names: list[str] = []
    flat: list[int] = []
    if stratified:
        by_name = {t.name: t for t in tensors}
        for name, count in reference.counts().items():
            gen = torch.Generator().manual_seed(stream_seed(seed, name))
            picks = sample_distinct(by_name[name].numel, count, taken.get(name, set()), gen)
            names += [name] * len(picks)
            flat += picks
    else:
        offsets = np.cumsum([0] + [t.numel for t in tensors])
        excluded = set()
        position = {t.name: i for i, t in enumerate(tensors)}
        for name, idx in zip(reference.tensor, reference.flat_index.tolist()):
            excluded.add(int(offsets[position[name]]) + idx)
        gen = torch.Generator().manual_seed(stream_seed(seed, "<all>"))
        for g in sample_distinct(int(offsets[-1]), len(reference), excluded, gen):
            t = int(np.searchsorted(offsets, g, side="right") - 1)
            names.append(tensors[t].name)
            flat.append(g - int(offsets[t]))
    n = len(names)
    return WeightSet(names, np.array(flat, dtype=np.int64), np.full(n, np.nan), np.arange(n), "random_k",
                     {"seed": seed, "stratified": stratified})


def jaccard(a: WeightSet, b: WeightSet) -> float:
    """|A ∩ B| / |A ∪ B| of two sets of (tensor, flat index); 1.0 for two empty sets."""
    ka, kb = a.keys(), b.keys()
    union = ka | kb
    return len(ka & kb) / len(union) if union else 1.0


def overlap_at_k(a: WeightSet, b: WeightSet) -> float:
    """|A ∩ B| / min(|A|, |B|): the share of the smaller top-k set that the other one also selects."""
    ka, kb = a.keys(), b.keys()
    return len(ka & kb) / min(len(ka), len(kb)) if ka and kb else 0.0
