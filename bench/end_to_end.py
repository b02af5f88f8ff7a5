"""End-to-end overheads, as ratios measured in one run on the same model and data.

- profile overhead = time(score one metric over the windows: forward, backward, fused fold of every gradient
  into its fp32 score) / time(plain forward + backward over the same windows, gradients of every weight kept);
- perturb trial overhead = time(apply + restore of a top-k set, with and without the restore fingerprint check)
  / time(one evaluation of the windows).

Default model: the embedded tiny model (``--model`` for any other, e.g. a Llama-3-8B directory on a GPU).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Context


def timed_ms(fn, cuda: bool, repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls after one warm-up call (synchronised on CUDA)."""
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _time(fn, ctx: Context, repeats: int) -> float:
    return timed_ms(fn, ctx.cuda, repeats)


def plain_forward_backward(model: torch.nn.Module, params: list[torch.Tensor], ids: torch.Tensor, batch: int,
                           device: torch.device) -> None:
    """Forward + backward over the windows with every gradient kept, as a trainer would (then dropped)."""
    from esa.scoring import batch_loss

    for p in params:
        p.requires_grad_(True)
    try:
        for i in range(0, ids.shape[0], batch):
            batch_loss(model, ids[i : i + batch].to(device)).backward()
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


def run(ctx: Context, sizes: str | None, model_id: str | None = None) -> list[dict]:
    from esa.config import DataConfig, ModelConfig
    from esa.evaluate import evaluate
    from esa.perturbation import PerturbSpec, perturbed
    from esa.progress import quiet
    from esa.scoring import compute_scores
    from esa.selection import select_extreme
    from esa.session import open_session
    from esa.tensors import select_tensors

    seq_len = 128 if ctx.quick else 2048
    windows, batch = (4, 2) if ctx.quick else (16, 4)
    session = open_session(ModelConfig(model=model_id, device=str(ctx.device)),
                           DataConfig(seq_len=None if model_id is None else seq_len, max_samples=windows,
                                      batch_size=batch))
    model, ids = session.loaded.model, session.windows.input_ids
    tensors = select_tensors(model)
    params = [p for _, p in tensors]
    repeats = max(1, ctx.repeats // 2)

    rows = []
    with quiet():
        t_fb = _time(lambda: plain_forward_backward(model, params, ids, batch, ctx.device), ctx, repeats)
        for metric in ("grad_x_weight", "grad_squared"):
            t = _time(lambda: compute_scores(model, tensors, ids, metric, batch_size=batch), ctx, repeats)
            rows.append({"measure": f"profile {metric}", "ms": t, "reference": "forward+backward", "reference_ms": t_fb,
                         "ratio": t / t_fb})
        scores = compute_scores(model, tensors, ids, "grad_x_weight", batch_size=batch)
        t_eval = _time(lambda: evaluate(model, ids, batch_size=batch), ctx, repeats)
        named = dict(model.named_parameters())
        for k in (1_000, 100_000):
            ws = select_extreme(scores, k, "global")
            for verify in (False, True):
                def trial():
                    with perturbed(named, ws, PerturbSpec("gauss_noise", scale=0.1), 0, verify=verify):
                        pass

                t = _time(trial, ctx, repeats)
                rows.append({"measure": f"apply+restore k={len(ws)}" + (" +verify" if verify else ""), "ms": t,
                             "reference": "one evaluation", "reference_ms": t_eval, "ratio": t / t_eval})
    return rows
