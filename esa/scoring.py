"""Sensitivity scores: one float32 score per weight element, accumulated tensor by tensor.

Batches b = 1..B of windows; L_b is the mean next-token NLL over batch b (the Hugging Face loss for
``labels=input_ids``); g_b = ∇_w L_b. With ``⊙`` the element-wise product:

- ``magnitude``        S = |w|
- ``grad_x_weight``    S = (1/B) Σ_b |g_b ⊙ w|        first-order Taylor estimate of the loss change when w is
                                                       removed, taken per batch so that gradient noise does not
                                                       cancel between batches (the absolute, not squared, form)
- ``grad_squared``     S = (1/B) Σ_b g_b ⊙ g_b         the empirical Fisher diagonal at batch granularity
- ``hessian_diag``     S = |(1/B) Σ_b diag(H_b)|       exact, one Hessian-vector product per scored coordinate
- ``hutchinson_diag``  S = |(1/(B·m)) Σ_b Σ_i z_i ⊙ (H_b z_i)|, z_i Rademacher over the scored tensors, m probes
- ``act_mag``          S_ij = |w_ij| · ‖x_j‖₂          Wanda: x_j is input feature j of the Linear layer and the norm
                                                       runs over every evaluated token; for an embedding (a Linear
                                                       on one-hot inputs) ‖x_i‖₂ = sqrt(count of token i); for
                                                       a fused expert stack, per expert e over the tokens routed to
                                                       e only (gate_up_proj: the hidden states, down_proj:
                                                       act(gate)·up), see esa.experts; the router is a Linear
- ``taylor``           S = −Ḡ ⊙ w                      SIGNED first-order estimate of the change of the mean loss
                                                       when w is zeroed: L(w − w e_i) − L(w) ≈ −Ḡ_i w_i
- ``obd``              S = −Ḡ ⊙ w + ½ · Ĥ_ii ⊙ w²      SIGNED second-order estimate (Optimal Brain Damage, LeCun
                                                       et al. 1990, with the gradient term kept: not at a minimum)

H_b is the Hessian of L_b with respect to the scored tensors (its diagonal is that of the full Hessian).

``taylor`` and ``obd`` estimate the change of the loss that esa evaluates, the mean NLL over every predicted token
of every window, L̄ = Σ_b (n_b / N) L_b (n_b windows in batch b, N in all; windows have equal length, so window
counts are token counts). Hence Ḡ = ∇L̄ = Σ_b (n_b/N) g_b — a short last batch weighs less, unlike the per-batch
averages above — obtained by back-propagating (n_b/N)·L_b. For ``obd``, Ĥ_ii is Hutchinson's estimate of the
diagonal of ∇²L̄: Σ_b (n_b/N) (1/m) Σ_i z_bi ⊙ (H_b z_bi), with m = ``hutchinson_probes`` Rademacher probes per batch,
drawn by :func:`rademacher_like` exactly as for ``hutchinson_diag`` (same seed → same probes). Their scores keep
their sign (in ``--save-scores`` and in the CSVs); selection ranks them by |S| (:func:`ranking_view`).

Memory: gradients are never alive for the whole model at once. Each scored parameter gets a
``register_post_accumulate_grad_hook`` that folds its fresh gradient into its float32 score buffer and frees
it (``p.grad = None``); parameters that are not scored do not require grad at all. Peak memory is the model, one
float32 buffer per scored tensor, the activations of one batch, and the gradient of the tensor being folded.
``hessian_diag`` differentiates through the gradient (double backward), which holds the gradient of every scored
tensor with its graph: about two more copies of the scored weights, plus activations. ``hutchinson_diag`` and
``obd`` get H z by forward-over-reverse (:mod:`esa.hvp`): per probe one pass whose backward carries tangents, with
the decoder layers swept one at a time; it holds the probe z over every scored tensor (as their tangent), each
layer's input with its tangent, and one layer's activations at a time.

Score groups: ``group`` names the scored tensors whose score buffers one call fills (the others get none), so that
a caller can score a model in several passes over the same windows and keep only one group's buffers at a time.
The result for a tensor does not depend on the grouping: the same batches are used, and for ``hutchinson_diag`` the
probe z spans every scored tensor in every pass (H z needs the cross-tensor blocks), only the accumulation is per
group. z_t is drawn per tensor from a counter-based seed (seed, tensor, batch, probe), so every pass and every
group draws the same probes; it is the tangent of tensor t for the whole pass and is folded as z_t ⊙ (H z)_t when
tensor t's gradient arrives.

Data parallel (torchrun, :mod:`esa.distributed`): the batches are those of one process, each rank folds the
contiguous block of them that :func:`esa.distributed.shard` gives it, keyed by their global index b (so probes
and the weights n_b/N do not depend on the number of ranks), and the score buffers are then summed over ranks
with ``all_reduce``, one tensor at a time, before the division by B (for act_mag: the ‖x_j‖² sums).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from esa import distributed
from esa.config import HESSIAN_BUDGET as DEFAULT_HESSIAN_BUDGET  # declared once, in esa.config
from esa.config import METRICS, check_metric, check_probes, needs_double_backward  # noqa: F401 - re-exported
from esa.errors import EsaError
from esa.evaluate import mean_loss, model_device
from esa.experts import call_arguments, is_fused_experts, routed_inputs
from esa.hvp import forward_over_reverse, hvp_pass
from esa.kernels import accumulate_
from esa.modeling import set_attention
from esa.placement import is_offloaded, refuse_offload, weight_tensors
from esa.progress import progress_bar
from esa.seeding import seed_for
from esa.tensors import TensorInfo

FIRST_ORDER = ("grad_x_weight", "grad_squared")
SECOND_ORDER = ("hessian_diag", "hutchinson_diag")
#: Metrics whose scores carry a sign (an estimated loss change); they are ranked by absolute value.
SIGNED = ("taylor", "obd")


@dataclass
class ScoreSet:
    """Scores of every scored tensor (float32, the tensor's shape, on its device), in model order."""

    metric: str
    tensors: list[TensorInfo]
    scores: dict[str, torch.Tensor]
    n_batches: int
    meta: dict = field(default_factory=dict)


def needs_data(metric: str) -> bool:
    return metric != "magnitude"


def uses_hvp(metric: str) -> bool:
    """The Hutchinson metrics: Hessian-vector products by forward-over-reverse (:mod:`esa.hvp`)."""
    return metric in ("hutchinson_diag", "obd")


def require_act_mag_tensors(scored: int) -> None:
    """act_mag skips the tensors it cannot score (norms, biases); a selection of those alone is refused."""
    if not scored:
        raise EsaError("act_mag scores Linear, Embedding, router and expert weights only, and none is selected")


def is_signed(metric: str) -> bool:
    return metric in SIGNED


def ranking_view(score: torch.Tensor, metric: str) -> torch.Tensor:
    """What selection and tail statistics rank: |S| for a signed metric (a new fp32 tensor), S itself otherwise."""
    return score.abs() if is_signed(metric) else score


@contextlib.contextmanager
def _grad_enabled_for(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """requires_grad on exactly these parameters for the duration; restored, and grads dropped, on exit."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.grad = None
            p.requires_grad_(flag)


@contextlib.contextmanager
def fold_gradients(params: dict[str, torch.nn.Parameter], fold: Callable[[str, torch.Tensor, torch.Tensor], None]):
    """Call ``fold(name, grad, param)`` as each parameter's gradient is accumulated, then free that gradient.

    Hooks are removed on exit, also when the block raises (TransformerLens-style hook hygiene).
    """
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            fold(name, p.grad, p)
            p.grad = None

        return hook

    try:
        for name, p in params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the batch (the same definition as :mod:`esa.evaluate`, chunked through the head)."""
    return mean_loss(model, batch)


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


def _mine(batches: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(global index b, batch) of the batches this process folds: all of them, or its block under torchrun."""
    return [(b, batches[b]) for b in distributed.shard(len(batches))]


def rademacher(shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int, name: str, batch: int,
               probe: int) -> torch.Tensor:
    """±1 of ``shape`` and ``dtype``, reproducible for (seed, tensor name, batch, probe) on a given device."""
    g = torch.Generator(device=device).manual_seed(seed_for(seed, name, batch, probe))
    z = torch.randint(0, 2, shape, generator=g, device=device, dtype=torch.int8)
    return (z * 2 - 1).to(dtype)


def rademacher_like(p: torch.Tensor, seed: int, name: str, batch: int, probe: int) -> torch.Tensor:
    """The probe of tensor ``p`` (see :func:`rademacher`)."""
    return rademacher(p.shape, p.dtype, p.device, seed, name, batch, probe)


def compute_scores(
    model: torch.nn.Module,
    tensors: list[tuple[TensorInfo, torch.nn.Parameter]],
    input_ids: torch.Tensor | None,
    metric: str,
    *,
    batch_size: int = 8,
    hutchinson_probes: int = 8,
    hessian_budget: int = DEFAULT_HESSIAN_BUDGET,
    seed: int = 0,
    group: Sequence[str] | None = None,
) -> ScoreSet:
    """Score every element of ``tensors`` with ``metric`` on the windows ``input_ids`` [n, L] (see module doc).

    With ``group``, only those of ``tensors`` get a score buffer (a score group; see the module docstring)."""
    check_metric(metric)
    if not tensors:
        raise EsaError("no tensor is selected for scoring; check --include/--exclude")
    refuse_offload(model, metric)
    if needs_data(metric) and (input_ids is None or input_ids.shape[0] == 0):
        raise EsaError(f"--metric {metric} needs evaluation windows")
    if metric == "hessian_diag":
        total = sum(info.numel for info, _ in tensors)
        if total > hessian_budget:
            raise EsaError(
                f"hessian_diag needs one Hessian-vector product per scored weight: {total:,} weights exceed "
                f"--hessian-budget {hessian_budget:,}; narrow the tensors with --include (e.g. "
                f"--include '*layers.1.mlp.down_proj*') or use --metric hutchinson_diag")
    wanted = set(group) if group is not None else {info.name for info, _ in tensors}
    unknown = wanted - {info.name for info, _ in tensors}
    if unknown:
        raise EsaError(f"score group names tensors that are not scored: {', '.join(sorted(unknown))}")
    spanned = {info.name: p for info, p in tensors}  # the probe of hutchinson_diag spans all of them
    tensors = [(info, p) for info, p in tensors if info.name in wanted]
    infos = [info for info, _ in tensors]
    if is_offloaded(model):  # magnitude or act_mag (refused above otherwise): the weights accelerate keeps aside
        stored = weight_tensors(model, writable=False)
        tensors = [(info, stored.get(info.name, p)) for info, p in tensors]
    params = {info.name: p for info, p in tensors}
    # Each score buffer lives with its tensor, on that tensor's device (a split model keeps every score local).
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    batches = _batches(input_ids, batch_size) if input_ids is not None else []
    device = model_device(model)  # the input embedding's: a split model's first device
    meta: dict = {}

    if metric == "magnitude":
        for name, p in params.items():
            accumulate_("abs", scores[name], p.detach())
        return ScoreSet(metric, infos, scores, 0, meta)
    if metric == "act_mag":
        meta = _act_mag(model, tensors, scores, batches, device)
        if group is None:  # a score group may hold only tensors act_mag skips (esa.scoreselect checks the union)
            require_act_mag_tensors(len(scores))
        return ScoreSet(metric, [i for i in infos if i.name in scores], scores, len(batches), meta)

    was_training = model.training
    model.eval()
    attention = _attention_for(metric)
    if attention:
        meta["attn_implementation_was"] = getattr(model.config, "_attn_implementation", None)
        _set_attention_or_eager(model, attention)
    try:
        # The Hutchinson metrics differentiate dual copies of the parameters (esa.hvp), not the parameters.
        with _grad_enabled_for([] if uses_hvp(metric) else list(params.values())):
            if metric in FIRST_ORDER:
                _first_order(model, params, scores, batches, device, metric)
            elif metric == "hutchinson_diag":
                _hutchinson(model, spanned, scores, batches, device, hutchinson_probes, seed)
                meta["probes"] = hutchinson_probes
            elif metric == "taylor":
                _taylor(model, params, scores, batches, device)
            elif metric == "obd":
                _obd(model, spanned, scores, batches, device, hutchinson_probes, seed)
                meta["probes"] = hutchinson_probes
            else:
                _hessian_diag(model, params, scores, batches, device)
    finally:
        model.train(was_training)
        if attention and meta.get("attn_implementation_was"):
            set_attention(model, meta["attn_implementation_was"])
    for s in scores.values():  # each rank's sum over its batches → the sum over every batch
        distributed.all_reduce_sum_(s)
    if metric in SIGNED:
        meta["signed"] = True
        meta["batch_weighting"] = "n_b/N (gradient of the mean loss over all windows)"
        return ScoreSet(metric, infos, scores, len(batches), meta)
    n = len(batches) * (hutchinson_probes if metric == "hutchinson_diag" else 1)
    for name, s in scores.items():
        s.div_(n)
        if metric in SECOND_ORDER:
            s.abs_()
    return ScoreSet(metric, infos, scores, len(batches), meta)


def _attention_for(metric: str) -> str | None:
    """``eager`` for double backward (fused SDPA/flash kernels have none), ``sdpa`` for forward-over-reverse (run on
    its math kernel, see :mod:`esa.hvp`), None (the model's own) otherwise."""
    return "eager" if needs_double_backward(metric) else "sdpa" if uses_hvp(metric) else None


def _set_attention_or_eager(model: torch.nn.Module, implementation: str) -> None:
    try:
        set_attention(model, implementation)
    except (ValueError, ImportError):  # an architecture without SDPA support: eager also has forward AD
        set_attention(model, "eager")


def _first_order(model, params, scores, batches, device, metric) -> None:
    op = "abs_product" if metric == "grad_x_weight" else "square"

    def fold(name: str, grad: torch.Tensor, p: torch.Tensor) -> None:
        accumulate_(op, scores[name], grad, p.detach() if op == "abs_product" else None)

    mine = _mine(batches)
    with fold_gradients(params, fold), progress_bar(f"scoring ({metric})", total=len(mine)) as bar:
        for _, batch in mine:
            batch_loss(model, batch.to(device)).backward()
            bar.advance()


def _probe_hessian(model, params, scores, batches, device, probes: int, seed: int, *, label: str,
                   fold_hz: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
                   loss_share: Callable[[int], float] | None = None,
                   on_gradient: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """The Hutchinson loop, forward-over-reverse (:mod:`esa.hvp`): per batch b and probe i, one pass of
    l_b = s_b·L_b (s_b = ``loss_share(b)``, else 1) with every tensor t of ``params`` the dual number (w_t, z_t),
    z_t = ``rademacher_like(w_t, seed, t, b, i)``; backward flows to the tensors of ``scores`` only (a subset of
    ``params``) and each one's gradient, primal ∇l_b and tangent (H_b z)_t, goes to ``fold_hz(name, Hz, p, z)`` as it
    is accumulated (and, for probe 0, ``on_gradient(name, ∇l_b)``), then is freed."""
    check_probes(probes)
    mine = _mine(batches)
    with forward_over_reverse(model) as sweep, \
            progress_bar(f"scoring ({label})", total=len(mine) * probes) as bar:
        for b, batch in mine:
            batch = batch.to(device)
            share = 1.0 if loss_share is None else loss_share(b)
            for i in range(probes):
                probe = {n: rademacher_like(p, seed, n, b, i) for n, p in params.items()}

                def fold(name: str, g: torch.Tensor, hz: torch.Tensor, first: bool = i == 0) -> None:
                    if on_gradient is not None and first:
                        on_gradient(name, g)
                    fold_hz(name, hz, params[name], probe[name])

                def loss() -> torch.Tensor:
                    value = batch_loss(model, batch)
                    return value if loss_share is None else value * share

                hvp_pass(model, sweep, loss, {n: (p, probe[n]) for n, p in params.items()}, set(scores), fold)
                del probe
                bar.advance()


def _hutchinson(model, params, scores, batches, device, probes: int, seed: int) -> None:
    """Accumulate z ⊙ (H z) into ``scores`` (a subset of ``params``); z spans every tensor of ``params``."""

    def fold_hz(name: str, hz: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> None:
        accumulate_("product", scores[name], z, hz)

    _probe_hessian(model, params, scores, batches, device, probes, seed, label="hutchinson_diag", fold_hz=fold_hz)


def _mean_loss_share(batches: list[torch.Tensor], b: int) -> float:
    """n_b / N: the weight of batch b's mean loss in the mean loss over all windows."""
    return batches[b].shape[0] / sum(x.shape[0] for x in batches)


def _taylor(model, params, scores, batches, device) -> None:
    """scores ← −Σ_b ∇((n_b/N) L_b) ⊙ w = −Ḡ ⊙ w, one gradient alive at a time (``product`` then negate)."""

    def fold(name: str, grad: torch.Tensor, p: torch.Tensor) -> None:
        accumulate_("product", scores[name], grad, p.detach())

    mine = _mine(batches)
    with fold_gradients(params, fold), progress_bar("scoring (taylor)", total=len(mine)) as bar:
        for b, batch in mine:
            (batch_loss(model, batch.to(device)) * _mean_loss_share(batches, b)).backward()
            bar.advance()
    for s in scores.values():
        s.neg_()


def _obd(model, params, scores, batches, device, probes: int, seed: int) -> None:
    """scores ← −Ḡ ⊙ w + ½ Ĥ_ii ⊙ w² (module docstring) for the tensors of ``scores`` (a subset of ``params``), one
    double-backward pass per batch; the probe spans every tensor of ``params``, as in :func:`_hutchinson`.

    With l_b = (n_b/N) L_b: the gradient g'_b = ∇l_b gives the first-order term (folded with ``product`` against
    −w); each probe's H'_b z is folded against z ⊙ w² / (2m), built in fp32 for one tensor at a time.
    """
    def first_order(name: str, g: torch.Tensor) -> None:
        accumulate_("product", scores[name], g, params[name].detach().neg())

    def fold_hz(name: str, hz: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> None:
        w = p.detach().float()
        accumulate_("product", scores[name], z.float() * w * w * (0.5 / probes), hz)

    _probe_hessian(model, params, scores, batches, device, probes, seed, label="obd", fold_hz=fold_hz,
                   loss_share=lambda b: _mean_loss_share(batches, b), on_gradient=first_order)


def _hessian_diag(model, params, scores, batches, device) -> None:
    total = sum(p.numel() for p in params.values())
    mine = _mine(batches)
    with progress_bar("scoring (hessian_diag)", total=len(mine) * total) as bar:
        for _, batch in mine:
            plist = list(params.values())
            grads = torch.autograd.grad(batch_loss(model, batch.to(device)), plist, create_graph=True)
            for (name, p), g in zip(params.items(), grads):
                flat_g = g.reshape(-1)
                diag = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
                for j in range(p.numel()):
                    (row,) = torch.autograd.grad(flat_g[j], p, retain_graph=True, allow_unused=True)
                    diag[j] = 0.0 if row is None else row.reshape(-1)[j].float()
                    bar.advance()
                scores[name] += diag.view(p.shape)
            del grads


def _act_mag(model, tensors, scores, batches, device) -> dict:
    """Wanda's |w_ij|·‖x_j‖₂ for Linear, Embedding and router weights and for fused expert stacks (per expert e,
    ‖x_j‖ over the tokens routed to e only: :mod:`esa.experts`); other tensors are skipped (and listed)."""
    sumsq: dict[str, torch.Tensor] = {}
    handles, skipped = [], []
    stacks: dict[str, dict[str, torch.Tensor]] = {}  # experts module name -> {"gate_up_proj"/"down_proj": [E, in]}
    for info, p in tensors:
        owner = info.name.rpartition(".")[0]
        module = model.get_submodule(owner) if "." in info.name else None
        # ``p`` is the weight itself, or for an offloaded one (its parameter on ``meta``) the copy accelerate keeps.
        weight = getattr(module, "weight", None)
        own = weight is not None and (weight is p or weight.device.type == "meta")
        if (isinstance(module, torch.nn.Linear) or info.component == "moe.router") and own and p.dim() == 2:
            acc = sumsq[info.name] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)

            def hook(mod, inputs, output, acc=acc):  # a split model's hook sees the inputs before they move
                x = inputs[0].detach().to(acc.device).float()
                acc += x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, torch.nn.Embedding) and own:
            acc = sumsq[info.name] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)

            def hook(mod, inputs, output, acc=acc):
                ids = inputs[0].reshape(-1).to(acc.device)
                acc += torch.bincount(ids, minlength=acc.numel()).to(acc.dtype)

            handles.append(module.register_forward_hook(hook))
        elif is_fused_experts(module) and any(getattr(module, n) is p for n in ("gate_up_proj", "down_proj")):
            leaf = info.name.rpartition(".")[2]
            if owner not in stacks:
                stacks[owner] = {}
                handles.append(module.register_forward_hook(_expert_input_hook(stacks[owner]), with_kwargs=True))
            sumsq[info.name] = stacks[owner].setdefault(
                leaf, torch.zeros(p.shape[0], p.shape[2], dtype=torch.float32, device=p.device))
        else:
            skipped.append(info.name)
    try:
        mine = _mine(batches)
        with torch.no_grad(), progress_bar("scoring (act_mag)", total=len(mine)) as bar:
            for _, batch in mine:
                model(input_ids=batch.to(device), use_cache=False)
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    for acc in sumsq.values():  # Σ over every evaluated token, whichever rank evaluated it
        distributed.all_reduce_sum_(acc)
    for info, p in tensors:
        if info.name in skipped:
            scores.pop(info.name)
            continue
        norm = sumsq[info.name].sqrt()
        module = model.get_submodule(info.name.rpartition(".")[0])
        if isinstance(module, torch.nn.Embedding):
            accumulate_("abs_scaled", scores[info.name], p.detach(), row_scale=norm)
        elif p.dim() == 3:  # an expert stack: expert e's slice scaled by the norms of e's own inputs
            w = p.detach().contiguous()
            for e in range(p.shape[0]):
                accumulate_("abs_scaled", scores[info.name][e], w[e], col_scale=norm[e].contiguous())
        else:
            accumulate_("abs_scaled", scores[info.name], p.detach(), col_scale=norm)
    return {"skipped": skipped} if skipped else {}


def _expert_input_hook(acc: dict[str, torch.Tensor]):
    """A forward hook on a fused experts module adding, per expert e, Σ_t x_t² over e's routed tokens into
    ``acc["gate_up_proj"][e]`` (x: the hidden state) and ``acc["down_proj"][e]`` (x: act(gate)·up), for the keys
    present."""

    def hook(module, args, kwargs, output):
        hidden, index = call_arguments(args, kwargs)
        for e, x, mid in routed_inputs(module, hidden.detach(), index, middle="down_proj" in acc):
            if "gate_up_proj" in acc:
                acc["gate_up_proj"][e] += x.float().pow(2).sum(dim=0)
            if mid is not None:
                acc["down_proj"][e] += mid.float().pow(2).sum(dim=0)

    return hook
