"""Top-k / bottom-k / random-k selection against a full sort of all scores, ties included."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.errors import EsaError
from esa.scoring import ScoreSet
from esa.scorescan import BLOCK, BLOCK_SELECT_SHARE, block_select, scan
from esa.selection import (BLOCK_SELECT_MIN_NUMEL, jaccard, overlap_at_k, select_extreme, select_random,
                           tensor_candidates)
from esa.tensors import TensorInfo


def make_scores(arrays: list[np.ndarray]) -> ScoreSet:
    infos, scores = [], {}
    for i, a in enumerate(arrays):
        name = f"layers.{i}.mlp.down_proj.weight"
        infos.append(TensorInfo(name, tuple(a.shape), i, "mlp.down", "weight"))
        scores[name] = torch.tensor(a, dtype=torch.float32)
    return ScoreSet("grad_x_weight", infos, scores, 1)


def full_sort(arrays, largest):
    """Reference: every (score, tensor position, flat index) sorted by score, then position, then index."""
    entries = [(float(v), t, i) for t, a in enumerate(arrays) for i, v in enumerate(a.astype(np.float32).ravel())]
    return sorted(entries, key=lambda e: ((-e[0] if largest else e[0]), e[1], e[2]))


tie_heavy = st.lists(st.integers(0, 5), min_size=1, max_size=60).map(lambda v: np.array(v, dtype=np.float32) / 4)
arrays_strategy = st.lists(tie_heavy, min_size=1, max_size=8)  # several tensors: the running merge


@settings(max_examples=60, deadline=None)
@given(arrays=arrays_strategy, k=st.integers(1, 80), largest=st.booleans())
def test_global_selection_equals_full_sort(arrays, k, largest):
    ws = select_extreme(make_scores(arrays), k, "global", largest=largest)
    ref = full_sort(arrays, largest)[:k]
    assert [(f"layers.{t}.mlp.down_proj.weight", i) for _, t, i in ref] == list(zip(ws.tensor, ws.flat_index.tolist()))
    assert np.allclose(ws.score, [v for v, _, _ in ref])
    assert ws.rank.tolist() == list(range(len(ref)))


@settings(max_examples=60, deadline=None)
@given(arrays=arrays_strategy, k=st.integers(1, 80), largest=st.booleans())
def test_per_layer_selection_equals_full_sort_of_each_tensor(arrays, k, largest):
    ws = select_extreme(make_scores(arrays), k, "per_layer", largest=largest)
    expected = []
    for t, a in enumerate(arrays):
        expected += [(f"layers.{t}.mlp.down_proj.weight", i) for _, _, i in full_sort([a], largest)[:k]]
    assert expected == list(zip(ws.tensor, ws.flat_index.tolist()))


def test_two_dimensional_tensors_use_flat_indices():
    a = np.zeros((3, 4), dtype=np.float32)
    a[2, 1] = 5.0
    a[0, 3] = 4.0
    ws = select_extreme(make_scores([a]), 2, "global")
    assert ws.flat_index.tolist() == [9, 3]
    info = TensorInfo("x", (3, 4), 0, "mlp.down", "weight")
    c = info.coordinates(torch.tensor([9, 3]))
    assert c["row"].tolist() == [2, 0] and c["col"].tolist() == [1, 3]


def test_expert_stacks_have_three_coordinates():
    info = TensorInfo("model.layers.0.mlp.experts.down_proj", (4, 3, 5), 0, "moe.down", "weight")
    c = info.coordinates(torch.tensor([2 * 15 + 1 * 5 + 4]))
    assert (c["expert"].item(), c["row"].item(), c["col"].item()) == (2, 1, 4)


def test_non_finite_scores_are_refused():
    with pytest.raises(EsaError, match="NaN or inf"):
        select_extreme(make_scores([np.array([1.0, np.nan], dtype=np.float32)]), 1, "global")


def test_bad_mode_and_k():
    s = make_scores([np.ones(3, dtype=np.float32)])
    with pytest.raises(EsaError, match="--mode"):
        select_extreme(s, 1, "per_head")
    with pytest.raises(EsaError, match="--topk"):
        select_extreme(s, 0, "global")


def test_random_k_is_stratified_reproducible_and_disjoint_from_top_k():
    rng = np.random.default_rng(0)
    arrays = [rng.random(50).astype(np.float32), rng.random(2000).astype(np.float32), rng.random(7).astype(np.float32)]
    scores = make_scores(arrays)
    top = select_extreme(scores, 12, "global")
    a = select_random(scores.tensors, top, seed=3)
    b = select_random(scores.tensors, top, seed=3)
    c = select_random(scores.tensors, top, seed=4)
    assert a.counts() == top.counts()
    assert a.keys() == b.keys() and a.keys() != c.keys()
    assert not (a.keys() & top.keys())
    assert len(a.keys()) == len(a)  # distinct


def test_random_k_uniform_covers_tensors_by_size():
    arrays = [np.ones(100, dtype=np.float32), np.ones(10_000, dtype=np.float32)]
    scores = make_scores(arrays)
    top = select_extreme(scores, 200, "per_layer")  # 100 + 200
    r = select_random(scores.tensors, top, seed=0, stratified=False)
    counts = r.counts()
    assert len(r) == len(top) and counts.get("layers.1.mlp.down_proj.weight", 0) > 250
    assert not (r.keys() & top.keys())


def test_random_k_large_tensor_does_not_enumerate_all_elements():
    from esa.selection import sample_distinct

    picks = sample_distinct(1 << 40, 1000, {5, 6, 7}, torch.Generator().manual_seed(0))
    assert len(set(picks)) == 1000 and not {5, 6, 7} & set(picks) and max(picks) < 1 << 40


def test_jaccard_and_overlap():
    s = make_scores([np.arange(10, dtype=np.float32)])
    a = select_extreme(s, 4, "global")
    b = select_extreme(s, 6, "global")
    assert jaccard(a, a) == 1.0
    assert jaccard(a, b) == pytest.approx(4 / 6)
    assert overlap_at_k(a, b) == 1.0


@settings(max_examples=60, deadline=None)
@given(arrays=arrays_strategy, k=st.integers(1, 80), mode=st.sampled_from(["global", "per_layer"]))
def test_bottom_k_leaves_out_unused_weights_and_counts_them(arrays, k, mode):
    """A zero score means the evaluation cannot move that weight: bottom_k ranks only non-zero scores (fewer than
    k when fewer are used), and says how many it left out; --bottom-k-include-unused restores the old ranking."""
    ws = select_extreme(make_scores(arrays), k, mode, largest=False, skip_unused=True)
    used = [e for e in full_sort(arrays, largest=False) if e[0] != 0]
    if mode == "global":
        ref = used[:k]
    else:  # k per tensor, tensors in model order
        ref = [e for t in range(len(arrays)) for e in [u for u in used if u[1] == t][:k]]
    assert [(f"layers.{t}.mlp.down_proj.weight", i) for _, t, i in ref] == list(zip(ws.tensor, ws.flat_index.tolist()))
    assert (ws.score > 0).all()
    assert ws.meta["unused_left_out"] == sum(int((a == 0).sum()) for a in arrays)
    old = select_extreme(make_scores(arrays), k, mode, largest=False)
    assert "unused_left_out" not in old.meta
    assert len(old) == (min(k, sum(a.size for a in arrays)) if mode == "global" else sum(min(k, a.size) for a in arrays))


# -------------------------------------------------------------------------------------- the block selection
def reference_extreme(x: torch.Tensor, k: int, largest: bool, skip_zeros: bool) -> tuple[list, list]:
    """(values, flat indices) of a full stable sort by value (descending for top-k), ties to the lower index."""
    v = x.double().numpy()
    idx = np.arange(v.size)
    if skip_zeros:
        idx = idx[v != 0]
    order = np.lexsort((idx, -v[idx] if largest else v[idx]))
    chosen = idx[order][:k]
    return v[chosen].tolist(), chosen.tolist()


@pytest.mark.parametrize("largest,skip_zeros", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("case", ["continuous", "ties", "mostly_zero", "constant"])
@pytest.mark.parametrize("by_sort", [False, True], ids=["topk", "sort"])
def test_block_selection_equals_a_full_sort(largest, skip_zeros, case, by_sort):
    """Large enough to take the block path (more than BLOCK_SELECT_MIN_NUMEL elements, a partial last block): ties
    at the k-th value, many zeros (bottom-k with and without unused weights) and a constant buffer (every block
    ties: the earliest win)."""
    gen = torch.Generator().manual_seed(len(case) + 3 * largest + skip_zeros)
    n = 3 * BLOCK_SELECT_MIN_NUMEL + 17
    if case == "continuous":
        x = torch.rand(n, generator=gen) ** 4
    elif case == "ties":
        x = torch.randint(0, 50, (n,), generator=gen).float() / 8
    elif case == "mostly_zero":
        x = torch.where(torch.rand(n, generator=gen) < 0.9, 0.0, torch.rand(n, generator=gen))
    else:
        x = torch.full((n,), 0.25)
    scanned = scan(x, nonzero_min=skip_zeros)
    for k in (1, 100, 1500):
        found = block_select(x, scanned, k, largest=largest, skip_zeros=skip_zeros, by_sort=by_sort)
        values, index = reference_extreme(x, k, largest, skip_zeros)
        if k * BLOCK * BLOCK_SELECT_SHARE <= x.numel():
            assert found is not None and found[1].tolist() == index and found[0].double().tolist() == values
        else:
            assert found is None  # k blocks would be too much of the buffer: the caller selects over all of it
        c = tensor_candidates("x", x, k, largest=largest, skip_unused=skip_zeros)
        assert c.index.tolist() == index and c.values.double().tolist() == values


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 8), extra_blocks=st.integers(0, 40), tail=st.integers(0, BLOCK - 1),
       zero_blocks=st.booleans(), largest=st.booleans(), skip_zeros=st.booleans())
def test_block_selection_is_exact_under_heavy_ties(seed, k, extra_blocks, tail, zero_blocks, largest, skip_zeros):
    """Few distinct values: the k-th value is tied across many blocks, the few better values sit in blocks that
    also hold ties (so block order and flat order differ), blocks tie on their extremes, zeros may fill whole
    blocks, the last block is short; the block path must still equal a full stable sort."""
    skip_zeros = skip_zeros and not largest
    rng = np.random.default_rng(seed)
    n = (k * BLOCK_SELECT_SHARE + extra_blocks) * BLOCK + tail
    x = rng.integers(1, 3, n).astype(np.float32)  # 1 and 2 everywhere: the k-th value ties across many blocks
    rare = rng.choice(n, 2 * k, replace=False)  # fewer than k better values, in blocks that also hold ties
    x[rare[: rng.integers(0, k)]] = 3.0
    x[rare[k : k + rng.integers(0, k)]] = 0.5
    if zero_blocks:
        x[: n // 2 - n // 2 % BLOCK] = 0
    x = torch.from_numpy(x)
    ref_values, ref_index = reference_extreme(x, k, largest, skip_zeros)
    for by_sort in (False, True):  # the CPU's selection of k blocks and the GPU's stable sorts
        found = block_select(x, scan(x, nonzero_min=skip_zeros), k, largest=largest, skip_zeros=skip_zeros,
                             by_sort=by_sort)
        assert found is not None and found[1].tolist() == ref_index and found[0].double().tolist() == ref_values


def test_non_finite_scores_are_refused():
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.rand(5 * BLOCK + 3)
        x[4 * BLOCK + 1] = bad
        with pytest.raises(EsaError, match="NaN or inf"):
            tensor_candidates("t", x, 3)
