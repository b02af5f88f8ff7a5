"""Perplexity, loss and next-token accuracy of a causal LM on token windows, with the NLL of every window kept.

For a window of ids x_0..x_{L−1}: NLL = −Σ_{t=0}^{L−2} log p(x_{t+1} | x_0..x_t), with the log-softmax of
``logits[t]`` computed in float32 (float64 for a float64 model) whatever the model's dtype. Over all windows:

    mean NLL = Σ_w NLL_w / Σ_w (L − 1),   PPL = exp(mean NLL),
    accuracy = #{t : argmax logits[t] = x_{t+1}} / Σ_w (L − 1).

Windows have no padding and need no attention mask; each is an independent sequence starting at position 0.
This equals the loss a Hugging Face model returns for ``labels=input_ids`` (mean over shifted tokens), per window.

Chunked loss: a 128k-vocabulary model would need 4·128k bytes of float32 logits per token for a whole batch. Where
the output head is a plain ``nn.Linear`` applied to the base model's final (normed) hidden states — Llama, Mistral,
Phi-3, GPT-NeoX, Mixtral and the embedded model, tied embeddings included — :func:`window_nll` runs the base model
once and the head over chunks of at most ``chunk_tokens`` tokens (about :data:`LOGIT_CHUNK_BYTES` of float32 logits).
With gradients on, each chunk is recomputed in the backward pass (non-reentrant checkpointing, which also supports
the double backward of the second-order metrics), so no chunk's logits outlive it. Architectures whose head does
more than a Linear (logit soft-capping, logit scaling, a non-Linear head) fall back to the model's own logits;
:func:`loss_path` says which path a model takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from esa import distributed
from esa.errors import EsaError
from esa.progress import progress_bar

LEAK_PPL = 1.5
LEAK_ACCURACY = 0.95
LOGIT_CHUNK_BYTES = 1 << 28  # float32 logits of one chunk of tokens: 256 MiB (512 tokens of a 128k vocabulary)
# Config attributes of architectures whose logits are not head(hidden): the chunked path would be wrong for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping")


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
    """Where token ids go: the input embedding's device (the first device of a model split with a device map)."""
    from esa.placement import input_device

    return input_device(model)


def chunk_tokens_for(vocab_size: int, budget_bytes: int = LOGIT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits stay within ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(1, vocab_size)))


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(base model returning final hidden states, Linear output head), or None where the chunked path is not exact."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORMS):
        return None
    return base, head


def loss_path(model: torch.nn.Module) -> str:
    """``chunked`` (final hidden states through the head in token chunks) or ``full_logits`` (the model's own)."""
    return "chunked" if output_head(model) is not None else "full_logits"


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_nll(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_float_logits(head(hidden)), targets, reduction="none")


def window_nll(model: torch.nn.Module, batch: torch.Tensor, *, with_correct: bool = False,
               chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed next-token NLL of each window of ``batch`` [B, L] (float64 [B], differentiable when grad is on) and,
    with ``with_correct``, its top-1 hits (int64 [B]). See the module docstring for the chunked path."""
    n_windows, length = batch.shape
    parts = output_head(model)
    if parts is None:
        logits = model(input_ids=batch, use_cache=False).logits
        batch = batch.to(logits.device)  # a split model's logits are on its last device
        correct = torch.zeros(n_windows, dtype=torch.int64, device=batch.device) if with_correct else None
        per_window = []
        for i in range(n_windows):  # one window at a time bounds the fp32 copy of the logits
            lg = _float_logits(logits[i, :-1])
            per_window.append(F.cross_entropy(lg, batch[i, 1:], reduction="none").double().sum())
            if correct is not None:
                correct[i] = (lg.argmax(dim=-1) == batch[i, 1:]).sum()
        return torch.stack(per_window), correct
    base, head = parts
    hidden = base(input_ids=batch, use_cache=False)[0][:, :-1].reshape(-1, head.in_features)
    # The loss is computed on the output head's device (the last one of a split model); the ids come along.
    from esa.placement import module_device

    on = module_device(head)
    hidden, targets = hidden.to(on), batch[:, 1:].reshape(-1).to(on)
    correct = torch.zeros(n_windows, dtype=torch.int64, device=on) if with_correct else None
    window_of = torch.arange(n_windows, device=on).repeat_interleave(length - 1)
    sums = torch.zeros(n_windows, dtype=torch.float64, device=on)
    step = chunk_tokens or chunk_tokens_for(head.out_features)
    # With several chunks, each is recomputed in backward so that no chunk's logits wait for it; a single chunk is
    # within the budget anyway, and recomputing it would only cost time.
    recompute = torch.is_grad_enabled() and targets.numel() > step
    for s in range(0, targets.numel(), step):
        h, t = hidden[s : s + step], targets[s : s + step]
        if recompute:
            token_nll = checkpoint(_chunk_nll, head, h, t, use_reentrant=False)
        else:
            logits = _float_logits(head(h))
            token_nll = F.cross_entropy(logits, t, reduction="none")
            if correct is not None:
                correct.index_add_(0, window_of[s : s + step], (logits.argmax(dim=-1) == t).long())
            del logits
        sums = sums.index_add(0, window_of[s : s + step], token_nll.double())
    return sums, correct


def mean_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the batch (float32): the Hugging Face loss for ``labels=input_ids``, chunked."""
    sums, _ = window_nll(model, batch)
    return (sums.sum() / (batch.shape[0] * (batch.shape[1] - 1))).float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
             description: str = "evaluating") -> EvalResult:
    """Score every window of ``input_ids`` [n, L]; see the module docstring for the definitions.

    Under torchrun each rank evaluates its block of batches and every rank gets every window's result
    (:mod:`esa.distributed`)."""
    if batch_size < 1:
        raise EsaError(f"--batch-size must be at least 1 (got {batch_size})")
    device = model_device(model)
    n = input_ids.shape[0]
    # Under torchrun this process evaluates its block of whole batches; the blocks are gathered in order.
    mine = distributed.shard(-(-n // batch_size))
    first, last = min(mine.start * batch_size, n), min(mine.stop * batch_size, n)
    nll = np.zeros(last - first, dtype=np.float64)
    correct = np.zeros(last - first, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(description, total=last - first) as bar:
            for start in range(first, last, batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                sums, hits = window_nll(model, batch, with_correct=True)
                nll[start - first : start - first + batch.shape[0]] = sums.cpu().numpy()
                correct[start - first : start - first + batch.shape[0]] = hits.cpu().numpy()
                bar.advance(batch.shape[0])
    finally:
        model.train(was_training)
    every = distributed.gather_blocks({"nll": nll, "correct": correct})
    tokens = np.full(n, input_ids.shape[1] - 1, dtype=np.int64)
    return EvalResult(nll=every["nll"], tokens=tokens, correct=every["correct"])


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
