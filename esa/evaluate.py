"""Perplexity, loss and next-token accuracy of a causal LM on token windows, with the NLL of every window kept.

For a window of ids x_0..x_{L−1}: NLL = −Σ_{t=0}^{L−2} log p(x_{t+1} | x_0..x_t), with the log-softmax of
``logits[t]`` computed in float32 (float64 for a float64 model) whatever the model's dtype. Over all windows:

    mean NLL = Σ_w NLL_w / Σ_w (L − 1),   PPL = exp(mean NLL),
    accuracy = #{t : argmax logits[t] = x_{t+1}} / Σ_w (L − 1).

Windows have no padding and need no attention mask; each is an independent sequence starting at position 0.
This equals the loss a Hugging Face model returns for ``labels=input_ids`` (mean over shifted tokens), per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from esa.errors import EsaError
from esa.progress import progress_bar

LEAK_PPL = 1.5
LEAK_ACCURACY = 0.95


@dataclass
class EvalResult:
    nll: np.ndarray  # float64 [n_windows]: summed NLL of each window (nats)
    tokens: np.ndarray  # int64 [n_windows]: predicted tokens per window
    correct: np.ndarray  # int64 [n_windows]: top-1 hits per window

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())

    @property
    def ppl(self) -> float:
        mean = self.mean_nll
        return math.exp(mean) if mean < 700 else math.inf

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.tokens.sum())

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.nll).all())

    def summary(self) -> dict:
        return {"ppl": self.ppl, "mean_nll": self.mean_nll, "accuracy": self.accuracy, "tokens": self.total_tokens,
                "n_windows": int(self.nll.size)}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
             description: str = "evaluating") -> EvalResult:
    """Score every window of ``input_ids`` [n, L]; see the module docstring for the definitions."""
    if batch_size < 1:
        raise EsaError(f"--batch-size must be at least 1 (got {batch_size})")
    device = model_device(model)
    n = input_ids.shape[0]
    nll = np.zeros(n, dtype=np.float64)
    correct = np.zeros(n, dtype=np.int64)
    tokens = np.full(n, input_ids.shape[1] - 1, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(description, total=n) as bar:
            for start in range(0, n, batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                for i in range(batch.shape[0]):  # one window at a time bounds the fp32 copy of the logits
                    lg = logits[i, :-1]
                    lg = lg if lg.dtype == torch.float64 else lg.float()
                    target = batch[i, 1:]
                    token_nll = F.cross_entropy(lg, target, reduction="none")
                    nll[start + i] = token_nll.double().sum().item()
                    correct[start + i] = int((lg.argmax(dim=-1) == target).sum().item())
                del logits
                bar.advance(batch.shape[0])
    finally:
        model.train(was_training)
    return EvalResult(nll=nll, tokens=tokens, correct=correct)


def require_finite(result: EvalResult) -> None:
    if not result.finite:
        bad = int((~np.isfinite(result.nll)).sum())
        raise EsaError(f"the loss is NaN or infinite on {bad} of {result.nll.size} windows: the weights or the dtype "
                       "are broken (try --dtype float32)")


def leak_warnings(result: EvalResult, input_ids: torch.Tensor | None = None) -> list[str]:
    """Signs that an evaluation is not measuring next-token prediction on unseen natural text.

    PPL ≈ 1.03 / accuracy ≈ 99% (what some runbooks report for Llama-3.1-8B) means ~0.03 nats per token: the
    signature of a broken causal mask, padding counted as targets, or repeated text — not of a good model.
    """
    warnings = []
    if result.ppl < LEAK_PPL:
        warnings.append(f"PPL {result.ppl:.3f} < {LEAK_PPL}: implausibly low for natural text (label leakage, "
                        "a broken causal mask, or repeated text?)")
    if result.accuracy > LEAK_ACCURACY:
        warnings.append(f"next-token accuracy {result.accuracy:.3f} > {LEAK_ACCURACY}: implausibly high for natural "
                        "text (label leakage, a broken causal mask, or repeated text?)")
    if input_ids is not None and input_ids.shape[0] > 1:
        distinct = torch.unique(input_ids, dim=0).shape[0]
        if distinct < input_ids.shape[0]:
            warnings.append(f"{input_ids.shape[0] - distinct} evaluation windows are exact duplicates of others "
                            "(repeated text inflates accuracy)")
    return warnings
