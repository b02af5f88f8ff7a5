"""Token windows for evaluation: tokenize once, cut non-overlapping windows, drop the tail, pick a seeded subset.

This is the standard protocol (SparseGPT / Wanda / Super Weight): the whole text is tokenized in one call (so a
tokenizer that adds BOS adds it once, at the very start), cut into ``seq_len``-token windows, and every window is
scored on its ``seq_len − 1`` next-token predictions. ``max_samples`` windows are drawn without replacement with
``torch.randperm`` seeded by ``seed`` and kept in corpus order; which windows were used is recorded.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import torch

from esa.config import DataConfig, validate_data
from esa.errors import EsaError



@dataclass
class Windows:
    input_ids: torch.Tensor  # [n, seq_len] int64, CPU
    window_index: list[int]  # position of each window among all windows of the corpus
    seq_len: int
    n_available: int
    corpus_tokens: int
    seed: int

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def token_sha256(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def subset(self, positions: list[int]) -> "Windows":
        """The windows at ``positions`` (indices into this set), e.g. a stability-check subsample."""
        return Windows(self.input_ids[positions], [self.window_index[p] for p in positions], self.seq_len,
                       self.n_available, self.corpus_tokens, self.seed)

    def describe(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "n_windows": self.n,
            "n_available": self.n_available,
            "corpus_tokens": self.corpus_tokens,
            "predicted_tokens": self.n * (self.seq_len - 1),
            "seed": self.seed,
            "window_index": self.window_index,
            "token_ids_sha256": self.token_sha256(),
        }


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids (special tokens as the tokenizer adds them)."""
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def seeded_subset(n_available: int, n: int, seed: int) -> list[int]:
    """``n`` of ``range(n_available)`` drawn without replacement by a seeded permutation, in increasing order."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_available, generator=g)[:n].tolist())


def stability_subset_size(n_windows: int, fraction: float) -> int:
    """Windows each stability seed scores on: round(fraction · n), at least 1. Equal to n means every seed sees
    the same windows, so their top-k sets agree trivially."""
    return max(1, int(round(fraction * n_windows)))


def make_windows(
    token_ids: torch.Tensor,
    seq_len: int,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    max_positions: int | None = None,
) -> Windows:
    validate_data(DataConfig(seq_len=seq_len, max_samples=max_samples))  # the flags' one check (callers in Python)
    if max_positions is not None and seq_len > max_positions:
        raise EsaError(f"--seq-len {seq_len} exceeds the model's context of {max_positions} tokens; lower --seq-len")
    n_tokens = int(token_ids.numel())
    n_available = n_tokens // seq_len
    if n_available == 0:
        raise EsaError(f"--seq-len {seq_len} is larger than the text ({n_tokens} tokens); lower --seq-len or use more text")
    all_windows = token_ids[: n_available * seq_len].view(n_available, seq_len)
    if max_samples is None or max_samples >= n_available:
        chosen = list(range(n_available))
    else:
        chosen = seeded_subset(n_available, max_samples, seed)
    return Windows(all_windows[chosen].clone(), chosen, seq_len, n_available, n_tokens, seed)
