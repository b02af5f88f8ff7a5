"""Shifted power sums of a float32 buffer in one read: the ingredients of exact mean, variance, skewness, kurtosis.

``power_sums(x, shift)`` returns (Σy, Σy², Σy³, Σy⁴) with y = x − shift computed and summed in float64. With a
shift c near the mean (esa uses the mean of a seeded sample), the central moments follow without cancellation
trouble (d = Σy/n):

    m₂ = Σy²/n − d²,   m₃ = Σy³/n − 3d·Σy²/n + 2d³,   m₄ = Σy⁴/n − 4d·Σy³/n + 6d²·Σy²/n − 3d⁴.

float64 holds every power of every finite float32 exactly enough: |x|⁴ ≤ (3.4e38)⁴ < 1.8e308 and the smallest
subnormal's fourth power (2⁻⁵⁹⁶) is still normal in float64, so no power over- or underflows. A NaN or ±inf in ``x``
makes Σy non-finite (how callers detect broken scores). The shift is rounded to float32 first (a Triton kernel takes
a Python float as float32), by :func:`power_sums` and :func:`central_moments` alike.

The torch reference copies ``x`` chunk by chunk into a float64 buffer of at most ``TORCH_CHUNK`` elements per
thread (sized to stay in each core's cache) next to its squares, and takes the sums from them (the products with
``torch.dot``, which reads without writing: the fastest of the forms that ``python -m bench.cpu_scan`` compares,
measured on a 16-core host); :func:`compiled_scan` fuses the same arithmetic into one compiled loop for large
CPU buffers, with the block extrema of :mod:`esa.scorescan` in the same read. On a GPU the sums are taken in the same read as the block extrema, by
:func:`esa.kernels.blockscan.block_scan`. The forms agree to float64 rounding (summation order differs).
"""

from __future__ import annotations

import warnings

import torch

from esa.kernels.dispatch import requested_backend

#: Elements per chunk of the torch reference and per CPU thread: a 1 MiB float64 buffer and one for its squares
#: (cache-sized on a CPU; each of torch's threads takes its own slice of a chunk).
TORCH_CHUNK = 1 << 17

#: CPU buffers of at least this many elements take :func:`compiled_scan` (its compile, about 25 s once per process
#: on 2 cores, pays for itself from here on).
COMPILED_MIN_NUMEL = 1 << 26
#: Elements per call of the compiled function: one shape, so it is compiled once.
COMPILED_CHUNK = 1 << 24

PowerSums = tuple[float, float, float, float]
_compiled: dict = {}  # "fn": the compiled function; "failed": compiling did not work here


def shift_of(shift: float) -> float:
    """``shift`` as the kernels use it: rounded to float32."""
    return float(torch.tensor(shift, dtype=torch.float32))


def _check(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise ValueError(f"power_sums takes float32, got {x.dtype}")
    return x.detach().reshape(-1)


def torch_chunk(device: torch.device) -> int:
    """Elements per chunk of :func:`power_sums_torch` on ``device``."""
    return TORCH_CHUNK * (torch.get_num_threads() if device.type == "cpu" else 1)


def work_buffers(x: torch.Tensor) -> torch.Tensor:
    """The float64 scratch of :func:`power_sums_torch` for buffers like ``x``: a caller that sums many chunks
    passes it to every call (new memory is paged in on first use, which costs as much as the sums)."""
    return torch.empty((2, min(x.numel(), torch_chunk(x.device))), dtype=torch.float64, device=x.device)


def power_sums_torch(x: torch.Tensor, shift: float, work: torch.Tensor | None = None) -> PowerSums:
    """Plain-torch reference of :func:`power_sums`; ``work``: see :func:`work_buffers`."""
    flat = _check(x)
    shift = shift_of(shift)
    n = flat.numel()
    step = torch_chunk(flat.device)
    if work is None or work.shape[1] < min(n, step):
        work = work_buffers(flat)
    s1 = s2 = s3 = s4 = 0.0
    for start in range(0, n, step):
        chunk = flat[start : start + step]
        m = chunk.numel()
        y, sq = work[0, :m], work[1, :m]
        y.copy_(chunk).sub_(shift)
        torch.mul(y, y, out=sq)
        s1 += float(y.sum())
        s2 += float(sq.sum())
        s3 += float(torch.dot(sq, y))
        s4 += float(torch.dot(sq, sq))
    return s1, s2, s3, s4


def _chunk_scan(x: torch.Tensor, shift: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """([Σy, Σy², Σy³, Σy⁴] with y = x − shift in float64, per-``block`` maxima, per-``block`` minima) of one chunk
    (a multiple of ``block`` elements): what :func:`compiled_scan` compiles into one loop."""
    y = x.double() - shift
    sq = y * y
    rows = x.view(-1, block)
    return torch.stack([y.sum(), sq.sum(), (sq * y).sum(), (sq * sq).sum()]), rows.amax(dim=1), rows.amin(dim=1)


def compiled_scan(x: torch.Tensor, shift: float, block: int
                  ) -> tuple[int, PowerSums, torch.Tensor, torch.Tensor] | None:
    """The power sums and the per-``block`` maxima and minima of the leading ``done`` elements of a large CPU
    buffer (``done``: a multiple of ``COMPILED_CHUNK``, itself a multiple of ``block``) through ``torch.compile``:
    inductor's C++ fuses them into one loop that reads each element once (about 2.5x the torch reference's speed
    for the sums alone on 2 cores, ``python -m bench.cpu_scan``; the extrema come with that read). Returns (done,
    sums, maxima, minima); the caller scans the rest. None where it does not apply (a CUDA tensor, fewer than
    ``COMPILED_MIN_NUMEL`` elements, ``ESA_KERNELS=torch``) or cannot run (compiling needs a C++ compiler; the
    first failure is warned about once and remembered)."""
    flat = _check(x)
    if flat.is_cuda or flat.numel() < COMPILED_MIN_NUMEL or requested_backend() == "torch" or _compiled.get("failed"):
        return None
    if COMPILED_CHUNK % block:
        raise ValueError(f"COMPILED_CHUNK ({COMPILED_CHUNK}) is not a multiple of the block ({block})")
    shift = shift_of(shift)
    done = flat.numel() - flat.numel() % COMPILED_CHUNK
    total = torch.zeros(4, dtype=torch.float64)
    highs, lows = [], []
    try:
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(_chunk_scan, dynamic=False)
        fn = _compiled["fn"]
        at = torch.tensor(shift, dtype=torch.float64)
        for start in range(0, done, COMPILED_CHUNK):
            sums, high, low = fn(flat[start : start + COMPILED_CHUNK], at, block)
            total += sums
            highs.append(high)
            lows.append(low)
    except Exception as e:  # inductor raises its own error types (no compiler, a failed build): use the reference
        _compiled["failed"] = True
        warnings.warn(f"esa: the compiled CPU scan is unavailable ({type(e).__name__}); using torch's (slower)",
                      RuntimeWarning, stacklevel=2)
        return None
    return done, tuple(total.tolist()), torch.cat(highs), torch.cat(lows)  # type: ignore[return-value]


def power_sums(x: torch.Tensor, shift: float, work: torch.Tensor | None = None) -> PowerSums:
    """(Σy, Σy², Σy³, Σy⁴) of float32 ``x`` with y = x − ``shift``, in float64 (module docstring). ``work``: the
    torch reference's scratch (:func:`work_buffers`), for a caller that sums many chunks."""
    return power_sums_torch(x, shift, work)


def central_moments(sums: PowerSums, n: int, shift: float) -> tuple[float, float, float, float]:
    """(mean, m₂, m₃, m₄) from :func:`power_sums` of ``n`` elements (formulas in the module docstring)."""
    s1, s2, s3, s4 = sums
    shift = shift_of(shift)
    d = s1 / n
    a2, a3, a4 = s2 / n, s3 / n, s4 / n
    m2 = max(a2 - d * d, 0.0)
    m3 = a3 - 3 * d * a2 + 2 * d**3
    m4 = max(a4 - 4 * d * a3 + 6 * d * d * a2 - 3 * d**4, 0.0)
    return shift + d, m2, m3, m4
