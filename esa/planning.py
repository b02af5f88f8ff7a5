"""``esa plan``: what a command costs before it runs — predicted peak device memory per phase, score groups,
batch size and wall time, from the model's config alone (pure functions; the model is built on the ``meta``
device, so no weight is read).

Memory model (bytes; s = bytes per parameter of the dtype, L = seq_len, B = batch size, H = hidden size,
KV = key/value width, I = MLP intermediate size (times the experts each token uses for a mixture of experts),
nh = attention heads, V = vocabulary, n = layers):

- weights: every parameter, s bytes each.
- score buffers: 4 bytes (float32) per scored weight of the largest score group (only one group is alive).
- gradients: first-order metrics hold one gradient at a time (the largest scored tensor, s bytes per element);
  hessian_diag holds the gradient of every scored tensor with its graph (s per scored weight) plus one H z. The
  Hutchinson metrics (hutchinson_diag, obd: forward-over-reverse, :mod:`esa.hvp`) hold one tensor's gradient and
  its H z at a time (2 s per element of the largest) plus the float32 temporaries of its fold (8 bytes; obd 16).
- probes: hutchinson_diag and obd carry z as the tangent of every scored tensor for the whole pass: s per scored
  weight.
- activations: what the forward pass keeps for backward, per token and layer
  (22 H + 6 KV + 8 I) s  — the two RMSNorms with their float32 upcasts, q/k/v, RoPE, o, and the gated MLP —
  plus attention: 2 (q, k, v, out are counted above; the fused kernel's log-sum-exp) with SDPA, or 6 nh L bytes
  with eager attention (float32 softmax kept for backward and its s-byte copy). Double backward (hessian_diag)
  keeps the first backward's graph as well: twice the forward's activations. Forward-over-reverse sweeps the
  decoder layers one at a time (:class:`esa.hvp.LayerSweep`): it keeps each layer's input and its tangent,
  2 H s per token and layer, and recomputes one layer at a time in backward, whose activations, their tangents and
  the backward's transients are 4 (22 H + 6 KV + 8 I) s per token, plus SDPA's math kernel for that layer:
  32 nh L bytes (float32 probabilities, their tangent and the backward's transients; measured on CPU,
  bench/RESULTS.md). Evaluation without gradients holds one layer's temporaries,
  (4 H + 4 I) s per token plus the eager attention scores.
- logits: the loss runs through the head in chunks of :func:`esa.evaluate.chunk_tokens_for` tokens; a chunk
  holds its logits in the model dtype, their float32 copy and the float32 gradient (s + 8 bytes per logit), twice
  that with tangents (forward-over-reverse).
- workspace: a fixed 1 GiB on CUDA for library workspaces, allocator slack and the selection/statistics
  temporaries; on CPU, where the measured peak is the process's RSS, 512 MiB for the interpreter and libraries.

Time model: FLOPs per token of a forward pass ≈ 2 × active parameters + 2 n L H (causal attention), a
forward+backward three times that. Relative to a plain forward+backward (measured on CPU, DESIGN §9):
grad_x_weight / grad_squared 1.1×, hutchinson_diag and obd :data:`HVP_PASS` per probe (each probe is one
forward-over-reverse pass), act_mag and evaluation 1/3, magnitude none. Throughput: :data:`GPU_FLOPS` on CUDA (about 40% of an H100's dense bf16 peak),
:data:`CPU_FLOPS` on CPU. These are assumptions until measured (bench/RESULTS.md).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from esa.errors import EsaError
from esa.scoring import needs_double_backward, uses_hvp
from esa.tensors import TensorInfo

GiB = 1 << 30
WORKSPACE = {"cuda": GiB, "cpu": GiB // 2}
HEADROOM = 0.95  # plan to this share of the device, leaving room for the CUDA context and fragmentation
MAX_BATCH = 64
GPU_FLOPS = 4.0e14
CPU_FLOPS = 1.0e11
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
HVP_PASS = 2.7  # one forward-over-reverse pass (dual forward, layer recompute, dual backward) / a forward+backward
SLOWDOWN = {"grad_x_weight": 1.1, "grad_squared": 1.1, "taylor": 1.1, "act_mag": 1 / 3, "magnitude": 0.0}
PARTS = ("weights", "score_buffers", "gradients", "probes", "activations", "logits", "workspace")


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time models need to know of a model."""

    n_params: int
    active_params: int  # parameters one token uses (all but the experts it is not routed to)
    layers: int
    hidden: int
    kv: int
    intermediate: int  # per token: the MLP width times the experts it uses
    heads: int
    vocab: int
    tensors: tuple[TensorInfo, ...]  # the scored tensors, in model order


@dataclass(frozen=True)
class Workload:
    """One command's flags, as far as cost goes."""

    command: str = "run"  # baseline | profile | perturb | run
    metric: str = "grad_x_weight"
    seq_len: int = 2048
    n_windows: int | None = None
    batch_size: int | None = None
    score_groups: int | None = None
    dtype_bytes: int = 2
    attention: str = "sdpa"  # eager for the second-order metrics
    hutchinson_probes: int = 8
    perturb: bool = False
    bottom_k: bool = True  # a bottom_k trial per seed
    control_sets: int = 39  # random_k control sets, one evaluation each (0: no random_k)
    seeds: int = 3
    stability_check: bool = False
    stability_fraction: float = 0.5
    device: str = "cuda"


@dataclass
class Phase:
    name: str
    batch_size: int
    score_groups: int
    parts: dict[str, int]
    time_s: float | None

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    phases: list[Phase]
    device_memory: int
    fits: bool
    reason: str | None
    assumptions: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    @property
    def score_groups(self) -> int:
        return max(p.score_groups for p in self.phases)

    @property
    def batch_size(self) -> int:
        return min(p.batch_size for p in self.phases)

    @property
    def time_s(self) -> float | None:
        times = [p.time_s for p in self.phases]
        return None if any(t is None for t in times) else sum(times)

    def as_dict(self) -> dict:
        return {"fits": self.fits, "reason": self.reason, "peak_bytes": self.peak_bytes,
                "score_groups": self.score_groups, "batch_size": self.batch_size, "time_s": self.time_s,
                "device_memory": self.device_memory,
                "phases": [{**asdict(p), "peak_bytes": p.peak_bytes} for p in self.phases],
                "assumptions": self.assumptions}


def parse_size(text: str) -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise EsaError(f"--device-memory {text!r}: use a size like 80GB, 141GB or 24GiB")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    base = 1024 if "I" in unit else 1000
    return int(value * base ** powers[unit[0]])


# ----------------------------------------------------------------------------------------------- the model
def activation_bytes_per_token(shape: ModelShape, w: Workload, *, backward: bool) -> float:
    """Activations per token for the whole model: kept for backward (``backward``) or one layer's temporaries."""
    s = w.dtype_bytes
    eager = 6 * shape.heads * w.seq_len if w.attention == "eager" else 0
    if not backward:
        return (4 * shape.hidden + 4 * shape.intermediate) * s + eager
    per_layer = (22 * shape.hidden + 6 * shape.kv + 8 * shape.intermediate) * s
    if uses_hvp(w.metric):  # forward-over-reverse, checkpointed layers: the inputs kept, one layer recomputed
        return 2 * shape.hidden * s * shape.layers + 4 * per_layer + 32 * shape.heads * w.seq_len
    return (per_layer + eager) * shape.layers


def logits_bytes(shape: ModelShape, w: Workload, tokens: int) -> int:
    from esa.evaluate import chunk_tokens_for

    return min(tokens, chunk_tokens_for(shape.vocab)) * shape.vocab * (w.dtype_bytes + 8)


def group_sizes(shape: ModelShape, groups: int) -> list[int]:
    from esa.scoregroups import split_groups

    return [sum(t.numel for t in g) for g in split_groups(list(shape.tensors), groups)]


def evaluate_parts(shape: ModelShape, w: Workload, batch: int) -> dict[str, int]:
    tokens = batch * w.seq_len
    return {"weights": shape.n_params * w.dtype_bytes, "score_buffers": 0, "gradients": 0, "probes": 0,
            "activations": int(tokens * activation_bytes_per_token(shape, w, backward=False)),
            "logits": logits_bytes(shape, w, tokens), "workspace": WORKSPACE["cuda" if w.device == "cuda" else "cpu"]}


def score_parts(shape: ModelShape, w: Workload, batch: int, groups: int) -> dict[str, int]:
    tokens = batch * w.seq_len
    s = w.dtype_bytes
    largest = max((t.numel for t in shape.tensors), default=0)
    scored = sum(t.numel for t in shape.tensors)
    parts = evaluate_parts(shape, w, batch) if w.metric != "magnitude" else {
        **evaluate_parts(shape, w, batch), "activations": 0, "logits": 0}
    parts["score_buffers"] = 4 * max(group_sizes(shape, groups), default=0)
    if w.metric in ("grad_x_weight", "grad_squared", "taylor"):
        parts["gradients"] = largest * s
        parts["activations"] = int(tokens * activation_bytes_per_token(shape, w, backward=True))
    elif uses_hvp(w.metric):
        parts["gradients"] = largest * (2 * s + (16 if w.metric == "obd" else 8))
        parts["probes"] = scored * s
        parts["activations"] = int(tokens * activation_bytes_per_token(shape, w, backward=True))
        parts["logits"] *= 2
    elif needs_double_backward(w.metric):
        parts["gradients"] = scored * s + largest * s
        parts["activations"] = int(2 * tokens * activation_bytes_per_token(shape, w, backward=True))
    return parts


def flops_per_token(shape: ModelShape, w: Workload) -> float:
    return 2.0 * shape.active_params + 2.0 * shape.layers * w.seq_len * shape.hidden


def _seconds(shape: ModelShape, w: Workload, windows: float, factor: float) -> float | None:
    if w.n_windows is None:
        return None
    rate = GPU_FLOPS if w.device == "cuda" else CPU_FLOPS
    return windows * w.seq_len * 3 * flops_per_token(shape, w) * factor / rate


def score_factor(w: Workload) -> float:
    if w.metric in ("hutchinson_diag", "obd"):
        return HVP_PASS * w.hutchinson_probes
    return SLOWDOWN.get(w.metric, 3.9)


def phases_of(w: Workload) -> list[str]:
    if w.command == "baseline":
        return ["baseline"]
    if w.command == "profile":
        return ["score"]
    if w.command == "perturb":
        return ["score", "trials"]
    return ["baseline", "score"] + (["trials"] if w.perturb else [])


def _choose(parts_for, usable: int, batch: int | None, max_batch: int) -> tuple[int, dict[str, int]]:
    """The given batch size, or the largest that fits (at least 1) with its parts."""
    if batch is not None:
        return batch, parts_for(batch)
    best = 1
    while best < max_batch and sum(parts_for(best + 1).values()) <= usable:
        best += 1
    return best, parts_for(best)


def plan(shape: ModelShape, w: Workload, device_memory: int) -> Plan:
    """Per phase: batch size, score groups, predicted peak memory and time; whether the command fits."""
    usable = int(device_memory * HEADROOM)
    max_batch = max(1, min(MAX_BATCH, w.n_windows or MAX_BATCH))
    if w.device != "cuda" and w.batch_size is None:
        max_batch = min(max_batch, 8)  # the CPU default
    phases: list[Phase] = []
    reason = None
    for name in phases_of(w):
        if name in ("baseline", "trials"):
            batch, parts = _choose(lambda b: evaluate_parts(shape, w, b), usable, w.batch_size, max_batch)
            # perturb: the baseline again, per seed the super set (and bottom_k), then the control sets
            trials = 1 + w.seeds * (1 + w.bottom_k) + w.control_sets
            windows = (w.n_windows or 0) * (1 if name == "baseline" else trials)
            phases.append(Phase(name, batch, 1, parts, _seconds(shape, w, windows, 1 / 3)))
            continue
        candidates = [w.score_groups] if w.score_groups else range(1, max(1, len(shape.tensors)) + 1)
        groups = next((g for g in candidates if sum(score_parts(shape, w, w.batch_size or 1, g).values()) <= usable),
                      candidates[-1])
        batch, parts = _choose(lambda b: score_parts(shape, w, b, groups), usable, w.batch_size, max_batch)
        passes = groups * (1 + (w.seeds * w.stability_fraction if w.stability_check else 0))
        phases.append(Phase("score", batch, groups, parts,
                            _seconds(shape, w, (w.n_windows or 0) * passes, score_factor(w))))
    for p in phases:
        if p.peak_bytes > usable and reason is None:
            biggest = max(p.parts, key=p.parts.get)
            reason = (f"phase {p.name} needs {p.peak_bytes / GiB:.1f} GiB at batch size {p.batch_size} with "
                      f"{p.score_groups} score group(s), over {usable / GiB:.1f} GiB usable "
                      f"({HEADROOM:.0%} of {device_memory / GiB:.1f} GiB); the largest part is {biggest} "
                      f"({p.parts[biggest] / GiB:.1f} GiB)")
            if biggest == "activations":
                reason += ": shorten --seq-len or narrow --include"
            elif biggest in ("gradients", "score_buffers"):
                reason += ": narrow --include"
    assumptions = [
        f"forward FLOPs per token ≈ 2 × {shape.active_params / 1e9:.2f} B active parameters + attention "
        f"= {flops_per_token(shape, w) / 1e9:.1f} GFLOP; forward+backward 3×",
        f"throughput {(GPU_FLOPS if w.device == 'cuda' else CPU_FLOPS) / 1e12:.1f} TFLOP/s effective ({w.device}); "
        f"metric cost {score_factor(w):.2f}× a forward+backward",
        f"{'eager' if w.attention == 'eager' else 'SDPA'} attention; activations per the esa.planning docstring; "
        f"{HEADROOM:.0%} of the device usable",
        "planned until measured: see bench/RESULTS.md",
    ]
    if w.n_windows is None:
        assumptions.append("number of windows unknown (give --max-samples): no time estimate")
    return Plan(phases, device_memory, reason is None, reason, assumptions)


# ----------------------------------------------------------------------------------------------- from a config
def shape_of(model, scored: list[TensorInfo]) -> ModelShape:
    """The :class:`ModelShape` of a (meta-device) Hugging Face model and its scored tensors."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    hidden = int(c.hidden_size)
    heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads) * head_dim
    per_token_experts = int(getattr(c, "num_experts_per_tok", None) or 1)
    experts = int(getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 1)
    intermediate = int(getattr(c, "intermediate_size", None) or 4 * hidden) * per_token_experts
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for name, p in model.named_parameters() if "experts" in name)
    active = n_params - expert_params + expert_params * per_token_experts // max(experts, 1)
    return ModelShape(n_params=n_params, active_params=active, layers=int(c.num_hidden_layers), hidden=hidden,
                      kv=kv, intermediate=intermediate, heads=heads, vocab=int(c.vocab_size), tensors=tuple(scored))


def format_plan(p: Plan) -> list[str]:
    """Human-readable lines: one block per phase, parts in GiB, and the assumptions."""
    lines = []
    for ph in p.phases:
        t = "n/a" if ph.time_s is None else _duration(ph.time_s)
        lines.append(f"{ph.name}: peak {ph.peak_bytes / GiB:.2f} GiB, batch size {ph.batch_size}, "
                     f"score groups {ph.score_groups}, time ≈ {t}")
        lines += [f"  {k:<14}{v / GiB:9.2f} GiB" for k, v in ph.parts.items()]
    total = "n/a" if p.time_s is None else _duration(p.time_s)
    lines.append(f"peak {p.peak_bytes / GiB:.2f} GiB of {p.device_memory / GiB:.1f} GiB; "
                 f"{'fits' if p.fits else 'does NOT fit'}; estimated time {total}")
    if p.reason:
        lines.append(f"reason: {p.reason}")
    lines += [f"assumption: {a}" for a in p.assumptions]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_command(model_cfg, sel, *, command: str = "run", seq_len: int | None = None, max_samples: int | None = None,
                 batch_size: int | None = None, perturb: bool = False, bottom_k: bool = True,
                 control_sets: int = 39, seeds: int = 3,
                 stability_check: bool = False, stability_fraction: float = 0.5, device_memory: int,
                 device: str = "cuda") -> tuple[Plan, ModelShape, Workload]:
    """Plan a command from its flags (``model_cfg``: :class:`esa.config.ModelConfig`, ``sel``:
    :class:`esa.config.SelectionConfig`); the model is built on the meta device from its config."""
    import torch

    from esa.config import default_seq_len
    from esa.modeling import meta_model, resolve_dtype
    from esa.tensors import scored_tensors

    dtype = resolve_dtype(model_cfg.dtype, torch.device(device), None)  # auto: bf16 on CUDA, float32 elsewhere
    model = meta_model(model_cfg.model, dtype=dtype, revision=model_cfg.revision,
                       trust_remote_code=model_cfg.trust_remote_code)
    scored = [t for t, _ in scored_tensors(model, sel)]
    context = getattr(model.config, "max_position_embeddings", None)
    workload = Workload(
        command=command, metric=sel.metric, seq_len=seq_len or default_seq_len(context), n_windows=max_samples,
        batch_size=batch_size, score_groups=sel.score_groups, dtype_bytes=dtype.itemsize,
        attention="eager" if needs_double_backward(sel.metric) else "sdpa",
        hutchinson_probes=sel.hutchinson_probes, perturb=perturb, bottom_k=bottom_k, control_sets=control_sets,
        seeds=seeds,
        stability_check=stability_check, stability_fraction=stability_fraction, device=device)
    shape = shape_of(model, scored)
    return plan(shape, workload, device_memory), shape, workload


def plan_loaded(model, scored: list[TensorInfo], *, command: str, metric: str, seq_len: int, n_windows: int,
                batch_size: int, score_groups: int | None, hutchinson_probes: int, device: str,
                device_memory: int = 1 << 62) -> Plan:
    """The plan of a loaded model (by default with no device limit)."""
    p = next(iter(model.parameters()))
    attention = "eager" if needs_double_backward(metric) else "sdpa"
    w = Workload(command=command, metric=metric, seq_len=seq_len, n_windows=n_windows, batch_size=batch_size,
                 score_groups=score_groups, dtype_bytes=p.element_size(), attention=attention,
                 hutchinson_probes=hutchinson_probes, device="cuda" if device.startswith("cuda") else "cpu")
    return plan(shape_of(model, scored), w, device_memory)


def predicted_peak(model, scored: list[TensorInfo], **workload) -> int | None:
    """The plan's peak for a loaded model: what a run's manifest records next to the measured peak (None where the
    architecture's config lacks what the model needs)."""
    try:
        return plan_loaded(model, scored, **workload).peak_bytes
    except (AttributeError, TypeError, ValueError):
        return None


def planned_groups(model, scored: list[TensorInfo], **workload) -> int:
    """Score groups from the plan on CUDA (the fewest that fit the device); one elsewhere."""
    import torch

    device = workload["device"]
    if not device.startswith("cuda"):
        return 1
    if len(set(getattr(model, "hf_device_map", None) or {0: 0}.values())) > 1:  # split with --device-map
        try:
            return split_model_groups(model, scored, **workload)
        except (AttributeError, TypeError, ValueError):
            return 1
    total = device_total_memory(torch.device(device))
    try:
        return plan_loaded(model, scored, score_groups=None, device_memory=total, **workload).score_groups
    except (AttributeError, TypeError, ValueError):  # a config the model cannot read: one group, as before
        return 1


def refuse_if_it_cannot_fit(model_cfg, sel, data, *, command: str) -> None:
    """On CUDA, before any weight is loaded: refuse a batch size (and score groups) the plan says cannot fit the
    device, with the plan's numbers. Elsewhere nothing is checked (CPU memory is the host's)."""
    from esa.modeling import resolve_device

    if getattr(model_cfg, "device_map", None):  # a split model: the one-device plan does not apply (esa plan)
        return
    device = resolve_device(model_cfg.device)
    if device.type != "cuda":
        return
    total = device_total_memory(device)
    try:
        p, _, _ = plan_command(model_cfg, sel, command=command, seq_len=data.seq_len, max_samples=data.max_samples,
                               batch_size=data.batch_size, device_memory=total)
    except (AttributeError, TypeError, ValueError):  # a config the model cannot read: no refusal on a guess
        return
    if not p.fits:
        raise EsaError(f"--batch-size {data.batch_size} cannot fit this GPU by the plan: {p.reason} "
                       f"(see `esa plan`)")


CPU_BATCH_SIZE = 8  # the batch size on CPU (and elsewhere off CUDA), where memory is the host's


def device_total_memory(device) -> int:
    """Total memory of a CUDA device, in bytes (what the plan plans against)."""
    import torch

    return torch.cuda.get_device_properties(device).total_memory


def planned_batch_size(model_cfg, sel, data, *, command: str, device_memory: int | None = None) -> int:
    """The batch size of a command whose ``--batch-size`` was not given: on CUDA (or wherever ``device_memory`` is
    given), the largest that fits the device by :func:`plan_command` — the batch size ``esa plan`` reports, the
    smallest over the command's phases; elsewhere :data:`CPU_BATCH_SIZE`. The model is built on the meta device
    from its config, so this runs before any weight is loaded; a config the plan cannot read gives the CPU
    default."""
    if device_memory is None:
        from esa.modeling import resolve_device

        device = resolve_device(model_cfg.device)
        if device.type != "cuda":
            return CPU_BATCH_SIZE
        device_memory = device_total_memory(device)
    try:
        p, _, _ = plan_command(model_cfg, sel, command=command, seq_len=data.seq_len, max_samples=data.max_samples,
                               batch_size=None, device_memory=device_memory)
    except (AttributeError, TypeError, ValueError):
        return CPU_BATCH_SIZE
    return p.batch_size


def with_planned_batch_size(model_cfg, sel, data, *, command: str, device_memory: int | None = None):
    """``data`` with its batch size filled in from :func:`planned_batch_size` when it is None (not given); ``data``
    itself is not changed. Called once per run, before the run directory's config is compared or written, so
    config.json records the batch size used and a rerun with the same flags on the same device resolves to the
    same one. ``sel``: the selection config (None where the command scores nothing)."""
    if data.batch_size is not None:
        return data
    import dataclasses

    from esa.config import SelectionConfig

    return dataclasses.replace(data, batch_size=planned_batch_size(model_cfg, sel or SelectionConfig(), data,
                                                                   command=command, device_memory=device_memory))


# ----------------------------------------------------------------------------------------------- a split model
SPLIT_PARTS = ("weights", "score_buffers", "gradients", "probes", "activations")  # shared by the weights' share


def device_peaks(p: Plan, per_device: dict[str, int], head: str | None) -> dict[str, float]:
    """Each device's predicted peak over the phases of ``p`` (see :func:`plan_split` for the sharing rule)."""
    total = sum(per_device.values()) or 1
    return {d: max(sum(ph.parts.get(k, 0) for k in SPLIT_PARTS) * weights / total + ph.parts.get("workspace", 0)
                   + (ph.parts.get("logits", 0) if d == head else 0) for ph in p.phases)
            for d, weights in per_device.items()}


def split_model_groups(model, scored: list[TensorInfo], **workload) -> int:
    """The fewest score groups for which every GPU of a split model (``model.hf_device_map``) fits its memory by
    :func:`device_peaks`; the most groups when none fits (the run then tries anyway)."""
    import torch

    from esa.placement import weight_bytes_per_device

    placed = model.hf_device_map
    per_device = weight_bytes_per_device(model, placed)
    head = next((f"cuda:{d}" if isinstance(d, int) else str(d) for name, d in placed.items()
                 if name in ("lm_head", "embed_out", "output")), None)
    limits = {d: torch.cuda.get_device_properties(torch.device(d)).total_memory * HEADROOM
              for d in per_device if d.startswith("cuda")}
    n = max(1, len(scored))
    for groups in range(1, n + 1):
        peaks = device_peaks(plan_loaded(model, scored, score_groups=groups, **workload), per_device, head)
        if all(peaks[d] <= limit for d, limit in limits.items()):
            return groups
    return n


@dataclass
class SplitPlan:
    """The plan of a model split across devices (:func:`plan_split`)."""

    lines: list[str]  # as ``esa plan`` prints them
    fits: bool
    reason: str | None
    score_groups: int
    batch_size: int
    devices: dict[str, dict]  # per device: weight_bytes, peak_bytes, limit_bytes (None for host memory)

    @property
    def peak_bytes(self) -> int:
        """The largest GPU's peak (the host's when no GPU holds weights)."""
        gpus = [d["peak_bytes"] for name, d in self.devices.items() if name.startswith("cuda")]
        return max(gpus or [d["peak_bytes"] for d in self.devices.values()])

    def as_dict(self) -> dict:
        return {"fits": self.fits, "reason": self.reason, "peak_bytes": self.peak_bytes,
                "score_groups": self.score_groups, "batch_size": self.batch_size, "devices": self.devices,
                "lines": self.lines}


def plan_split(shape: ModelShape, model_cfg, w: Workload, device_memory: int) -> SplitPlan:
    """Per-device peaks of a model split with ``--device-map`` (see :mod:`esa.placement`): the device map is the
    one accelerate makes (or the FILE.json), each device's weights are summed from it, and each phase's parts
    are shared as its weights are — device d with share f_d of the weights holds

        f_d · (weights + score buffers + gradients + probes + activations) + workspace (+ logits on the head's),

    the activations following the layers it holds (their share of the weights). A GPU's limit is its
    ``--max-memory`` entry, else ``device_memory``; CPU and disk entries are the host's and are not checked, but
    with a GPU they offload, which the gradient metrics refuse. Score groups (unless given) are the fewest with
    which every GPU fits, at batch size 1 unless given."""
    import dataclasses

    from esa.modeling import DTYPES, meta_model
    from esa.placement import infer_device_map, parse_device_map, parse_max_memory, weight_bytes_per_device

    dtype = {2: DTYPES["bfloat16"], 4: DTYPES["float32"], 8: DTYPES["float64"]}[w.dtype_bytes]
    placement = parse_device_map(model_cfg.device_map)
    memory = parse_max_memory(model_cfg.max_memory) or {}
    model = meta_model(model_cfg.model, dtype=dtype, revision=model_cfg.revision,
                       trust_remote_code=model_cfg.trust_remote_code)
    if isinstance(placement, str):
        placement = infer_device_map(model, placement, memory or None, dtype=dtype)
    per_device = weight_bytes_per_device(model, placement, dtype)
    head = next((d for name, d in placement.items() if name in ("lm_head", "embed_out", "output")), None)
    head = None if head is None else (f"cuda:{head}" if isinstance(head, int) else str(head))
    total = sum(per_device.values())
    gpus = [d for d in per_device if d.startswith("cuda")]
    lines = [f"device map {model_cfg.device_map}: weights on {', '.join(per_device)} "
             f"(accelerate's placement{', within --max-memory' if memory else ''})"]
    fits, reason = True, None
    offloaded = [d for d in per_device if d == "disk" or (d == "cpu" and gpus)]
    if offloaded and w.command in ("profile", "run") and w.metric not in ("magnitude", "act_mag"):
        fits, reason = False, (f"the device map offloads weights to {' and '.join(offloaded)}, which --metric "
                               f"{w.metric} (gradients) refuses: give the GPUs more --max-memory or use more GPUs")
    limits = {d: memory.get(int(d[5:]), device_memory) for d in gpus}
    candidates = [w.score_groups] if w.score_groups else range(1, max(1, len(shape.tensors)) + 1)
    for groups in candidates:
        p = plan(shape, dataclasses.replace(w, score_groups=groups, batch_size=w.batch_size or 1), 1 << 62)
        peaks = device_peaks(p, per_device, head)
        if all(peaks[d] <= limit * HEADROOM for d, limit in limits.items()):
            break
    lines.append(f"  per device at batch size {p.batch_size}, score groups {p.score_groups}:")
    devices = {}
    for d, weights in per_device.items():
        share, peak = weights / total, peaks[d]
        limit = limits.get(d)
        devices[d] = {"weight_bytes": int(weights), "peak_bytes": int(peak),
                      "limit_bytes": None if limit is None else int(limit)}
        status = "host memory, not checked" if limit is None else (
            f"of {limit / GiB:.1f} GiB: {'fits' if peak <= limit * HEADROOM else 'does NOT fit'}")
        lines.append(f"  {d:<8} weights {weights / GiB:8.2f} GiB ({share:.0%}); peak ≈ {peak / GiB:.2f} GiB "
                     f"{status}")
        if limit is not None and peak > limit * HEADROOM and fits:
            fits, reason = False, (f"{d} needs ≈ {peak / GiB:.1f} GiB, over {HEADROOM:.0%} of its {limit / GiB:.1f} "
                                   "GiB: shorten --seq-len, narrow --include, or add a GPU")
    lines.append("assumption: per device, each phase's weights, scores, gradients, probes and activations follow "
                 "its share of the weights; the logits sit on the output head's device; the single-device plan "
                 "above is the whole model on one device")
    return SplitPlan(lines, fits, reason, p.score_groups, p.batch_size, devices)
