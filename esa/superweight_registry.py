"""Published super-weight coordinates (Yu et al. 2024, "The Super Weight in Large Language Models", arXiv 2411.07191).

Each entry lists (layer, row, col) of ``model.layers.{layer}.mlp.down_proj.weight`` in storage layout: row = output
(hidden) channel, col = input (intermediate) channel. Sources:

- "paper": Table 1 of arXiv 2411.07191;
- "code": ``SUPER_WEIGHTS_MAP`` in ``outliers/model.py`` of github.com/mengxiayu/LLMSuperWeight;
- "issue 2": github.com/mengxiayu/LLMSuperWeight/issues/2 (Llama-2-7B, which the paper lists but the code omits).

Llama-2-13B (3, 4743, 7678) is only reported second-hand, so it is left out. ``esa superweights`` compares what it
finds with these; ``esa perturb --weights known`` ablates them jointly for a model whose id matches an entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from esa.errors import EsaError

TENSOR = "model.layers.{layer}.mlp.down_proj.weight"
PAPER = "Yu et al. 2024, arXiv 2411.07191, Table 1"
CODE = "github.com/mengxiayu/LLMSuperWeight, outliers/model.py SUPER_WEIGHTS_MAP"


@dataclass(frozen=True)
class KnownSuperWeights:
    name: str  # the model's name as published
    ids: tuple[str, ...]  # hub ids (or their last part) that resolve to this entry, lower case
    coordinates: tuple[tuple[int, int, int], ...]  # (layer, row, col) of mlp.down_proj
    source: str

    def tensors(self) -> list[tuple[str, int, int, int]]:
        """(tensor name, layer, row, col) of every coordinate."""
        return [(TENSOR.format(layer=layer), layer, row, col) for layer, row, col in self.coordinates]


REGISTRY: tuple[KnownSuperWeights, ...] = (
    KnownSuperWeights("Mistral-7B-v0.1", ("mistralai/mistral-7b-v0.1",), ((1, 2070, 7310),), f"{PAPER}; {CODE}"),
    KnownSuperWeights("LLaMA-7B", ("huggyllama/llama-7b", "llama-7b"), ((2, 3968, 7003),), f"{PAPER}; {CODE}"),
    KnownSuperWeights("LLaMA-13B", ("huggyllama/llama-13b", "llama-13b"), ((2, 2231, 2278), (2, 2231, 6939)),
                      f"{PAPER}; {CODE}"),
    KnownSuperWeights("LLaMA-30B", ("huggyllama/llama-30b", "llama-30b"),
                      ((3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)), f"{PAPER}; {CODE}"),
    KnownSuperWeights("Llama-2-7B", ("meta-llama/llama-2-7b-hf", "meta-llama/llama-2-7b", "llama-2-7b-hf"),
                      ((1, 2533, 7890),), f"{PAPER}; github.com/mengxiayu/LLMSuperWeight/issues/2 (not in the code)"),
    KnownSuperWeights("Meta-Llama-3-8B", ("meta-llama/meta-llama-3-8b",),
                      ((1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)), f"{CODE} (code only, not in the paper)"),
    KnownSuperWeights("OLMo-1B-0724", ("allenai/olmo-1b-0724-hf",), ((1, 1764, 1710), (2, 1764, 8041)),
                      f"{PAPER}; {CODE}"),
    KnownSuperWeights("OLMo-7B-0724", ("allenai/olmo-7b-0724-hf",),
                      ((1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)), f"{PAPER}; {CODE}"),
    KnownSuperWeights("Phi-3-mini-4k-instruct", ("microsoft/phi-3-mini-4k-instruct",),
                      ((2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723), (4, 1113, 2723),
                       (4, 1693, 2723)), f"{PAPER}; {CODE}"),
)


def lookup(model_id: str) -> KnownSuperWeights | None:
    """The entry for a hub id (case-insensitive), or for a local directory named like one (its last part)."""
    key = model_id.strip().rstrip("/").lower()
    last = PurePath(key).name
    for entry in REGISTRY:
        if key in entry.ids or last in entry.ids or last in {i.rpartition("/")[2] for i in entry.ids}:
            return entry
    return None


def known_weight_set(model_id: str, params: dict):
    """The registry's coordinates for ``model_id`` as an explicit weight set (``esa perturb --weights known``)."""
    from esa.selection import WeightSet

    entry = lookup(model_id)
    if entry is None:
        names = ", ".join(e.name for e in REGISTRY)
        raise EsaError(f"--weights known: no published super weights for {model_id!r} (known: {names}); find them "
                       "with `esa superweights`")
    names, flat = [], []
    for tensor, layer, row, col in entry.tensors():
        if tensor not in params or params[tensor].dim() != 2:
            raise EsaError(f"--weights known: {model_id!r} has no 2-D tensor {tensor} ({entry.name}'s layout)")
        rows, cols = params[tensor].shape
        if not (row < rows and col < cols):
            raise EsaError(f"--weights known: ({row}, {col}) is outside {tensor} {tuple(params[tensor].shape)}")
        names.append(tensor)
        flat.append(row * cols + col)
    n = len(names)
    return WeightSet(names, np.array(flat, np.int64), np.full(n, np.nan), np.arange(n), "explicit",
                     {"registry": entry.name, "source": entry.source})
