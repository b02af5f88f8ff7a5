"""esa.kernels: the tensor-level leaves of esa (they know tensors, not models).

Every op has a Triton kernel (``<op>_triton``) next to its plain-torch reference (``<op>_torch``); the public
function picks one with :func:`backend_for` (environment variable ``ESA_KERNELS``: auto / triton / torch).

- :mod:`~esa.kernels.accumulate`: fused in-place fp32 score accumulation (``accumulate_``).
- :mod:`~esa.kernels.topk`: exact streaming top-k / bottom-k with deterministic ties, exact global merge.
- :mod:`~esa.kernels.perturb`: in-place perturbations of selected elements with bit-exact restore.
- :mod:`~esa.kernels.rng`: counter-based random numbers, identical on every device.
- :mod:`~esa.kernels.blockscan`: one read of a score buffer on a GPU (per-block extrema, zero and non-finite
  counts, float64 power sums; ``block_scan`` / ``block_scan_torch``).
- :mod:`~esa.kernels.moments`: float64 power sums of a CPU buffer (torch reference, and one compiled loop with the
  block extrema for large buffers).
"""

from esa.kernels.accumulate import OPS, accumulate_, accumulate_torch, accumulate_triton
from esa.kernels.dispatch import backend_for, force_backend, kernel_backend_summary
from esa.kernels.perturb import (
    KINDS,
    apply_perturbation_,
    apply_perturbation_torch,
    apply_perturbation_triton,
    bit_flip_masks,
    bit_layout,
    gaussian_noise,
    restore_,
    restore_torch,
    restore_triton,
)
from esa.kernels.rng import hash32, normal, stream_id, uniform
from esa.kernels.topk import merge_topk, topk, topk_torch, topk_triton

__all__ = [
    "KINDS",
    "OPS",
    "accumulate_",
    "accumulate_torch",
    "accumulate_triton",
    "apply_perturbation_",
    "apply_perturbation_torch",
    "apply_perturbation_triton",
    "backend_for",
    "bit_flip_masks",
    "bit_layout",
    "force_backend",
    "gaussian_noise",
    "hash32",
    "kernel_backend_summary",
    "merge_topk",
    "normal",
    "restore_",
    "restore_torch",
    "restore_triton",
    "stream_id",
    "topk",
    "topk_torch",
    "topk_triton",
    "uniform",
]
