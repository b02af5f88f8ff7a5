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
                                                       on one-hot inputs) ‖x_i‖₂ = sqrt(count of token i)
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
The second-order metrics differentiate through the gradient (double backward), which holds the gradient of
every scored tensor with its graph: about two more copies of the scored weights, plus activations.

Score groups: ``group`` names the scored tensors whose score buffers one call fills (the others get none), so that
a caller can score a model in several passes over the same windows and keep only one group's buffers at a time.
The result for a tensor does not depend on the grouping: the same batches are used, and for ``hutchinson_diag`` the
probe z spans every scored tensor in every pass (H z needs the cross-tensor blocks), only the accumulation is per
group. The probe is never held whole: z_t is drawn per tensor from a counter-based seed (seed, tensor, batch,
probe) where it is used, in the backward of g·z and again when z_t ⊙ (H z)_t is folded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from esa.errors import EsaError
from esa.evaluate import mean_loss
from esa.kernels import accumulate_
from esa.modeling import set_attention
from esa.progress import progress_bar
from esa.seeding import seed_for
from esa.tensors import TensorInfo

METRICS = ("grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag", "magnitude", "act_mag", "taylor", "obd")
FIRST_ORDER = ("grad_x_weight", "grad_squared")
SECOND_ORDER = ("hessian_diag", "hutchinson_diag")
#: Metrics whose scores carry a sign (an estimated loss change); they are ranked by absolute value.
SIGNED = ("taylor", "obd")
DEFAULT_HESSIAN_BUDGET = 4096


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


def needs_double_backward(metric: str) -> bool:
    return metric in SECOND_ORDER or metric == "obd"


def is_signed(metric: str) -> bool:
    return metric in SIGNED


def ranking_view(score: torch.Tensor, metric: str) -> torch.Tensor:
    """What selection and tail statistics rank: |S| for a signed metric (a new fp32 tensor), S itself otherwise."""
    return score.abs() if is_signed(metric) else score


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise EsaError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")


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


def rademacher(shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int, name: str, batch: int,
               probe: int) -> torch.Tensor:
    """±1 of ``shape`` and ``dtype``, reproducible for (seed, tensor name, batch, probe) on a given device."""
    g = torch.Generator(device=device).manual_seed(seed_for(seed, name, batch, probe))
    z = torch.randint(0, 2, shape, generator=g, device=device, dtype=torch.int8)
    return (z * 2 - 1).to(dtype)


def rademacher_like(p: torch.Tensor, seed: int, name: str, batch: int, probe: int) -> torch.Tensor:
    """The probe of tensor ``p`` (see :func:`rademacher`)."""
    return rademacher(p.shape, p.dtype, p.device, seed, name, batch, probe)


class _ProbeDot(torch.autograd.Function):
    """g · z for the probe z = rademacher_like(g, *key); z is drawn again in backward instead of being saved."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, key: tuple) -> torch.Tensor:
        ctx.key, ctx.shape, ctx.dtype, ctx.device = key, g.shape, g.dtype, g.device
        return (g * rademacher_like(g, *key)).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out * rademacher(ctx.shape, ctx.dtype, ctx.device, *ctx.key), None


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
    params = {info.name: p for info, p in tensors}
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    batches = _batches(input_ids, batch_size) if input_ids is not None else []
    device = next(model.parameters()).device
    meta: dict = {}

    if metric == "magnitude":
        for name, p in params.items():
            accumulate_("abs", scores[name], p.detach())
        return ScoreSet(metric, infos, scores, 0, meta)
    if metric == "act_mag":
        meta = _act_mag(model, tensors, scores, batches, device)
        if not scores and group is None:  # a score group may hold only tensors act_mag skips
            raise EsaError("act_mag scores Linear and Embedding weights only, and none is selected")
        return ScoreSet(metric, [i for i in infos if i.name in scores], scores, len(batches), meta)

    was_training = model.training
    model.eval()
    if needs_double_backward(metric):
        meta["attn_implementation_was"] = getattr(model.config, "_attn_implementation", None)
        set_attention(model, "eager")  # fused SDPA/flash kernels have no double backward
    try:
        spans_all = metric in ("hutchinson_diag", "obd")  # a probe over every scored tensor, whatever the group
        with _grad_enabled_for(list((spanned if spans_all else params).values())):
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
        if needs_double_backward(metric) and meta.get("attn_implementation_was"):
            set_attention(model, meta["attn_implementation_was"])
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


def _first_order(model, params, scores, batches, device, metric) -> None:
    op = "abs_product" if metric == "grad_x_weight" else "square"

    def fold(name: str, grad: torch.Tensor, p: torch.Tensor) -> None:
        accumulate_(op, scores[name], grad, p.detach() if op == "abs_product" else None)

    with fold_gradients(params, fold), progress_bar(f"scoring ({metric})", total=len(batches)) as bar:
        for batch in batches:
            batch_loss(model, batch.to(device)).backward()
            bar.advance()


def _probe_hessian(model, params, scores, batches, device, probes: int, seed: int, *, label: str,
                   fold_hz: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
                   loss_share: Callable[[int], float] | None = None,
                   on_gradients: Callable[[list[torch.Tensor]], None] | None = None) -> None:
    """The double-backward loop of the Hutchinson estimator: per batch b, g = ∇(s_b·L_b) with its graph (s_b =
    ``loss_share(b)``, else 1), ``on_gradients(g)``, then per probe z (Rademacher over every tensor of ``params``,
    drawn again per tensor, never a full set in memory) H z = d/dw (g · z), delivered tensor by tensor to
    ``fold_hz(name, Hz, p, z)`` for the tensors of ``scores`` (a subset of ``params``)."""
    if probes < 1:
        raise EsaError(f"--hutchinson-probes must be at least 1 (got {probes})")
    names, plist = list(params), list(params.values())
    key: list = []  # (batch, probe) of the probe being folded

    def fold(name: str, hz: torch.Tensor, p: torch.Tensor) -> None:
        if name in scores:
            fold_hz(name, hz, p, rademacher_like(p, seed, name, *key))

    with fold_gradients(params, fold), progress_bar(f"scoring ({label})", total=len(batches) * probes) as bar:
        for b, batch in enumerate(batches):
            loss = batch_loss(model, batch.to(device))
            grads = torch.autograd.grad(loss if loss_share is None else loss * loss_share(b), plist,
                                        create_graph=True)
            if on_gradients is not None:
                on_gradients(grads)
            for i in range(probes):
                key[:] = [b, i]
                g_dot_z = sum(_ProbeDot.apply(g, (seed, n, b, i)) for n, g in zip(names, grads))
                g_dot_z.backward(retain_graph=i < probes - 1)
                bar.advance()
            del grads


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

    with fold_gradients(params, fold), progress_bar("scoring (taylor)", total=len(batches)) as bar:
        for b, batch in enumerate(batches):
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
    names = list(params)

    def first_order(grads: list[torch.Tensor]) -> None:
        for name, g in zip(names, grads):
            if name in scores:
                accumulate_("product", scores[name], g.detach(), params[name].detach().neg())

    def fold_hz(name: str, hz: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> None:
        w = p.detach().float()
        accumulate_("product", scores[name], z.float() * w * w * (0.5 / probes), hz)

    _probe_hessian(model, params, scores, batches, device, probes, seed, label="obd", fold_hz=fold_hz,
                   loss_share=lambda b: _mean_loss_share(batches, b), on_gradients=first_order)


def _hessian_diag(model, params, scores, batches, device) -> None:
    total = sum(p.numel() for p in params.values())
    with progress_bar("scoring (hessian_diag)", total=len(batches) * total) as bar:
        for batch in batches:
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
    """Wanda's |w_ij|·‖x_j‖₂ for Linear and Embedding weights; other tensors are skipped (and listed)."""
    sumsq: dict[str, torch.Tensor] = {}
    handles, skipped = [], []
    for info, p in tensors:
        module = model.get_submodule(info.name.rpartition(".")[0]) if "." in info.name else None
        if isinstance(module, torch.nn.Linear) and module.weight is p:
            acc = sumsq[info.name] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)

            def hook(mod, inputs, output, acc=acc):
                x = inputs[0].detach().float()
                acc += x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, torch.nn.Embedding) and module.weight is p:
            acc = sumsq[info.name] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)

            def hook(mod, inputs, output, acc=acc):
                ids = inputs[0].reshape(-1)
                acc += torch.bincount(ids, minlength=acc.numel()).to(acc.dtype)

            handles.append(module.register_forward_hook(hook))
        else:
            skipped.append(info.name)
    try:
        with torch.no_grad(), progress_bar("scoring (act_mag)", total=len(batches)) as bar:
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    for info, p in tensors:
        if info.name in skipped:
            scores.pop(info.name)
            continue
        norm = sumsq[info.name].sqrt()
        module = model.get_submodule(info.name.rpartition(".")[0])
        if isinstance(module, torch.nn.Embedding):
            accumulate_("abs_scaled", scores[info.name], p.detach(), row_scale=norm)
        else:
            accumulate_("abs_scaled", scores[info.name], p.detach(), col_scale=norm)
    return {"skipped": skipped} if skipped else {}
