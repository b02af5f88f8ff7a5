"""``esa superweights``: find super weights from activation spikes, with no gradient (Yu et al. 2024, arXiv 2411.07191).

Protocol (the paper's ``analyze.py``, generalised). Forward hooks on every MLP down projection record, per layer
(and per expert), the largest |input| of each input channel and the largest |output| of each output channel over
all tokens. A layer holds a candidate super weight when its largest input and its largest output are both spikes:

    |x|_max > threshold (absolute, default 50 as in the paper)   and   |x|_max > relative · median_c(|x_c|_max),

the median running over the channels' own maxima in that layer (default relative = 10: a spike towers over the
typical channel). The candidate is the weight at (output channel of the output spike, input channel of the input
spike): row = out channel, col = in channel for ``nn.Linear`` (and Mixtral's ``[expert, out, in]`` stacks); a
GPT-2 ``Conv1D`` stores the transpose (``[in, out]``), so there row = in channel, col = out channel. Candidates are
ranked by output spike; a candidate whose weight is exactly zero is dropped (it cannot carry the spike). ``--iterate`` zeroes every weight found so far and looks again until no new one appears
(at most ``max_iterations`` passes); the model is restored bit-exactly afterwards.

Down projections: ``mlp.down_proj`` (Llama, Mistral, Qwen2, Phi-3, OLMo), ``mlp.dense_4h_to_h`` (GPT-NeoX, Falcon),
``mlp.c_proj`` (GPT-2, Conv1D), Mixtral's fused ``experts`` (transformers 5: ``down_proj`` is one
``[experts, hidden, intermediate]`` parameter and no per-expert module exists, so a hook on the experts module
recomputes each routed expert's down-projection input act(gate)·up and output from the module's own inputs), and
per-expert ``experts.N.w2`` / ``experts.N.down_proj`` Linear modules of older layouts.

``--mediation`` (the paper's causal test, on the evaluation windows): PPL of the model, of the model with the found
weights zeroed, and of the zeroed model whose super activations (the spiking output channel of each found weight's
layer, on every token) are overwritten with their values from the intact model. ``recovered`` is the share of the
NLL damage undone by restoring those activations alone. Not available for expert layers.

Files: ``superweights.csv`` (accepted as it is by ``esa perturb --weights``), ``layers.csv`` (every layer's
spikes), ``metrics.json``, ``config.json``, ``experiment_manifest.json`` (last).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from esa.config import SuperweightsConfig
from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.experts import call_arguments, routed_inputs
from esa.perturbation import PerturbSpec, perturbed
from esa.runio import finished_profile_run, read_csv_rows, read_json
from esa.selection import WeightSet

DEFAULT_PROMPT = SuperweightsConfig().prompt  # the paper's probe sentence
_LINEAR_NAMES = re.compile(r"(?:^|\.)mlp\.(down_proj|dense_4h_to_h)$|(?:^|\.)experts\.\d+\.(w2|down_proj)$")
_CONV_NAMES = re.compile(r"(?:^|\.)mlp\.c_proj$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EXPERT = re.compile(r"experts\.(\d+)\.")
CSV_HEADER = ("rank", "tensor", "layer", "expert", "row", "col", "flat_index", "in_channel", "out_channel",
              "input_spike", "output_spike", "input_ratio", "output_ratio", "weight", "iteration", "known")


@dataclass
class DownProj:
    """One MLP down projection: its module, its weight's name, and how its weight is laid out."""

    module_name: str
    tensor: str
    layer: int | None
    kind: str  # "linear" (weight [out, in]), "conv1d" (weight [in, out]) or "experts" (weight [E, out, in])
    module: torch.nn.Module
    expert: int | None = None  # of a per-expert Linear module


def down_projections(model: torch.nn.Module) -> list[DownProj]:
    """Every MLP down projection of ``model`` (see the module docstring); refuses a model with none."""
    found = []
    for name, module in model.named_modules():
        layer_m = _LAYER.search(name + ".")
        layer = int(layer_m.group(1)) if layer_m else None
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and _LINEAR_NAMES.search(name):
            expert_m = _EXPERT.search(name + ".")
            found.append(DownProj(name, f"{name}.weight", layer, "linear", module,
                                  int(expert_m.group(1)) if expert_m else None))
        elif _CONV_NAMES.search(name) and type(module).__name__ == "Conv1D" and weight is not None:
            found.append(DownProj(name, f"{name}.weight", layer, "conv1d", module))
        elif name.endswith("experts") and isinstance(getattr(module, "down_proj", None), torch.nn.Parameter) \
                and module.down_proj.dim() == 3:
            if not isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
                raise EsaError(f"{name}: fused experts without gate_up_proj are not supported")
            found.append(DownProj(name, f"{name}.down_proj", layer, "experts", module))
    if not found:
        raise EsaError(f"{type(model).__name__}: no MLP down projection found (supported: mlp.down_proj, "
                       "mlp.dense_4h_to_h, GPT-2 mlp.c_proj, Mixtral experts)")
    return found


# ----------------------------------------------------------------------------------------------- recording
@dataclass
class Spikes:
    """Per-channel maxima of |input| and |output| of one down projection (one expert of a stack)."""

    proj: DownProj
    expert: int | None
    in_max: torch.Tensor  # float32 [in channels]
    out_max: torch.Tensor  # float32 [out channels]

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for acc, t in ((self.in_max, x), (self.out_max, y)):
            if t.numel():
                torch.maximum(acc, t.detach().abs().reshape(-1, t.shape[-1]).amax(0).float().to(acc.device), out=acc)


def _expert_io(module: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> Iterator[tuple[int, ...]]:
    """(expert, down-projection input, output) of every routed expert, recomputed as MixtralExperts does."""
    for e, _, x in routed_inputs(module, hidden, index):
        yield e, x, F.linear(x, module.down_proj[e])


@contextlib.contextmanager
def recording(projs: list[DownProj]) -> Iterator[dict[tuple[str, int | None], Spikes]]:
    """Forward hooks that fill one :class:`Spikes` per (tensor, expert); removed on exit, also on error."""
    records: dict[tuple[str, int | None], Spikes] = {}
    handles = []

    def spikes(p: DownProj, expert: int | None, n_in: int, n_out: int, device) -> Spikes:
        key = (p.tensor, expert if expert is not None else p.expert)
        if key not in records:
            records[key] = Spikes(p, key[1], torch.zeros(n_in, device=device), torch.zeros(n_out, device=device))
        return records[key]

    def make_hook(p: DownProj):
        def hook(module, args, kwargs, output):
            if p.kind == "experts":
                hidden, index = call_arguments(args, kwargs)
                with torch.no_grad():
                    for e, x, y in _expert_io(module, hidden, index):
                        spikes(p, e, x.shape[-1], y.shape[-1], x.device).update(x, y)
                return
            x = args[0] if args else next(iter(kwargs.values()))
            spikes(p, None, x.shape[-1], output.shape[-1], x.device).update(x, output)

        return hook

    try:
        for p in projs:
            handles.append(p.module.register_forward_hook(make_hook(p), with_kwargs=True))
        yield records
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    tensor: str
    layer: int | None
    expert: int | None
    in_channel: int
    out_channel: int
    input_spike: float
    output_spike: float
    input_ratio: float  # spike / median over channels of their maxima
    output_ratio: float
    row: int = 0
    col: int = 0
    flat_index: int = 0
    weight: float = float("nan")
    iteration: int = 0
    known: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.tensor, self.flat_index


def _peak(values: torch.Tensor) -> tuple[int, float, float]:
    """(channel, value, value / median) of the largest entry."""
    channel = int(values.argmax())
    peak = float(values[channel])
    median = float(values.median())
    return channel, peak, (peak / median if median > 0 else float("inf"))


def layer_rows(records: dict) -> list[tuple]:
    rows = []
    for s in records.values():
        ci, vi, ri = _peak(s.in_max)
        co, vo, ro = _peak(s.out_max)
        rows.append((s.proj.tensor, "" if s.proj.layer is None else s.proj.layer, "" if s.expert is None else s.expert,
                     ci, repr(vi), repr(ri), co, repr(vo), repr(ro)))
    return rows


def find_candidates(records: dict, params: dict[str, torch.Tensor], threshold: float, relative: float,
                    iteration: int = 0) -> list[Candidate]:
    """Layers whose largest input and output are both spikes (module docstring), ranked by output spike."""
    out = []
    for s in records.values():
        ci, vi, ri = _peak(s.in_max)
        co, vo, ro = _peak(s.out_max)
        if not (vi > threshold and vo > threshold and ri > relative and ro > relative):
            continue
        c = Candidate(s.proj.tensor, s.proj.layer, s.expert, ci, co, vi, vo, ri, ro, iteration=iteration)
        w = params[s.proj.tensor]
        if s.proj.kind == "conv1d":
            c.row, c.col = ci, co
        else:
            c.row, c.col = co, ci
        lead = (s.expert if s.proj.kind == "experts" else 0) * w.shape[-2]
        c.flat_index = (lead + c.row) * w.shape[-1] + c.col
        c.weight = float(w.detach().reshape(-1)[c.flat_index])
        if c.weight != 0.0:  # a zero weight (e.g. zeroed by --iterate) cannot carry the spike
            out.append(c)
    return sorted(out, key=lambda c: -c.output_spike)


def weight_set(cands: list[Candidate]) -> WeightSet:
    n = len(cands)
    return WeightSet([c.tensor for c in cands], np.array([c.flat_index for c in cands], np.int64),
                     np.array([c.output_spike for c in cands]), np.arange(n), "explicit")


def _forward_all(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)


def detect(model: torch.nn.Module, ids: torch.Tensor, *, threshold: float = 50.0, relative: float = 10.0,
           iterate: bool = False, max_iterations: int = 10, batch_size: int = 8) -> tuple[list[Candidate], list]:
    """(candidates in order of discovery and rank, layers.csv rows of the first pass) on the token ids [n, L]."""
    projs = down_projections(model)
    params = dict(model.named_parameters())
    found: list[Candidate] = []
    first_rows: list = []
    zero = PerturbSpec("zero")
    for it in range(max_iterations if iterate else 1):
        with perturbed(params, weight_set(found), zero, seed=0), recording(projs) as records:
            _forward_all(model, ids, batch_size)
        if it == 0:
            first_rows = layer_rows(records)
        known = {c.key for c in found}
        new = [c for c in find_candidates(records, params, threshold, relative, it) if c.key not in known]
        if not new:
            break
        found += new
    return found, first_rows


# ----------------------------------------------------------------------------------------------- mediation
@contextlib.contextmanager
def _overwrite_channels(model: torch.nn.Module, channels: dict[str, list[int]], values: dict | None) -> Iterator[dict]:
    """Hooks on down projections: record ``output[..., channels]`` (values None) or overwrite it with ``values``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str, chans: list[int]):
        def hook(module, args, output):
            if values is None:
                captured[name] = output[..., chans].detach().clone()
                return None
            output = output.clone()
            output[..., chans] = values[name].to(output.dtype)
            return output

        return hook

    try:
        for name, chans in channels.items():
            handles.append(model.get_submodule(name).register_forward_hook(make(name, chans)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def mediation(model: torch.nn.Module, found: list[Candidate], windows: torch.Tensor, batch_size: int) -> dict:
    """PPL intact / with the found weights zeroed / zeroed with their super activations restored (module doc)."""
    usable = [c for c in found if c.expert is None]
    if not usable:
        raise EsaError("--mediation needs a super weight outside expert layers, and none was found")
    params = dict(model.named_parameters())
    channels: dict[str, list[int]] = {}
    for c in usable:
        chans = channels.setdefault(c.tensor.rpartition(".")[0], [])
        if c.out_channel not in chans:
            chans.append(c.out_channel)
    ws, zero = weight_set(usable), PerturbSpec("zero")
    base = evaluate(model, windows, batch_size=batch_size, description="intact")
    with perturbed(params, ws, zero, seed=0):
        zeroed = evaluate(model, windows, batch_size=batch_size, description="zeroed")
    parts = []
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        with torch.no_grad(), _overwrite_channels(model, channels, None) as saved:
            model(input_ids=batch.to(device), use_cache=False)
        with perturbed(params, ws, zero, seed=0), _overwrite_channels(model, channels, saved):
            parts.append(evaluate(model, batch, batch_size=batch.shape[0], description="restored"))
    restored = EvalResult(np.concatenate([p.nll for p in parts]), np.concatenate([p.tokens for p in parts]),
                          np.concatenate([p.correct for p in parts]))
    damage = zeroed.mean_nll - base.mean_nll
    return {"weights": len(usable), "restored_channels": {k: v for k, v in channels.items()},
            "ppl_intact": base.ppl, "ppl_zeroed": zeroed.ppl, "ppl_zeroed_activation_restored": restored.ppl,
            "mean_nll_intact": base.mean_nll, "mean_nll_zeroed": zeroed.mean_nll,
            "mean_nll_zeroed_activation_restored": restored.mean_nll,
            "recovered": (zeroed.mean_nll - restored.mean_nll) / damage if damage != 0 else None,
            "n_windows": int(windows.shape[0])}


# ----------------------------------------------------------------------------------------------- profile ranks
def profile_ranks(run_dir: Path, found: list[Candidate], model_id: str) -> dict:
    """Each found weight's rank (1 = top) under a finished profile run's metric: exact over every scored weight
    when the run saved its scores (``--save-scores``), else its rank in top_weights.csv (None: not in the top-k)."""
    finished_profile_run(run_dir, model_id)
    metric = read_json(run_dir / "config.json").get("selection", {}).get("metric")
    out = {"run": str(run_dir), "metric": metric}
    scores_path = run_dir / "scores.safetensors"
    if scores_path.exists():
        from safetensors import safe_open

        from esa.scoring import ranking_view

        with safe_open(str(scores_path), "pt") as f:
            names = list(f.keys())
            values = {c.key: float(ranking_view(f.get_tensor(c.tensor).reshape(-1)[c.flat_index], metric))
                      for c in found if c.tensor in names}
            above = dict.fromkeys(values, 0)
            for name in names:  # one tensor in memory at a time
                view = ranking_view(f.get_tensor(name), metric)
                for k, v in values.items():
                    above[k] += int((view > v).sum())
        out["basis"] = "exact: every scored weight (scores.safetensors)"
        out["ranks"] = {f"{t}:{i}": (above[(t, i)] + 1 if (t, i) in above else None) for t, i in (c.key for c in found)}
    else:
        rows = read_csv_rows(run_dir / "top_weights.csv", required=("tensor", "flat_index", "rank"))
        ranks = {(r["tensor"], int(r["flat_index"])): int(r["rank"]) + 1 for r in rows}
        mode = read_json(run_dir / "config.json").get("selection", {}).get("mode")
        out["basis"] = f"top_weights.csv ({mode}: rank {'within its tensor' if mode == 'per_layer' else 'in the model'}; "\
                       "null = not in the top-k)"
        out["ranks"] = {f"{c.tensor}:{c.flat_index}": ranks.get(c.key) for c in found}
    return out
