"""Score groups: the scored tensors split into contiguous groups, each scored in its own pass over the windows.

A leaf module (it knows only :class:`~esa.tensors.TensorInfo`), so that both the planner (:mod:`esa.planning`) and
the scoring passes (:mod:`esa.scoreselect`) can use it.
"""

from __future__ import annotations

from esa.config import SelectionConfig
from esa.tensors import TensorInfo


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


def score_groups(sel: SelectionConfig) -> int:
    """The number of score groups forced by ``--score-groups``, else one (the plan decides on CUDA)."""
    return sel.score_groups or 1
