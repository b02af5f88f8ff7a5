"""Mixture of experts: what each routed expert of a fused expert stack sees, and per-expert summaries of a profile.

Fused experts (transformers 5, e.g. Mixtral): one ``experts`` module per layer holds ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``; it is called as ``experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` and, for each expert e, computes on the tokens T_e routed to e (those with e among their
top-k):

    gate, up = split(x W_gate_up[e]ᵀ),   m = act(gate) ⊙ up,   y = m W_down[e]ᵀ   (then scaled by the routing weight)

so the input of ``gate_up_proj[e]`` is x restricted to T_e and the input of ``down_proj[e]`` is m.
:func:`routed_inputs` recomputes both from the module's own call arguments (no per-expert module exists to hook);
``esa superweights`` and ``act_mag`` both use it.

Per-expert summaries (``experts.csv`` of a profile run), one row per (layer, expert) of the scored expert tensors
(a fused stack's slice e, or the per-expert Linear weights of older layouts):

- ``topk_count``: top-k weights in that expert (all its tensors), ``topk_share`` = topk_count / |top-k|;
- ``score_mass_share``: Σ of the expert's scores (|S| for a signed metric) / Σ over every scored tensor
  (the denominator of ``locations.csv``);
- ``layer_mass_share``: the same over the layer's experts only (1/E everywhere when no expert stands out: a
  "super expert" (Su et al. 2025) is one whose share is far above 1/E).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from esa.tensors import TensorInfo

EXPERTS_HEADER = ("layer", "expert", "topk_count", "topk_share", "score_mass_share", "layer_mass_share")


def is_fused_experts(module: torch.nn.Module | None) -> bool:
    """A transformers-5 fused experts module in Mixtral's layout: ``gate_up_proj`` [E, 2I, H] (gate rows first),
    ``down_proj`` [E, H, I], an ``act_fn``. Other layouts (transposed stacks, biases: e.g. GPT-OSS) are not
    recognised, so that nothing is computed from a misread layout."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3 and callable(getattr(module, "act_fn", None))):
        return False
    experts, hidden, intermediate = down.shape
    return tuple(gate_up.shape) == (experts, 2 * intermediate, hidden) and getattr(module, "gate_up_proj_bias",
                                                                                     None) is None


def call_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k]) from the arguments of a fused experts call."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


def routed_inputs(module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, *, middle: bool = True
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(e, input of gate_up_proj[e] [T_e, H], input of down_proj[e] [T_e, I] or None without ``middle``) for every
    expert that receives a token, recomputed as the fused module does (module docstring)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    for e in range(module.down_proj.shape[0]):
        tokens = (index == e).any(dim=-1).nonzero().reshape(-1)
        if tokens.numel() == 0:
            continue
        x = hidden[tokens]
        if not middle:
            yield e, x, None
            continue
        gate, up = F.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
        yield e, x, module.act_fn(gate) * up


def is_expert_tensor(t: TensorInfo) -> bool:
    """A tensor that belongs to experts: a fused stack, or a per-expert weight of an older layout."""
    return t.is_expert_stack or (t.expert is not None and t.component.startswith("moe."))


def expert_mass(score: torch.Tensor) -> list[float]:
    """Σ|S| (what selection ranks: S itself for an unsigned metric, whose scores are ≥ 0) of each expert slice
    ``score[e]`` of a fused stack, in float64."""
    return [float(score[e].double().abs().sum()) for e in range(score.shape[0])]


def expert_rows(tensors: list[TensorInfo], top_tensor: list[str], top_flat: np.ndarray, tensor_total: dict[str, float],
                stack_mass: dict[str, list[float]]) -> list[tuple]:
    """experts.csv rows (module docstring), sorted by layer and expert; empty when no expert tensor is scored.

    ``tensor_total``: each scored tensor's score mass; ``stack_mass``: per-expert masses of the fused stacks."""
    mass: dict[tuple[int | None, int], float] = {}
    for t in tensors:
        if t.is_expert_stack:
            for e, m in enumerate(stack_mass.get(t.name, [])):
                mass[(t.layer, e)] = mass.get((t.layer, e), 0.0) + m
        elif is_expert_tensor(t):
            mass[(t.layer, t.expert)] = mass.get((t.layer, t.expert), 0.0) + tensor_total.get(t.name, 0.0)
    if not mass:
        return []
    info = {t.name: t for t in tensors}
    counts: dict[tuple[int | None, int], int] = {}
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(top_tensor):
        positions.setdefault(name, []).append(i)
    for name, pos in positions.items():
        t = info[name]
        if not is_expert_tensor(t):
            continue
        if t.is_expert_stack:
            experts = t.coordinates(torch.as_tensor(top_flat[pos]))["expert"].tolist()
        else:
            experts = [t.expert] * len(pos)
        for e in experts:
            counts[(t.layer, e)] = counts.get((t.layer, e), 0) + 1
    total = sum(tensor_total.values()) or 1.0
    per_layer: dict[int | None, float] = {}
    for (layer, _), m in mass.items():
        per_layer[layer] = per_layer.get(layer, 0.0) + m
    n_top = max(1, len(top_tensor))
    keys = sorted(set(mass) | set(counts), key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    return [("" if layer is None else layer, e, counts.get((layer, e), 0), counts.get((layer, e), 0) / n_top,
             mass.get((layer, e), 0.0) / total, mass.get((layer, e), 0.0) / (per_layer[layer] or 1.0))
            for layer, e in keys]
