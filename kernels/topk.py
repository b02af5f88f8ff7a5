"""Exact top-k / bottom-k of huge fp32 score buffers, with deterministic ties, and the exact global merge.

Order. ``topk(score, k)`` returns the first k entries of the stable sort of the flat buffer by (-value, flat index);
``largest=False`` the first k of the stable sort by (value, flat index). Ties therefore go to the lower flat index.
-0.0 and +0.0 are the same value (returned as +0.0); a NaN anywhere is an error. Values come back as fp32 [k],
indices as int64 [k], both in that order.

Two implementations, identical index sets (ties included):

- ``topk_torch`` (reference, also the CPU path): walks the buffer in chunks of at most ``TORCH_CHUNK`` elements (so
  torch.topk never sees more than 2^30 elements). In a chunk, torch.topk gives the k-th value T; the candidates are
  all elements beyond T plus the *first* elements equal to T, found by counting in sub-blocks of ``TIE_BLOCK``
  (a chunk of ten million exact zeros never gets a nonzero() of its own size). Running candidates are merged chunk
  by chunk.
- ``topk_triton`` (streaming radix select, O(k + numel / BLOCK) extra memory): maps each fp32 to a 32-bit key whose
  unsigned order is the selection order, finds the k-th key T one 8-bit digit at a time (4 histogram passes over
  the elements that match the digits found so far), which also gives c_gt, the number of keys beyond T. A
  compaction pass then writes out all keys beyond T and the first (k - c_gt) keys equal to T in index order:
  per-block counts and their exclusive prefix sum give every block its write offset. When all keys equal to T are
  taken (the usual case with continuous scores) the counting pass is skipped and blocks reserve their output slots
  with one atomic add each. The k candidates are finally sorted in torch.

``merge_topk`` merges per-tensor candidate lists into the exact global top-k (see its docstring for why).
"""

from __future__ import annotations

import operator

import torch

from esa.kernels.dispatch import backend_for, cdiv, tl, triton

#: Largest chunk torch.topk sees in the reference (2^30 elements, 4 GiB of fp32).
TORCH_CHUNK = 1 << 30
#: Sub-block in which the reference counts and locates ties.
TIE_BLOCK = 1 << 22
#: Elements per program of the histogram passes and of the compaction passes.
HIST_BLOCK = 4096
SELECT_BLOCK = 2048
_RADIX_BITS = 8
_SHIFTS = (24, 16, 8, 0)


def _check(score: torch.Tensor, k: int) -> int:
    """Validate the arguments shared by both implementations; return k as an int."""
    if not isinstance(score, torch.Tensor) or score.dtype != torch.float32:
        raise ValueError(f"score must be a float32 tensor, got {getattr(score, 'dtype', type(score))}")
    k = operator.index(k)
    if not 0 <= k <= score.numel():
        raise ValueError(f"k={k} is outside [0, {score.numel()}] (the number of scores)")
    return k


def _flat(score: torch.Tensor) -> torch.Tensor:
    return score.reshape(-1) if score.is_contiguous() else score.contiguous().view(-1)


def _empty(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.int64, device=device)


def order_candidates(
    values: torch.Tensor, indices: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (value, unique index) pairs by value (descending if ``largest``), ties by index ascending; -0.0 -> +0.0."""
    values = values + 0.0  # -0.0 + 0.0 == +0.0 (round to nearest)
    by_index = torch.argsort(indices)
    values, indices = values[by_index], indices[by_index]
    by_value = torch.sort(values, descending=largest, stable=True).indices
    return values[by_value], indices[by_value]


# --------------------------------------------------------------------------------------------------------------------
# Torch reference


def _first_equal(chunk: torch.Tensor, value: torch.Tensor, count: int, tie_block: int) -> torch.Tensor:
    """Positions of the first ``count`` elements of ``chunk`` equal to ``value``, scanning sub-blocks in order."""
    found: list[torch.Tensor] = []
    for start in range(0, chunk.numel(), tie_block):
        if count == 0:
            break
        equal = chunk[start : start + tie_block] == value
        if int(equal.sum()) == 0:
            continue
        hits = equal.nonzero().squeeze(1)[:count] + start
        found.append(hits)
        count -= hits.numel()
    if count:
        raise AssertionError("fewer ties than the k-th value implies (score modified concurrently?)")
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64, device=chunk.device)


def _chunk_topk(
    chunk: torch.Tensor, k: int, largest: bool, tie_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (or bottom-k) of one chunk, ties to the lower position, ordered; positions are chunk-local."""
    if k == chunk.numel():
        return order_candidates(chunk, torch.arange(k, device=chunk.device), largest)
    kth_values = torch.topk(chunk, k, largest=largest, sorted=False).values
    threshold = kth_values.min() if largest else kth_values.max()
    beyond = (chunk > threshold) if largest else (chunk < threshold)
    strictly = beyond.nonzero().squeeze(1)  # fewer than k elements
    ties = _first_equal(chunk, threshold, k - strictly.numel(), tie_block)
    positions = torch.cat([strictly, ties])
    return order_candidates(chunk[positions], positions, largest)


def topk_torch(
    score: torch.Tensor,
    k: int,
    largest: bool = True,
    *,
    chunk_size: int = TORCH_CHUNK,
    tie_block: int = TIE_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference exact top-k: per-chunk exact candidates (same tie rule), merged chunk by chunk (module docstring)."""
    k = _check(score, k)
    if not 0 < chunk_size <= TORCH_CHUNK or tie_block <= 0:
        raise ValueError(f"chunk_size must be in [1, {TORCH_CHUNK}] and tie_block positive")
    flat = _flat(score)
    values, indices = _empty(flat.device)
    for start in range(0, flat.numel(), chunk_size):
        chunk = flat[start : start + chunk_size]
        if bool(torch.isnan(chunk).any()):
            raise ValueError("score contains NaN")
        if k == 0:
            continue
        chunk_values, positions = _chunk_topk(chunk, min(k, chunk.numel()), largest, tie_block)
        values, indices = order_candidates(
            torch.cat([values, chunk_values]), torch.cat([indices, positions + start]), largest
        )
        values, indices = values[:k], indices[:k]
    return values, indices


# --------------------------------------------------------------------------------------------------------------------
# Triton: radix select


@triton.jit
def _selection_keys(x, LARGEST: tl.constexpr):
    """fp32 -> int64 keys in [0, 2^32): the k wanted elements are those with the k largest keys.

    -0.0 becomes +0.0; negative floats get their magnitude bits inverted so that signed int32 order is float order;
    bottom-k inverts all bits; adding 2^31 makes the key non-negative (unsigned order = signed order).
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) == 0, 0, bits)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if not LARGEST:
        key = ~key
    return key.to(tl.int64) + 2147483648


@triton.jit
def _radix_histogram_kernel(
    score_ptr,
    hist_ptr,
    nan_ptr,
    n,
    prefix,
    SHIFT: tl.constexpr,
    LARGEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """hist[d] += #{i : key_i >> (SHIFT + 8) == prefix and digit (key_i >> SHIFT) & 255 == d}; first pass counts NaN."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(score_ptr + offs, mask=mask, other=0.0)
    key = _selection_keys(x, LARGEST)
    if SHIFT == 24:
        nans = tl.sum((mask & (x != x)).to(tl.int32)).to(tl.int64)
        tl.atomic_add(nan_ptr, nans, mask=nans > 0)
        selected = mask
    else:
        selected = mask & ((key >> (SHIFT + 8)) == prefix)
    digit = ((key >> SHIFT) & 255).to(tl.int32)
    hist = tl.histogram(digit, 256, mask=selected)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), hist.to(tl.int64), mask=hist > 0)


@triton.jit
def _count_beyond_and_ties_kernel(
    score_ptr, counts_ptr, n, num_blocks, threshold, LARGEST: tl.constexpr, BLOCK: tl.constexpr
):
    """counts[0, b] = #keys > threshold, counts[1, b] = #keys == threshold in block b (keys shifted by -2^31)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = _selection_keys(tl.load(score_ptr + offs, mask=mask, other=0.0), LARGEST) - 2147483648
    tl.store(counts_ptr + pid, tl.sum((mask & (key > threshold)).to(tl.int32)))
    tl.store(counts_ptr + num_blocks + pid, tl.sum((mask & (key == threshold)).to(tl.int32)))


@triton.jit
def _compact_ordered_kernel(
    score_ptr,
    out_ptr,
    offsets_ptr,
    n,
    num_blocks,
    threshold,
    num_beyond,
    num_ties,
    LARGEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write the flat index of every key beyond the threshold, and of the first num_ties keys equal to it.

    offsets[0, b] / offsets[1, b] are the exclusive prefix sums over blocks of the two counts; inside a block an
    element's rank is the exclusive cumulative sum of its flag, so the ties kept are the lowest indices.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = _selection_keys(tl.load(score_ptr + offs, mask=mask, other=0.0), LARGEST) - 2147483648
    beyond = (mask & (key > threshold)).to(tl.int32)
    slot = tl.load(offsets_ptr + pid) + (tl.cumsum(beyond, 0) - beyond)
    tl.store(out_ptr + slot, offs, mask=beyond != 0)
    tie = (mask & (key == threshold)).to(tl.int32)
    rank = tl.load(offsets_ptr + num_blocks + pid) + (tl.cumsum(tie, 0) - tie)
    tl.store(out_ptr + num_beyond + rank, offs, mask=(tie != 0) & (rank < num_ties))


@triton.jit
def _compact_all_kernel(score_ptr, out_ptr, counter_ptr, n, threshold, LARGEST: tl.constexpr, BLOCK: tl.constexpr):
    """Write the flat index of every key >= threshold; each block reserves its slots with one atomic add.

    The order of the output depends on scheduling; the caller sorts it, so the result does not.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = _selection_keys(tl.load(score_ptr + offs, mask=mask, other=0.0), LARGEST) - 2147483648
    keep = (mask & (key >= threshold)).to(tl.int32)
    count = tl.sum(keep).to(tl.int64)
    base = tl.atomic_add(counter_ptr, count, mask=count > 0)
    tl.store(out_ptr + base + (tl.cumsum(keep, 0) - keep), offs, mask=keep != 0)


def _digit_of_kth(hist: list[int], k: int) -> tuple[int, int]:
    """Walking bins from the top: the bin holding the k-th largest key, and how many keys lie in higher bins."""
    above = 0
    for digit in range(len(hist) - 1, -1, -1):
        if above + hist[digit] >= k:
            return digit, above
        above += hist[digit]
    raise AssertionError("histogram holds fewer than k keys (score modified concurrently?)")


def _radix_select(flat: torch.Tensor, k: int, largest: bool) -> tuple[int, int, int, int]:
    """Find the k-th largest selection key T (4 histogram passes, one 8-bit digit each; the first also counts NaN).

    Returns (T, #keys beyond T, #keys equal to T, #ties to take = k - #keys beyond T). With k = 0 only the NaN
    check runs and zeros are returned.
    """
    n = flat.numel()
    hist = torch.zeros(len(_SHIFTS), 256, dtype=torch.int64, device=flat.device)
    nans = torch.zeros(1, dtype=torch.int64, device=flat.device)
    prefix, beyond, remaining, equal = 0, 0, k, 0
    for p, shift in enumerate(_SHIFTS):
        _radix_histogram_kernel[(cdiv(n, HIST_BLOCK),)](
            flat, hist[p], nans, n, prefix, SHIFT=shift, LARGEST=largest, BLOCK=HIST_BLOCK, num_warps=8
        )
        if p == 0:
            if int(nans.item()):
                raise ValueError("score contains NaN")
            if k == 0:
                return 0, 0, 0, 0
        counts = hist[p].tolist()
        digit, above = _digit_of_kth(counts, remaining)
        beyond += above
        remaining -= above
        equal = counts[digit]
        prefix = (prefix << _RADIX_BITS) | digit
    return prefix, beyond, equal, remaining


def topk_triton(score: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming exact top-k by radix select (module docstring); same result as :func:`topk_torch`."""
    k = _check(score, k)
    flat = _flat(score)
    n = flat.numel()
    if n == 0:
        return _empty(flat.device)
    threshold, num_beyond, num_equal, num_ties = _radix_select(flat, k, largest)
    if k == 0:
        return _empty(flat.device)
    signed_threshold = threshold - (1 << 31)  # fits int32, the kernels compare keys shifted the same way
    out = torch.empty(k, dtype=torch.int64, device=flat.device)
    num_blocks = cdiv(n, SELECT_BLOCK)
    if num_ties == num_equal:
        counter = torch.zeros(1, dtype=torch.int64, device=flat.device)
        _compact_all_kernel[(num_blocks,)](
            flat, out, counter, n, signed_threshold, LARGEST=largest, BLOCK=SELECT_BLOCK, num_warps=8
        )
    else:
        counts = torch.empty(2, num_blocks, dtype=torch.int32, device=flat.device)
        _count_beyond_and_ties_kernel[(num_blocks,)](
            flat, counts, n, num_blocks, signed_threshold, LARGEST=largest, BLOCK=SELECT_BLOCK, num_warps=8
        )
        offsets = torch.cumsum(counts, dim=1, dtype=torch.int64) - counts
        _compact_ordered_kernel[(num_blocks,)](
            flat, out, offsets, n, num_blocks, signed_threshold, num_beyond, num_ties,
            LARGEST=largest, BLOCK=SELECT_BLOCK, num_warps=8,
        )  # fmt: skip
    return order_candidates(flat[out], out, largest)


# --------------------------------------------------------------------------------------------------------------------
# Public entry points


def topk(score: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (``largest=False``: bottom-k) of a float32 buffer of any shape, ties to the lower flat index.

    Returns (values fp32 [k], flat indices int64 [k]) ordered by value, then index. Raises ValueError when k is not
    in [0, numel] or the scores contain NaN.
    """
    impl = topk_triton if backend_for(score) == "triton" else topk_torch
    return impl(score, k, largest)


def merge_topk(
    candidates: list[tuple[torch.Tensor, torch.Tensor]], k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact global top-k over several tensors from their per-tensor candidates.

    ``candidates[p] = (values, flat_indices)`` is the top-min(k, numel) of tensor p (model order), e.g. from
    :func:`topk`. Returns (tensor position int64, values fp32, flat indices int64), each [k], ordered by value
    (descending if ``largest``), then tensor position, then flat index.

    Why this is exact: order all elements of all tensors by the total order (value, position, index). If an element
    is among the global first k, fewer than k elements precede it globally, so fewer than k of its own tensor do;
    within one tensor the position is constant, so that is the per-tensor order (value, index), and the element is
    in its tensor's top-k. The global top-k is therefore a subset of the union of candidates, and sorting the union
    by the same total order and keeping k gives it exactly. The candidates are small, so plain torch does it, on the
    device of the first list.
    """
    k = operator.index(k)
    total = sum(int(v.numel()) for v, _ in candidates)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} is outside [0, {total}] (the number of candidates)")
    if not candidates:
        empty_values, empty_indices = _empty(torch.device("cpu"))
        return empty_indices, empty_values, empty_indices.clone()
    device = candidates[0][0].device
    values = torch.cat([v.to(device=device, dtype=torch.float32).reshape(-1) for v, _ in candidates]) + 0.0
    indices = torch.cat([i.to(device=device, dtype=torch.int64).reshape(-1) for _, i in candidates])
    positions = torch.cat(
        [torch.full((v.numel(),), p, dtype=torch.int64, device=device) for p, (v, _) in enumerate(candidates)]
    )
    if values.numel() != indices.numel():
        raise ValueError("each candidate list needs as many values as indices")
    if bool(torch.isnan(values).any()):
        raise ValueError("score contains NaN")
    order = torch.argsort(indices, stable=True)
    order = order[torch.argsort(positions[order], stable=True)]
    order = order[torch.sort(values[order], descending=largest, stable=True).indices][:k]
    return positions[order], values[order], indices[order]
