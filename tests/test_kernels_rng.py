"""rng: the int64 mixer equals a pure-Python one; uniforms and normals are well-formed and reproducible."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from esa.kernels.rng import hash32, normal, random_bits, stream_id, uniform

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 on Python ints (unbounded integers, so no splitting needed)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def python_random_bits(seed: int, stream: int, index: int, draw: int) -> int:
    """The documented key schedule: absorb seed (low, high), stream, draw, then the index (low, high)."""
    h = 0x9E3779B9
    for word in (seed & M32, (seed >> 32) & M32, stream & M32, draw & M32, index & M32, index >> 32):
        h = lowbias32(h ^ word)
    return h


def test_hash32_matches_python_reference() -> None:
    g = torch.Generator().manual_seed(0)
    xs = torch.cat(
        [
            torch.tensor([0, 1, 2, M32, M32 - 1, 1 << 31, (1 << 32) + 5, (1 << 40) + 123, (1 << 62) - 1]),
            torch.randint(0, 1 << 62, (2000,), generator=g),
        ]
    )
    expected = [lowbias32(x) for x in xs.tolist()]
    assert hash32(xs.to(DEVICE)).cpu().tolist() == expected
    assert lowbias32(0) == 0 and lowbias32(1) != 1


def test_hash32_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="int64"):
        hash32(torch.arange(3, dtype=torch.int32))


def test_random_bits_follow_the_key_schedule_for_huge_indices() -> None:
    indices = torch.tensor([0, 1, 7, M32, 1 << 32, (1 << 32) + 7, (1 << 33) + 12345, (1 << 45) + 99])
    for seed, stream, draw in [(0, 0, 0), (42, stream_id("lm_head.weight"), 1), ((1 << 40) + 3, M32, 5)]:
        got = random_bits(seed, stream, indices.to(DEVICE), draw).cpu().tolist()
        assert got == [python_random_bits(seed, stream, i, draw) for i in indices.tolist()]


def test_indices_beyond_two_to_the_32_get_their_own_numbers() -> None:
    low = torch.arange(1000, device=DEVICE)
    assert not torch.equal(uniform(1, 2, low, 0), uniform(1, 2, low + (1 << 32), 0))


def test_uniform_is_in_the_open_unit_interval_and_pure() -> None:
    idx = torch.arange(100_000, device=DEVICE)
    u = uniform(3, 4, idx, 0)
    assert u.dtype == torch.float64
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, uniform(3, 4, idx, 0))
    for other in (uniform(4, 4, idx, 0), uniform(3, 5, idx, 0), uniform(3, 4, idx, 1)):
        assert float((u == other).double().mean()) < 1e-3
    # The extremes of the mapping (bits + 0.5) / 2^32 stay strictly inside (0, 1).
    assert (0 + 0.5) / 2**32 > 0.0 and (M32 + 0.5) / 2**32 < 1.0


def test_normal_moments() -> None:
    z = normal(7, stream_id("model.layers.0.self_attn.q_proj.weight"), torch.arange(100_000, device=DEVICE))
    assert z.dtype == torch.float32 and z.shape == (100_000,)
    assert abs(float(z.mean())) < 0.02
    assert abs(float(z.std()) - 1.0) < 0.02
    assert abs(float((z.abs() < 1.0).float().mean()) - 0.6827) < 0.01
    assert torch.isfinite(z).all() and float(z.abs().max()) < 7.0
    assert not torch.equal(z, normal(7, 0, torch.arange(100_000, device=DEVICE), draw=1))


def test_stream_id_is_crc32_of_the_name() -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    assert stream_id(name) == zlib.crc32(name.encode("utf-8"))
    assert 0 <= stream_id(name) < 2**32
    assert stream_id(name) != stream_id("model.layers.2.mlp.down_proj.weight")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uniform_is_identical_on_cpu_and_cuda() -> None:
    idx = torch.arange(0, 1 << 40, (1 << 40) // 10_000)
    assert torch.equal(uniform(9, 9, idx, 3), uniform(9, 9, idx.cuda(), 3).cpu())
    assert math.isclose(float(normal(9, 9, idx).sum()), float(normal(9, 9, idx.cuda()).sum()), rel_tol=1e-6)
