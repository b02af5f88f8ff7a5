"""Which tensors are scored, and what each one is: layer index, component, expert.

Component names are the same across architectures so that results compare:

    embed, lm_head,
    attn.q, attn.k, attn.v, attn.qkv (fused: Phi-3 qkv_proj, GPT-NeoX query_key_value), attn.o,
    mlp.gate, mlp.up, mlp.gate_up (fused: Phi-3), mlp.down,
    moe.router, moe.gate, moe.up, moe.gate_up, moe.down (Mixtral experts; `expert` gives the expert),
    norm.input, norm.post_attn, norm.final, norm (other norms), other.

Biases carry the component of their layer and ``kind == "bias"``. Element coordinates follow the storage layout:
for an ``nn.Linear`` weight ``[out_features, in_features]``, ``row`` is the output channel and ``col`` the input
channel (so a super weight of ``mlp.down_proj`` is (layer, row = hidden channel, col = intermediate channel), as in
Yu et al. 2024); Mixtral's fused expert tensors ``[expert, row, col]`` add the expert as a coordinate.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from esa.errors import EsaError

if TYPE_CHECKING:
    from esa.config import SelectionConfig

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"experts\.(\d+)\.")

# (regex on the parameter name without its final ".weight"/".bias", component); first match wins.
_COMPONENTS: list[tuple[re.Pattern, str]] = [
    (re.compile(p), c)
    for p, c in [
        (r"(embed_tokens|embed_in|wte|word_embeddings|tok_embeddings)$", "embed"),
        (r"(^|\.)(lm_head|embed_out|output)$", "lm_head"),
        (r"experts\.gate_up_proj$", "moe.gate_up"),
        (r"experts\.down_proj$", "moe.down"),
        (r"experts\.up_proj$", "moe.up"),
        (r"experts\.gate_proj$", "moe.gate"),
        (r"experts\.\d+\.(w1|gate_proj)$", "moe.gate"),
        (r"experts\.\d+\.(w3|up_proj)$", "moe.up"),
        (r"experts\.\d+\.(w2|down_proj)$", "moe.down"),
        (r"(block_sparse_moe\.gate|mlp\.gate|mlp\.router|moe\.gate)$", "moe.router"),
        (r"(qkv_proj|query_key_value|c_attn|Wqkv)$", "attn.qkv"),
        (r"(q_proj|query)$", "attn.q"),
        (r"(k_proj|key)$", "attn.k"),
        (r"(v_proj|value)$", "attn.v"),
        (r"(o_proj|attention\.dense|attn\.c_proj|out_proj|dense)$", "attn.o"),
        (r"gate_up_proj$", "mlp.gate_up"),
        (r"(gate_proj|w1)$", "mlp.gate"),
        (r"(up_proj|dense_h_to_4h|fc1|c_fc|w3)$", "mlp.up"),
        (r"(down_proj|dense_4h_to_h|fc2|mlp\.c_proj|w2)$", "mlp.down"),
        (r"(input_layernorm|ln_1|attention_norm)$", "norm.input"),
        (r"(post_attention_layernorm|ln_2|ffn_norm)$", "norm.post_attn"),
        (r"(^model\.norm|final_layer_norm|ln_f|^norm|\.norm)$", "norm.final"),
        (r"(norm|ln)[^.]*$", "norm"),
    ]
]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    layer: int | None
    component: str
    kind: str  # "weight", "bias", "norm" or "vector"
    expert: int | None = None  # from the name (Mixtral v4 layout); fused [E, rows, cols] tensors give it per element
    aliases: tuple[str, ...] = field(default=())  # other names of the same (tied) parameter

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_expert_stack(self) -> bool:
        return self.component.startswith("moe.") and self.component != "moe.router" and len(self.shape) == 3

    def coordinates(self, flat_index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """(expert, row, col) of flat indices in this tensor's storage layout (None where not applicable)."""
        flat = flat_index.to(torch.int64)
        if len(self.shape) == 1:
            return {"expert": None, "row": flat, "col": None}
        cols = self.shape[-1]
        rows = self.shape[-2]
        col = flat % cols
        row = (flat // cols) % rows
        lead = flat // (cols * rows) if len(self.shape) >= 3 else None
        return {"expert": lead, "row": row, "col": col}


def classify(name: str, module: torch.nn.Module | None = None, ndim: int = 2) -> tuple[int | None, str, str, int | None]:
    """(layer, component, kind, expert) of a parameter name; ``module`` is the module that owns it."""
    stem, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias"):
        stem, leaf = name, ""
    layer_match = _LAYER.search(name)
    expert_match = _EXPERT.search(name)
    component = next((c for pattern, c in _COMPONENTS if pattern.search(stem)), "other")
    is_norm = module is not None and "norm" in type(module).__name__.lower()
    if leaf == "bias":
        kind = "bias"
    elif is_norm or component.startswith("norm"):
        kind = "norm"
        if not component.startswith("norm"):
            component = "norm"
    elif ndim >= 2:
        kind = "weight"
    else:
        kind = "vector"
    return (int(layer_match.group(1)) if layer_match else None, component, kind,
            int(expert_match.group(1)) if expert_match else None)


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    path = name.rpartition(".")[0]
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def describe_parameters(model: torch.nn.Module) -> list[tuple[TensorInfo, torch.nn.Parameter]]:
    """Every parameter once (tied ones under their first name, the others as aliases), in model order."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = []
    for name, p in model.named_parameters():
        layer, component, kind, expert = classify(name, _owner(model, name), p.ndim)
        others = tuple(n for n in aliases[id(p)] if n != name)  # e.g. lm_head.weight tied to the embedding
        out.append((TensorInfo(name, tuple(p.shape), layer, component, kind, expert, others), p))
    return out


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def select_tensors(
    model: torch.nn.Module,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    *,
    biases: bool = False,
    norms: bool = False,
) -> list[tuple[TensorInfo, torch.nn.Parameter]]:
    """The tensors to score, in model order.

    Default: every weight of two or more dimensions (embeddings, lm_head and expert stacks included). ``biases``
    and ``norms`` add bias vectors and normalisation scales (and other 1-D parameters). ``include`` keeps only
    names matching one of the glob patterns (``fnmatch``, e.g. ``'*layers.1.mlp.*'``); ``exclude`` drops matches.
    """
    chosen = []
    for info, p in describe_parameters(model):
        if info.kind == "bias" and not biases:
            continue
        if info.kind in ("norm", "vector") and not norms:
            continue
        names = (info.name, *info.aliases)
        if include and not any(_matches(n, include) for n in names):
            continue
        if exclude and any(_matches(n, exclude) for n in names):
            continue
        chosen.append((info, p))
    return chosen


def scored_tensors(model: torch.nn.Module, sel: SelectionConfig) -> list[tuple[TensorInfo, torch.nn.Parameter]]:
    """The tensors ``sel`` scores (its --include / --exclude / --include-biases / --include-norms), in model order;
    a one-line error when none matches."""
    tensors = select_tensors(model, sel.include, sel.exclude, biases=sel.include_biases, norms=sel.include_norms)
    if not tensors:
        raise EsaError("no tensor matches --include/--exclude (see tensor names with `esa tensors`)")
    return tensors
