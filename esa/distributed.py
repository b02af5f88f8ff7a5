"""Data parallelism under ``torchrun``: N processes, each holding the whole model, share the evaluation windows.

Launch: ``torchrun --standalone --nproc-per-node N -m esa <baseline|profile|perturb|run> ...``. torchrun sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`launch` reads them, starts the process group with
``torch.distributed`` (gloo for CPU tensors, plus NCCL for CUDA tensors when a GPU is visible, each rank on
``cuda:LOCAL_RANK``) and destroys it at exit. Without those variables (or with ``WORLD_SIZE=1``) nothing is
started and every helper below is the identity: one process is the N = 1 case of the same protocol.

Protocol (what makes an N-process run equal the 1-process run):

- Batches, never windows, are sharded. The windows are cut into batches of ``--batch-size`` exactly as with one
  process (batch b holds windows b·B .. b·B + B − 1), and rank r of N takes the contiguous block of batches
  ``[⌊r·n_b/N⌋, ⌊(r+1)·n_b/N⌋)`` (:func:`shard`). Every batch keeps its global index b, so whatever is keyed by it
  (Hutchinson probes ``rademacher_like(p, seed, name, b, i)``, the weight n_b/N of a batch's mean loss) is the
  same whatever N is, and every per-batch loss is computed on the same windows.
- Scores are sums over batches: each rank sums its own batches into its score buffers, then the buffers are
  summed over ranks with ``all_reduce``, one tensor at a time and in place (no buffer beyond the plan's). Only
  the order of the float32 additions changes, so scores agree to float tolerance.
- Per-window results (NLL, hits) are gathered with ``all_gather_object`` and concatenated in rank order, which is
  the global window order since the blocks are contiguous: every rank then holds every window's NLL, bit for bit
  the 1-process values (each window is evaluated in the same batch as with one process).
- Every rank takes every decision (selection, weight sets, perturbations: all deterministic), so the weights are
  perturbed and restored identically everywhere; only rank 0 writes files (:mod:`esa.runio`). Ranks wait for
  each other (:func:`barrier`) once a run directory has been checked and once its files are written, so that no
  rank reads a file while rank 0 replaces it.
- A rank that fails exits with its error (``error: rank R/N: ...``); torchrun then stops the other ranks.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from esa.errors import EsaError

SUPPORTED_COMMANDS = ("baseline", "profile", "perturb", "run")
_state: dict[str, Any] = {"active": False, "backend": None}


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    return _state["active"]


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints results."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE), 1 outside a multi-process run."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if active() else 1


def rank_label() -> str:
    """``"rank R/N: "`` in a multi-process run (to prefix error lines), else empty."""
    return f"rank {rank()}/{world_size()}: " if active() else ""


def backend_for_this_machine() -> str:
    """gloo, and NCCL for CUDA tensors when a GPU is visible (tensors on either device then work)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> None:
    """Start the process group that torchrun's environment describes; a no-op without one."""
    if active() or not launched_by_torchrun():
        return
    backend = backend_for_this_machine()
    if torch.cuda.is_available():
        lr = int(os.environ["LOCAL_RANK"])
        if lr >= torch.cuda.device_count():
            raise EsaError(f"LOCAL_RANK {lr} but only {torch.cuda.device_count()} GPU(s) are visible; lower "
                           "--nproc-per-node")
        torch.cuda.set_device(lr)  # --device auto / cuda then means cuda:LOCAL_RANK
    torch.distributed.init_process_group(backend=backend)
    _state.update(active=True, backend=backend)


def shutdown() -> None:
    if active():
        _state.update(active=False, backend=None)
        torch.distributed.destroy_process_group()


def describe() -> dict:
    """For the manifest: how many processes produced the run."""
    return {"world_size": world_size(), "backend": _state["backend"]} if active() else {"world_size": 1}


def check_command(argv: Sequence[str]) -> None:
    """Refuse, under torchrun, the commands that are not data parallel (the first non-option word of argv)."""
    if not active():
        return
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in SUPPORTED_COMMANDS:
        raise EsaError(f"esa {command} is not supported under torchrun; run it as one process (torchrun runs "
                       f"{', '.join(SUPPORTED_COMMANDS)})")


# ----------------------------------------------------------------------------------------------- the protocol
def shard(n_batches: int) -> range:
    """The global indices of the batches this rank evaluates: a contiguous block (see the module docstring)."""
    n, r = world_size(), rank()
    return range(r * n_batches // n, (r + 1) * n_batches // n)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (one tensor: the caller loops over score buffers)."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_blocks(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each rank's arrays (its block of windows) concatenated in rank order: every window, in global order."""
    if not active():
        return part
    parts: list[dict[str, np.ndarray] | None] = [None] * world_size()
    torch.distributed.all_gather_object(parts, part)
    return {k: np.concatenate([p[k] for p in parts]) for k in part}


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a decision that depends on files rank 0 alone may have changed)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a rank gets when another rank died in the middle of a collective."""
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("Connection closed by peer", "Gloo",
                                                                       "NCCL", "Connection reset")))
