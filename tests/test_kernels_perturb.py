"""apply_perturbation_ / restore_: Triton == torch bit for bit, exact restore, deterministic masks and noise."""

from __future__ import annotations

import math

import pytest
import torch

from esa.kernels import (
    apply_perturbation_,
    bit_flip_masks,
    bit_layout,
    force_backend,
    gaussian_noise,
    restore_,
    stream_id,
)
from esa.kernels.dispatch import HAS_TRITON
from esa.kernels.perturb import (
    apply_perturbation_torch,
    apply_perturbation_triton,
    restore_torch,
    restore_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# Stored bit patterns worth a special look: +-0, smallest subnormal, largest finite, +-inf, NaN.
SPECIAL_BITS = {
    torch.bfloat16: [0, -32768, 1, -32767, 0x7F7F, -129, 0x7F80, -128, 0x7FC1],
    torch.float16: [0, -32768, 1, -32767, 0x7BFF, -1025, 0x7C00, -1024, 0x7E01],
    torch.float32: [0, -(2**31), 1, -(2**31) + 1, 0x7F7FFFFF, -8388609, 0x7F800000, -8388608, 0x7FC00001],
}
FINITE_SPECIALS = 6  # the first six are finite: arithmetic kinds use only those, NaN/inf payloads are not portable

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# The interpreter computes with numpy, which warns when a product overflows to inf (the 1e30 case, on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def make_weight(dtype: torch.dtype, numel: int, finite_only: bool, seed: int = 0) -> torch.Tensor:
    """Random weights (a 2-D tensor) whose first elements are the special bit patterns."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(numel, generator=g) * 0.05).to(dtype)
    specials = SPECIAL_BITS[dtype][: FINITE_SPECIALS if finite_only else None][:numel]
    w.view(INT_VIEW[dtype])[: len(specials)] = torch.tensor(specials, dtype=INT_VIEW[dtype])
    return w.reshape(numel // 11, 11).to(DEVICE) if numel % 11 == 0 else w.to(DEVICE)


def make_indices(numel: int, count: int, seed: int = 0) -> torch.Tensor:
    """Unique, unsorted indices that include both ends and the special elements at the front."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.randperm(numel - 10, generator=g)[: max(0, count - 10)] + 9
    idx = torch.cat([torch.tensor([numel - 1, 0]), rest, torch.arange(1, 9)])
    return idx[torch.randperm(idx.numel(), generator=g)].to(DEVICE)


def perturbation_args(kind: str, dtype: torch.dtype, idx: torch.Tensor, scale: float) -> dict:
    if kind == "gauss_noise":
        return {"scale": scale, "noise": gaussian_noise(7, stream_id("w"), idx)}
    if kind == "bit_flip":
        return {"xor_mask": bit_flip_masks(7, stream_id("w"), idx, dtype, 0.7, "any")}
    return {"scale": scale}


CASES = [
    ("zero", 1.0),
    ("sign_flip", 1.0),
    ("sign_flip", 0.37),
    ("sign_flip", 1e30),  # overflows to inf
    ("gauss_noise", 0.02),
    ("gauss_noise", 3.0),
    ("bit_flip", 1.0),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype]).reshape(-1).cpu()


@needs_triton
@pytest.mark.parametrize("numel", [1, 7, 1001, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, scale", CASES)
def test_triton_matches_torch_and_restores_exactly(kind: str, scale: float, dtype: torch.dtype, numel: int) -> None:
    finite_only = kind == "gauss_noise" or (kind == "sign_flip" and scale != 1.0)
    original = make_weight(dtype, numel, finite_only)
    idx = make_indices(numel, min(numel, 700)) if numel >= 10 else torch.randperm(numel).to(DEVICE)
    args = perturbation_args(kind, dtype, idx, scale)
    w_triton, w_torch = original.clone(), original.clone()
    saved_triton = apply_perturbation_triton(w_triton, idx, kind, **args)
    saved_torch = apply_perturbation_torch(w_torch, idx, kind, **args)
    assert torch.equal(bits(w_triton), bits(w_torch))
    assert saved_triton.dtype == INT_VIEW[dtype] and saved_triton.shape == idx.shape
    assert torch.equal(saved_triton.cpu(), bits(original)[idx.cpu()])
    assert torch.equal(saved_torch.cpu(), saved_triton.cpu())
    untouched = torch.ones(original.numel(), dtype=torch.bool)
    untouched[idx.cpu()] = False
    assert torch.equal(bits(w_triton)[untouched], bits(original)[untouched])
    restore_triton(w_triton, idx, saved_triton)
    restore_torch(w_torch, idx, saved_torch)
    assert torch.equal(bits(w_triton), bits(original)) and torch.equal(bits(w_torch), bits(original))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_semantics(dtype: torch.dtype) -> None:
    w = make_weight(dtype, 1001, finite_only=False)
    idx = make_indices(1001, 300)
    flat_before = w.reshape(-1).clone()
    sign = -(1 << (8 * w.element_size() - 1))

    z = w.clone()
    apply_perturbation_torch(z, idx, "zero")
    assert torch.equal(bits(z)[idx.cpu()], torch.zeros(idx.numel(), dtype=INT_VIEW[dtype]))

    s = w.clone()
    apply_perturbation_torch(s, idx, "sign_flip")  # scale 1: exactly the sign bit, NaN and inf included
    assert torch.equal(bits(s)[idx.cpu()], bits(w)[idx.cpu()] ^ sign)

    s = w.clone()
    apply_perturbation_torch(s, idx, "sign_flip", scale=0.5)
    expected = (flat_before[idx].float() * -0.5).to(dtype)
    not_nan = ~torch.isnan(expected)
    assert torch.equal(s.reshape(-1)[idx][not_nan], expected[not_nan])
    assert torch.isnan(s.reshape(-1)[idx][~not_nan]).all()

    x = w.clone()
    mask = bit_flip_masks(1, 2, idx, dtype, 1.0, "mantissa")
    apply_perturbation_torch(x, idx, "bit_flip", xor_mask=mask)
    assert torch.equal(bits(x)[idx.cpu()], bits(w)[idx.cpu()] ^ mask.cpu())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_public_api_round_trip(backend: str) -> None:
    w = torch.randn(64, 33, device=DEVICE).to(torch.bfloat16)
    before = bits(w).clone()
    idx = torch.tensor([2111, 0, 5, 1000], device=DEVICE)
    noise = gaussian_noise(3, stream_id("layer.0"), idx)
    with force_backend(backend):
        saved = apply_perturbation_(w, idx, "gauss_noise", scale=0.5, noise=noise)
        perturbed = w.reshape(-1)[idx].float()
        restore_(w, idx, saved)
    w_before = before.view(torch.bfloat16)[idx.cpu()].float()
    expected = (w_before + 0.5 * w_before.abs() * noise.cpu()).bfloat16().float()
    assert torch.equal(perturbed.cpu(), expected)
    assert torch.equal(bits(w), before)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_selection_changes_nothing(impl: str) -> None:
    apply, restore = (
        (apply_perturbation_torch, restore_torch) if impl == "torch" else (apply_perturbation_triton, restore_triton)
    )
    w = torch.randn(10, device=DEVICE)
    before = w.clone()
    idx = torch.empty(0, dtype=torch.int64, device=DEVICE)
    saved = apply(w, idx, "zero")
    assert saved.shape == (0,) and saved.dtype == torch.int32
    restore(w, idx, saved)
    assert torch.equal(w, before)


def test_noise_and_masks_are_pure_functions_of_their_seed() -> None:
    idx = torch.arange(0, 5000, 3, device=DEVICE)
    stream = stream_id("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(gaussian_noise(11, stream, idx), gaussian_noise(11, stream, idx))
    assert not torch.equal(gaussian_noise(11, stream, idx), gaussian_noise(12, stream, idx))
    assert not torch.equal(gaussian_noise(11, stream, idx), gaussian_noise(11, stream + 1, idx))
    # An element's draw does not depend on which other elements are selected, or in what order.
    assert torch.equal(gaussian_noise(11, stream, idx.flip(0)), gaussian_noise(11, stream, idx).flip(0))
    masks = bit_flip_masks(11, stream, idx, torch.bfloat16, 0.5, "any")
    assert torch.equal(masks, bit_flip_masks(11, stream, idx, torch.bfloat16, 0.5, "any"))
    assert not torch.equal(masks, bit_flip_masks(12, stream, idx, torch.bfloat16, 0.5, "any"))
    assert torch.equal(bit_flip_masks(11, stream, idx[5:9], torch.bfloat16, 0.5, "any"), masks[5:9])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits_choice", ["any", "sign", "exponent", "mantissa", [0, 3, 13]])
def test_masks_flip_one_eligible_bit_at_the_requested_rate(dtype: torch.dtype, bits_choice) -> None:
    n, prob = 20000, 0.3
    idx = torch.arange(n, device=DEVICE) * 7919 + 2**33  # large indices, too
    masks = bit_flip_masks(5, 9, idx, dtype, prob, bits_choice)
    assert masks.dtype == INT_VIEW[dtype] and masks.shape == (n,)
    width = 8 * masks.element_size()
    unsigned = masks.cpu().long() & ((1 << width) - 1)
    flipped = unsigned[unsigned != 0]
    # Flip count within 6 standard deviations of the binomial mean.
    assert abs(flipped.numel() - n * prob) < 6 * math.sqrt(n * prob * (1 - prob))
    assert torch.all(flipped & (flipped - 1) == 0)  # exactly one bit per flipped element
    positions = torch.log2(flipped.double()).round().long()
    eligible = bit_layout(dtype)[bits_choice] if isinstance(bits_choice, str) else bits_choice
    assert set(positions.tolist()) == set(eligible)  # every eligible bit occurs, no other


def test_zero_and_one_probability() -> None:
    idx = torch.arange(1000, device=DEVICE)
    assert torch.count_nonzero(bit_flip_masks(1, 1, idx, torch.float32, 0.0, "any")) == 0
    assert torch.count_nonzero(bit_flip_masks(1, 1, idx, torch.float32, 1.0, "sign")) == 1000
    assert torch.all(bit_flip_masks(1, 1, idx, torch.float32, 1.0, "sign") == -(2**31))
    assert torch.all(bit_flip_masks(1, 1, idx, torch.float16, 1.0, [15]) == -(2**15))


def test_bit_layouts() -> None:
    assert bit_layout(torch.bfloat16) == {
        "sign": [15],
        "exponent": list(range(7, 15)),
        "mantissa": list(range(7)),
        "any": list(range(16)),
    }
    assert bit_layout(torch.float16)["exponent"] == list(range(10, 15))
    assert bit_layout(torch.float16)["mantissa"] == list(range(10))
    assert bit_layout(torch.float32)["sign"] == [31]
    assert bit_layout(torch.float32)["exponent"] == list(range(23, 31))
    with pytest.raises(ValueError, match="unsupported dtype"):
        bit_layout(torch.int8)


@pytest.mark.parametrize(
    "prob, bits_choice, message",
    [
        (1.5, "any", "probability"),
        (-0.1, "any", "probability"),
        (0.5, "exp", "expected one of"),
        (0.5, [16], "not an integer in"),
        (0.5, [-1], "not an integer in"),
        (0.5, [True], "not an integer in"),
        (0.5, [], "empty"),
        (0.5, [3, 3], "repeated"),
    ],
)
def test_mask_argument_errors(prob: float, bits_choice, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bit_flip_masks(0, 0, torch.arange(4), torch.bfloat16, prob, bits_choice)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "scale"}, "unknown perturbation kind"),
        ({"kind": "gauss_noise"}, "needs noise"),
        ({"kind": "bit_flip"}, "needs xor_mask"),
        ({"noise": torch.zeros(3)}, "only used by kind 'gauss_noise'"),
        ({"kind": "bit_flip", "xor_mask": torch.zeros(3, dtype=torch.int32)}, "xor_mask must be torch.int16"),
        ({"kind": "gauss_noise", "noise": torch.zeros(2)}, "noise must be torch.float32 of shape"),
        ({"indices": torch.tensor([0, 1, 12])}, "out of range"),
        ({"indices": torch.tensor([-1, 1, 2])}, "out of range"),
        ({"indices": torch.tensor([0, 1, 2], dtype=torch.int32)}, "1-D int64"),
        ({"weight": torch.zeros(4, 3, dtype=torch.bfloat16).t()}, "contiguous"),
        ({"weight": torch.zeros(12, dtype=torch.int16)}, "bfloat16, float16 or float32"),
        ({"scale": math.inf}, "finite"),
    ],
)
def test_apply_argument_errors(change: dict, message: str) -> None:
    args = {"weight": torch.zeros(12, dtype=torch.bfloat16), "indices": torch.tensor([0, 5, 11]), "kind": "zero"}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        apply_perturbation_torch(args.pop("weight"), args.pop("indices"), args.pop("kind"), **args)


def test_restore_argument_errors() -> None:
    w = torch.zeros(12, dtype=torch.float16)
    idx = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="original_bits must be torch.int16"):
        restore_torch(w, idx, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="original_bits must be torch.int16 of shape"):
        restore_torch(w, idx, torch.zeros(3, dtype=torch.int16))
