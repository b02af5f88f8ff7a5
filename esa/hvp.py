"""Hessian-vector products by forward-over-reverse: the tangent of the gradient, with no graph of the backward.

For a loss L(w) and a probe z, H z = d/dε ∇L(w + ε z) at ε = 0. Each scored parameter w_t is replaced, for one
forward and one backward pass, by the dual number (w_t, z_t) (``torch.autograd.forward_ad``): the forward pass
carries every activation's tangent along with it, and the ordinary backward pass — run on those dual activations —
returns gradients that are dual numbers too, primal ∇L and tangent H z. Nothing of the backward is kept for a
second backward (unlike double backward, which holds the first backward's whole graph), so memory is:

    forward activations + their tangents (both in the model dtype) + one backward's transients.

Three things make the pass fit and work with Hugging Face's decoder code (:func:`forward_over_reverse`):

- each decoder layer is checkpointed (non-reentrant): the forward keeps only every layer's input and its tangent,
  and backward recomputes one layer at a time, dual numbers included; recomputation is exact (the model is in eval
  mode: no dropout), so H z is unchanged, only the activations of one layer are alive at once;
- attention runs on SDPA's math kernel (``torch.nn.attention.sdpa_kernel``): the fused kernels (flash, memory
  efficient, CPU flash) have no forward-AD formula, the math kernel is composed of ops that do;
- SiLU (``silu_backward`` has no forward-AD formula in PyTorch) runs as :class:`_SiLU`: the same forward kernel,
  a backward written with differentiable ops (in float32 for half types, as the native kernel does).

Nothing is approximated: H z is the exact Hessian-vector product of the same loss, up to rounding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from esa.errors import EsaError


class _SiLU(torch.autograd.Function):
    """silu(x) = x σ(x), with silu'(x) = σ(x) (1 + x (1 − σ(x))) built from differentiable ops (forward-AD ready)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def _derivative(x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        s = torch.sigmoid(xf)
        return s * (1 + xf * (1 - s))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (grad * _SiLU._derivative(x)).to(x.dtype)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (tangent * _SiLU._derivative(x)).to(x.dtype)


class ForwardADSiLU(torch.nn.Module):
    """Drop-in for ``nn.SiLU`` / transformers' ``SiLUActivation`` inside a forward-over-reverse pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SiLU.apply(x)


def _is_silu(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (transformers' ``GradientCheckpointingLayer`` subclasses), outermost only."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no layer is checkpointed, H z is the same
        return []
    layers: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{outer}.")
                                                                       for outer, _ in layers):
            layers.append((name, module))
    return [module for _, module in layers]


@contextlib.contextmanager
def forward_over_reverse(model: torch.nn.Module) -> Iterator[None]:
    """Make ``model`` run forward-over-reverse (module docstring): SiLU swapped, decoder layers checkpointed,
    SDPA on its math kernel. Everything is restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    wrapped: list[torch.nn.Module] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_silu(child):
                    swapped.append((parent, name, child))
                    setattr(parent, name, ForwardADSiLU())
        for layer in _decoder_layers(model):
            layer.forward = _checkpointed(layer.forward)
            wrapped.append(layer)
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for layer in wrapped:
            del layer.forward
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def dual_parameters(model: torch.nn.Module, tangents: dict[str, tuple[torch.nn.Parameter, torch.Tensor]], *,
                    requires_grad: set[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within an open ``forward_ad.dual_level``: replace each parameter p of ``tangents`` (name → (p, z)) by the
    leaf dual tensor (p, z) (requiring grad if its name is in ``requires_grad``), wherever the model holds p (tied weights included), for the forward
    and the backward pass; yields name → dual leaf. The parameters are put back on exit."""
    duals = {name: fwAD.make_dual(p.detach(), z).requires_grad_(name in requires_grad)
             for name, (p, z) in tangents.items()}
    by_param = {id(p): duals[name] for name, (p, _) in tangents.items()}
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None and id(p) in by_param:
                    replaced.append((module, attr, p))
                    module._parameters[attr] = by_param[id(p)]
        yield duals
    finally:
        for module, attr, p in replaced:
            module._parameters[attr] = p


def hvp_pass(model: torch.nn.Module, loss: Callable[[], torch.Tensor],
             tangents: dict[str, tuple[torch.nn.Parameter, torch.Tensor]], wanted: set[str],
             fold: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """One forward-over-reverse pass: ``loss()`` with every parameter of ``tangents`` (name → (p, z)) the dual
    number (p, z), then one backward to the tensors named in ``wanted``; each one's ∇L and (H z) go to
    ``fold(name, grad, hz)`` as its gradient is accumulated, and are freed after. Run it inside
    :func:`forward_over_reverse` (else the model's fused kernels may lack forward AD, and memory is not bounded)."""
    with fwAD.dual_level(), dual_parameters(model, tangents, requires_grad=wanted) as duals:
        handles = []

        def make_hook(name: str):
            def hook(grad: torch.Tensor) -> None:  # the incoming gradient: accumulation would drop its tangent
                fold(name, *split_dual(grad))

            return hook

        def free(dual: torch.Tensor) -> None:
            dual.grad = None

        try:
            for name in wanted:
                handles.append(duals[name].register_hook(make_hook(name)))
                handles.append(duals[name].register_post_accumulate_grad_hook(free))
            loss().backward()
        except NotImplementedError as exc:
            raise hvp_unsupported(exc) from None
        finally:
            for h in handles:
                h.remove()


def split_dual(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇L, H z) of a gradient computed in a forward-over-reverse pass."""
    primal, tangent = fwAD.unpack_dual(grad)
    if tangent is None:  # L does not depend on this tensor's neighbourhood at second order: H z is zero here
        tangent = torch.zeros_like(primal)
    return primal, tangent


def hvp_unsupported(exc: BaseException) -> EsaError:
    """A one-line error for a model whose code uses an op without a forward-AD formula."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return EsaError(f"this model cannot run the forward-over-reverse Hessian-vector product of hutchinson_diag/obd "
                    f"({first}); use --metric grad_x_weight or taylor, or report the op")
