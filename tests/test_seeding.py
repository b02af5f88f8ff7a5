"""The one name hash behind every derived seed keeps the values the runs were made with."""

import zlib

from hypothesis import given
from hypothesis import strategies as st

from esa.kernels.rng import stream_id
from esa.seeding import seed_for, stream_seed


@given(st.integers(0, 2**40), st.text(max_size=40), st.integers(0, 1000), st.integers(0, 64))
def test_probe_seed_is_the_crc32_of_the_joined_parts(seed, name, batch, probe):
    expected = zlib.crc32(f"{seed}|{name}|{batch}|{probe}".encode()) & 0x7FFFFFFF
    assert seed_for(seed, name, batch, probe) == expected


@given(st.integers(0, 2**31), st.text(max_size=40))
def test_stream_seed_is_seed_times_a_prime_plus_the_crc32(seed, name):
    assert stream_seed(seed, name) == (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFF
    assert stream_id(name) == zlib.crc32(name.encode("utf-8"))
