"""Hessian-vector products by forward-over-reverse: the tangent of the gradient, with no graph of the backward.

For a loss L(w) and a probe z, H z = d/dε ∇L(w + ε z) at ε = 0. Each scored parameter w_t is replaced, for one
forward and one backward pass, by the dual number (w_t, z_t) (``torch.autograd.forward_ad``): the forward pass
carries every activation's tangent along with it, and the ordinary backward pass — run on those dual activations —
returns gradients that are dual numbers too, primal ∇L and tangent H z. Nothing of the backward is kept for a
second backward (unlike double backward, which holds the first backward's whole graph).

Three things make the pass fit and work with Hugging Face's decoder code (:func:`forward_over_reverse`):

- decoder layers are swept one at a time (:class:`LayerSweep`): the forward keeps only each layer's input and its
  tangent, and the backward recomputes one layer at a time from it, dual numbers included, each layer in a dual
  level of its own; recomputation is exact (eval mode: no dropout), so H z is unchanged. Memory:
  weights + z + every layer's input and tangent + one layer's activations, tangents and backward transients;
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


def _dual_leaf(t: torch.Tensor) -> torch.Tensor:
    """A new leaf that requires grad, with the primal and tangent of ``t``."""
    primal, tangent = fwAD.unpack_dual(t)
    leaf = primal.detach() if tangent is None else fwAD.make_dual(primal.detach(), tangent.detach())
    return leaf.requires_grad_(True)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


class _FirstLayerInput(Exception):
    """Raised by the first layer on the embedding pass of :meth:`LayerSweep.backward`, with the layer's input."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("first layer reached")
        self.hidden = hidden


def _as_dual(primal: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
    return primal if tangent is None else fwAD.make_dual(primal, tangent)


class LayerSweep:
    """Layer-by-layer forward-over-reverse, so that one layer's activations (and their tangents) live at a time.

    Forward: every decoder layer runs without autograd (forward AD still carries the tangents) and its output
    becomes a new dual leaf; each layer's input is kept (primal and tangent: 2 H s bytes per token). The loss's
    backward then stops at the last layer's output. :meth:`backward` walks the layers from the last, each in a dual
    level of its own (autograd keeps the tangents made during a backward until their dual level ends): recompute
    the layer from its kept input with autograd on, back-propagate the (dual) gradient of its output, take the
    gradient of its input for the layer below. If the first layer's input depends on scored tensors (an embedding),
    the model is run again up to the first layer and the gradient goes on into that graph.
    (``torch.utils.checkpoint`` cannot do this: autograd keeps the tangent of every saved tensor outside the
    saved-tensor hooks, so a checkpointed forward would still hold every layer's tangents.)"""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.records: list[dict] = []
        self.to_first_layer = False

    def wrap(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.to_first_layer:
                raise _FirstLayerInput(hidden)
            with torch.no_grad():
                out = forward(*args, **kwargs)
            leaf = _dual_leaf(_first(out))
            primal, tangent = fwAD.unpack_dual(hidden)
            record = {"forward": forward, "args": args[1:], "kwargs": kwargs, "positional": bool(args),
                      "x": (primal.detach(), tangent), "attached": hidden.grad_fn is not None}
            leaf.register_hook(lambda grad: record.__setitem__("grad", split_dual(grad)))
            leaf.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
            self.records.append(record)
            return _with_first(out, leaf)

        return run

    def backward(self, in_level: Callable[[Callable[[], object]], object], loss: Callable[[], torch.Tensor]) -> None:
        """After the loss's own backward: back-propagate through the recorded layers, last first; ``in_level(f)``
        runs ``f`` in a fresh dual level with the parameters dual, ``loss`` reruns the forward pass."""
        try:
            grad = self.records[-1].get("grad") if self.records else None
            for record in reversed(self.records):
                if grad is None:
                    return
                grad = in_level(lambda: self._layer_backward(record, grad))
            if grad is not None and self.records[0]["attached"]:
                in_level(lambda: self._embedding_backward(loss, grad))
        finally:
            self.records.clear()

    @staticmethod
    def _layer_backward(record: dict, grad: tuple) -> tuple | None:
        x = _dual_leaf(_as_dual(*record["x"]))
        caught: dict = {}
        x.register_hook(lambda g: caught.__setitem__("grad", split_dual(g)))
        x.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
        args, kwargs = record["args"], record["kwargs"]
        args, kwargs = ((x, *args), kwargs) if record["positional"] else (args, {**kwargs, "hidden_states": x})
        with torch.enable_grad():
            out = _first(record["forward"](*args, **kwargs))
        out.backward(_as_dual(*grad))
        return caught.get("grad")

    def _embedding_backward(self, loss: Callable[[], torch.Tensor], grad: tuple) -> None:
        self.to_first_layer = True
        try:
            loss()
        except _FirstLayerInput as reached:
            reached.hidden.backward(_as_dual(*grad))
        finally:
            self.to_first_layer = False


def _no_tangent(ctx, *tangents):
    return torch.empty((0,))


@contextlib.contextmanager
def forward_over_reverse(model: torch.nn.Module) -> Iterator[LayerSweep]:
    """Make ``model`` run forward-over-reverse (module docstring): SiLU swapped, decoder layers swept one at a
    time (:class:`LayerSweep`, yielded: call its ``backward()`` after the loss's), SDPA on its math kernel, fused
    mixture-of-experts layers on transformers' per-expert loop (``grouped_mm`` has no forward-AD formula).
    Everything is restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils import checkpoint as ckpt

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    sweep = LayerSweep(_decoder_layers(model))
    # PyTorch < 2.12 saves a checkpoint's inputs with a Function that has no forward-AD rule (esa's chunked loss
    # checkpoints its head chunks): its output is an empty placeholder, so its tangent is one too.
    noop = getattr(ckpt, "_NoopSaveInputs", None)
    patched = noop is not None and "jvp" not in vars(noop)
    # transformers reads config._experts_implementation at every forward of a fused experts module
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "_experts_implementation", None) not in (None, "eager")}
    experts_kernels = {key: c._experts_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "eager"
        if patched:
            noop.jvp = staticmethod(_no_tangent)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_silu(child):
                    swapped.append((parent, name, child))
                    setattr(parent, name, ForwardADSiLU())
        for layer in sweep.layers:
            layer.forward = sweep.wrap(layer.forward)
        with sdpa_kernel(SDPBackend.MATH):
            yield sweep
    finally:
        sweep.records.clear()
        for layer in sweep.layers:
            vars(layer).pop("forward", None)
        for parent, name, child in swapped:
            setattr(parent, name, child)
        if patched:
            del noop.jvp
        for key, c in configs.items():
            c._experts_implementation = experts_kernels[key]


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


def hvp_pass(model: torch.nn.Module, sweep: LayerSweep, loss: Callable[[], torch.Tensor],
             tangents: dict[str, tuple[torch.nn.Parameter, torch.Tensor]], wanted: set[str],
             fold: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """One forward-over-reverse pass: ``loss()`` with every parameter of ``tangents`` (name → (p, z)) the dual
    number (p, z), then one backward to the tensors named in ``wanted``; each one's ∇L and (H z) go to
    ``fold(name, grad, hz)`` as its gradient arrives (a tensor may arrive in parts that sum to it: per decoder
    layer, or a tied embedding: fold linearly), and are freed after. ``sweep`` is what
    :func:`forward_over_reverse` yields; run the pass inside it."""

    def in_level(work: Callable[[], object]) -> object:
        with fwAD.dual_level(), dual_parameters(model, tangents, requires_grad=wanted) as duals:
            handles = []
            for name in wanted:
                handles.append(duals[name].register_hook(
                    lambda grad, name=name: fold(name, *split_dual(grad))))  # before accumulation drops the tangent
                handles.append(duals[name].register_post_accumulate_grad_hook(lambda d: setattr(d, "grad", None)))
            try:
                return work()
            finally:
                for h in handles:
                    h.remove()

    try:
        in_level(lambda: loss().backward())
        sweep.backward(in_level, loss)
    except NotImplementedError as exc:
        raise hvp_unsupported(exc) from None


def split_dual(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇L, H z) of a gradient computed in a forward-over-reverse pass."""
    primal, tangent = fwAD.unpack_dual(grad)
    primal = primal.detach()
    if tangent is None:  # L does not depend on this tensor's neighbourhood at second order: H z is zero here
        tangent = torch.zeros_like(primal)
    return primal, tangent


def hvp_unsupported(exc: BaseException) -> EsaError:
    """A one-line error for a model whose code uses an op without a forward-AD formula."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return EsaError(f"this model cannot run the forward-over-reverse Hessian-vector product of hutchinson_diag/obd "
                    f"({first}); use --metric grad_x_weight or taylor, or report the op")
