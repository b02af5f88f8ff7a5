"""Seeds derived from names, all from one hash: :func:`esa.kernels.rng.stream_id`, the CRC-32 of the name's UTF-8
bytes (stable across processes and machines, unlike Python's ``hash``).

- :func:`stream_id` (name → 32 bits): the counter-based streams of the perturbation kernels (one per tensor);
- :func:`seed_for` (parts → 31 bits): ``stream_id("|".join(parts))``, the torch generator of a Hutchinson probe
  (seed, tensor, batch, probe);
- :func:`stream_seed` (seed, name → 47 bits): ``seed · 1000003 + stream_id(name)``, the torch generator of the
  random weights drawn from one tensor (random_k control sets, validate's sample).

The values are part of every run's reproducibility (the same seed draws the same sets): do not change them.
"""

from __future__ import annotations

from esa.kernels.rng import stream_id

__all__ = ["seed_for", "stream_id", "stream_seed"]


def seed_for(*parts: object) -> int:
    """A 31-bit seed of ``parts`` (joined by "|" as text), e.g. ``seed_for(seed, name, batch, probe)``."""
    return stream_id("|".join(map(str, parts))) & 0x7FFFFFFF


def stream_seed(seed: int, name: str) -> int:
    """A 47-bit seed of (``seed``, ``name``): ``(seed · 1000003 + stream_id(name)) mod 2^47``."""
    return (seed * 1_000_003 + stream_id(name)) & 0x7FFFFFFFFFFF
