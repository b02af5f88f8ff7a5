"""Heavy-tail statistics of a score distribution, computed without sorting the whole tensor.

Per tensor (and for the model as a whole) from three exact or seeded ingredients:
- exact moments from one read of the buffer (:func:`moments`; float64 power sums about the sample's mean, see
  :mod:`esa.kernels.moments`): mean, standard deviation, excess kurtosis (m4/m2² − 3), max, number of exact zeros;
- the exact top ``tail`` scores (:func:`esa.kernels.topk`): the share of the total score mass held by the
  top-k, and the tail fits;
- a seeded uniform sample (all elements when the tensor has at most ``SAMPLE`` of them) for quantiles and the Gini
  coefficient G = Σ_i (2i − n − 1)·x_(i) / (n·Σ x) (x sorted ascending).

Tail index and fits (Clauset, Shalizi & Newman 2009), on the m = ``tail`` largest scores above x_min = the
(m+1)-th largest:
- Hill estimator α̂ = m / Σ ln(x_i / x_min)  (the CCDF decays as x^-α̂);
- maximum-likelihood fits of a power law p(x) ∝ x^-(1+α̂), an exponential λe^{−λ(x−x_min)} and a lognormal
  truncated at x_min; log-likelihood ratios R (positive favours the first) with Vuong's normalised two-sided
  p-value, for power law vs exponential and power law vs lognormal, and lognormal vs exponential; the best fit
  by AIC (the lognormal has two parameters, the others one), joined with "~" to every fit that Vuong's test
  cannot tell from it at p < 0.05 (a power law and a lognormal tail are often indistinguishable);
- "heavier than exponential" from a nested test that cannot mistake a light tail for a heavy one (a lognormal
  fitted above x_min can also mimic tails *lighter* than exponential): the stretched exponential (Weibull)
  tail P(X ≥ x | X ≥ x_min) = exp(−(x^β − x_min^β)/c), which is the exponential at β = 1, fitted by maximum
  likelihood; heavier iff β̂ < 1 and the likelihood-ratio test of β = 1 (χ²₁) gives p < 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import optimize, special, stats

if TYPE_CHECKING:
    import torch

# torch is imported where a buffer is summarized, not here: the statistics (describe, tail_fits) need only numpy
# and scipy, so the worker processes of esa.scorestats.describe_all start without it.

SAMPLE = 1 << 16
MIN_TAIL = 20


@dataclass
class TensorSummary:
    """Streaming ingredients of one score tensor (exact moments, exact top values, a sample)."""

    numel: int
    total: float
    mean: float
    std: float
    excess_kurtosis: float
    max: float
    zeros: int
    m3: float  # third central moment (kept so that pooled moments stay exact)
    top: np.ndarray  # exact largest scores, descending
    sample: np.ndarray  # seeded uniform sample (or every element)


def ready() -> bool:
    """A task that only makes a worker process import this module (numpy, scipy): see esa.scorestats.FitWorkers."""
    return True


def draw_sample(flat: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded uniform sample of a flat score buffer (every element when it has at most ``SAMPLE``), on the
    buffer's device: the summary's sample, whose mean is also the shift of the power sums (:func:`moments`)."""
    n = flat.numel()
    if n <= SAMPLE:
        return flat
    return flat[_sample_index(n, seed, flat.device)]


_SAMPLE_INDEX: dict = {}  # (numel, seed, device) -> the sample's indices: tensors of one shape share them
_SAMPLE_INDEX_KEPT = 16


def _sample_index(n: int, seed: int, device) -> torch.Tensor:
    """SAMPLE indices uniform in [0, n) from a CPU generator seeded with ``seed`` (so every device draws the same
    sample), on ``device``; kept for the last few (n, seed, device): a model's tensors come in a few shapes, and
    drawing costs about as much as the rest of a small tensor's selection."""
    import torch

    key = (n, seed, str(device))
    if key not in _SAMPLE_INDEX:
        if len(_SAMPLE_INDEX) >= _SAMPLE_INDEX_KEPT:
            _SAMPLE_INDEX.pop(next(iter(_SAMPLE_INDEX)))
        g = torch.Generator().manual_seed(seed)
        _SAMPLE_INDEX[key] = torch.randint(0, n, (SAMPLE,), generator=g).to(device)
    return _SAMPLE_INDEX[key]


Moments = tuple[float, int, float, float, float, float]


def scan_moments(scanned, maximum: float | None = None) -> Moments:
    """(Σx, zeros, max, m2, m3, m4) of a buffer from its :class:`esa.scorescan.Scan` (made with a shift);
    m_j = Σ(x − mean)^j / n, from float64 power sums about the shift (:mod:`esa.kernels.moments`). ``maximum``:
    the buffer's largest value when the caller has it (its top-1), else the largest block maximum."""
    mean, m2, m3, m4 = scanned.moments()
    n = scanned.numel
    maximum = float(scanned.block_max.max()) if maximum is None else maximum
    return mean * n, scanned.zeros, maximum, m2, m3, m4


def moments(flat: torch.Tensor, seed: int = 0) -> Moments:
    """(Σx, zeros, max, m2, m3, m4) of a flat buffer in one read (:func:`esa.scorescan.scan`), the power sums in
    float64 about the mean of the seeded sample."""
    from esa.scorescan import scan

    return scan_moments(scan(flat, shift=float(draw_sample(flat, seed).double().mean())))


def summarize(score: torch.Tensor, tail: int, *, seed: int = 0, top: torch.Tensor | None = None,
              sample: torch.Tensor | None = None, stats: tuple | None = None) -> TensorSummary:
    """``top``: the tensor's exact largest scores, descending, at least min(tail, numel) of them, when the caller
    has selected them already (one selection then serves top-k and the tail); ``sample`` (:func:`draw_sample` with
    ``seed``) and ``stats`` (:func:`moments`) likewise when the caller has them."""
    from esa.kernels import topk

    flat = score.detach().reshape(-1)
    n = flat.numel()
    total, zeros, mx, m2, m3, m4 = moments(flat, seed) if stats is None else stats
    mean = total / n
    kurt = m4 / (m2 * m2) - 3.0 if m2 > 0 else float("nan")
    top_values = top[: min(tail, n)] if top is not None else topk(score, min(tail, n), largest=True)[0]
    sample = draw_sample(flat, seed) if sample is None else sample
    return TensorSummary(n, total, mean, math.sqrt(m2), kurt, mx, zeros, m3, top_values.double().cpu().numpy(),
                         sample.double().cpu().numpy())


def gini(values: np.ndarray) -> float:
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    s = x.sum()
    if n == 0 or s <= 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * s))


def _vuong(ll_a: np.ndarray, ll_b: np.ndarray) -> tuple[float, float]:
    """Log-likelihood ratio R = Σ(ℓa − ℓb) and Vuong's two-sided p-value."""
    d = ll_a - ll_b
    r = float(d.sum())
    sd = float(d.std())
    if sd == 0 or not np.isfinite(sd):
        return r, float("nan")
    return r, float(special.erfc(abs(r) / (sd * math.sqrt(2 * d.size))))


def stretched_exponential_fit(x: np.ndarray, xmin: float) -> tuple[float, float]:
    """(β̂, maximised log-likelihood) of the Weibull tail above ``xmin`` (see the module docstring).

    With u = x / x_min the profile log-likelihood is
    ℓ(β) = m ln β + (β − 1) Σ ln u − m ln x_min − m ln mean(u^β − 1) − m  (c at its optimum x_min^β·mean(u^β − 1)).
    """
    u = x / xmin
    log_u = np.log(u)
    m = x.size

    def neg_loglik(log_beta: float) -> float:
        beta = math.exp(log_beta)
        with np.errstate(over="ignore"):
            excess = np.expm1(beta * log_u).mean()
        if not np.isfinite(excess) or excess <= 0:
            return 1e300
        return -(m * math.log(beta) + (beta - 1) * log_u.sum() - m * math.log(xmin) - m * math.log(excess) - m)

    fit = optimize.minimize_scalar(neg_loglik, bounds=(math.log(1e-3), math.log(50.0)), method="bounded",
                                   options={"xatol": 1e-8})
    return math.exp(float(fit.x)), -float(fit.fun)


def _best_fit(aic: dict[str, float], vuong_p: dict[tuple[str, str], float]) -> str:
    """The AIC winner, joined with "~" to the fits it is not significantly better than (ordered by AIC)."""
    ranked = sorted(aic, key=aic.get)
    winner = ranked[0]

    def p_between(a: str, b: str) -> float:
        return vuong_p.get((a, b), vuong_p.get((b, a), float("nan")))

    tied = [f for f in ranked[1:] if not p_between(winner, f) < 0.05]
    return "~".join([winner, *tied])


_LOG_SQRT_2PI = np.log(np.sqrt(2 * np.pi))


def _norm_logpdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """log N(x; μ, σ²) = −z²/2 − ln √(2π) − ln σ with z = (x − μ)/σ: scipy.stats.norm.logpdf's arithmetic, step for
    step (so the fits below are bit-identical to it), without its per-call argument handling."""
    if not (sigma > 0 and math.isfinite(sigma)):
        return stats.norm.logpdf(x, mu, sigma)
    z = (x - np.float64(mu)) / np.float64(sigma)
    return (-z**2 / 2.0 - _LOG_SQRT_2PI) - np.log(np.float64(sigma))


def _norm_sf(z: float) -> float:
    """P(Z ≥ z) of a standard normal: Φ(−z), as scipy.stats.norm.sf computes it."""
    return special.ndtr(-np.float64(z))


def tail_fits(top: np.ndarray, m: int | None = None) -> dict:
    """Hill index and power-law / exponential / lognormal fits of the ``m`` largest values (see module doc)."""
    top = np.sort(np.asarray(top, dtype=np.float64))[::-1]
    top = top[top > 0]
    m = min(m or top.size - 1, top.size - 1)
    if m < MIN_TAIL:
        return {"tail_m": int(max(m, 0)), "note": f"fewer than {MIN_TAIL} positive tail values"}
    x, xmin = top[:m], top[m]
    logs = np.log(x / xmin)
    if logs.sum() <= 0:
        return {"tail_m": m, "note": "tail values all equal"}
    alpha = m / logs.sum()  # Hill; power-law density exponent is 1 + alpha
    ll_pl = np.log(alpha / xmin) - (1 + alpha) * logs
    lam = 1.0 / np.mean(x - xmin) if np.mean(x - xmin) > 0 else float("inf")
    ll_exp = np.log(lam) - lam * (x - xmin)
    lx = np.log(x)

    log_xmin = math.log(xmin)

    def nll_lognormal(params):
        mu, log_sigma = params
        sigma = math.exp(log_sigma)
        tail_mass = _norm_sf((log_xmin - mu) / sigma)
        if tail_mass <= 0:
            return 1e300
        return -(_norm_logpdf(lx, mu, sigma) - lx - math.log(tail_mass)).sum()

    start = [float(lx.mean()), math.log(max(float(lx.std()), 1e-3))]
    fit = optimize.minimize(nll_lognormal, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-8})
    mu, sigma = float(fit.x[0]), math.exp(float(fit.x[1]))
    ll_ln = stats.norm.logpdf(lx, mu, sigma) - lx - math.log(max(stats.norm.sf((math.log(xmin) - mu) / sigma), 1e-300))
    r_pl_exp, p_pl_exp = _vuong(ll_pl, ll_exp)
    r_pl_ln, p_pl_ln = _vuong(ll_pl, ll_ln)
    r_ln_exp, p_ln_exp = _vuong(ll_ln, ll_exp)
    lls = {"power_law": float(ll_pl.sum()), "exponential": float(ll_exp.sum()), "lognormal": float(ll_ln.sum())}
    n_params = {"power_law": 1, "exponential": 1, "lognormal": 2}
    aic = {name: 2 * n_params[name] - 2 * ll for name, ll in lls.items()}
    beta, ll_weibull = stretched_exponential_fit(x, xmin)
    lr = max(0.0, 2 * (ll_weibull - lls["exponential"]))
    p_beta = float(stats.chi2.sf(lr, 1))
    return {
        "tail_m": m,
        "x_min": float(xmin),
        "hill_alpha": float(alpha),
        "exponential_lambda": float(lam),
        "lognormal_mu": mu,
        "lognormal_sigma": sigma,
        "loglik": lls,
        "R_powerlaw_vs_exponential": r_pl_exp,
        "p_powerlaw_vs_exponential": p_pl_exp,
        "R_powerlaw_vs_lognormal": r_pl_ln,
        "p_powerlaw_vs_lognormal": p_pl_ln,
        "R_lognormal_vs_exponential": r_ln_exp,
        "p_lognormal_vs_exponential": p_ln_exp,
        "aic": aic,
        "best_fit": _best_fit(aic, {("power_law", "exponential"): p_pl_exp, ("power_law", "lognormal"): p_pl_ln,
                                    ("lognormal", "exponential"): p_ln_exp}),
        "stretched_exp_beta": beta,
        "p_stretched_exp_vs_exponential": p_beta,
        "heavier_than_exponential": bool(beta < 1 and p_beta < 0.05),
    }


def describe(summary: TensorSummary, k: int) -> dict:
    """Statistics of one score distribution; ``k`` is the top-k size whose mass share is reported."""
    q = np.quantile(summary.sample, [0.5, 0.9, 0.99, 0.999]) if summary.sample.size else [float("nan")] * 4
    topk_mass = float(summary.top[: min(k, summary.top.size)].sum())
    m = int(min(max(MIN_TAIL, math.ceil(0.01 * summary.numel)), summary.top.size - 1))
    return {
        "numel": summary.numel,
        "zeros": summary.zeros,
        "mean": summary.mean,
        "std": summary.std,
        "max": summary.max,
        "max_over_mean": summary.max / summary.mean if summary.mean > 0 else float("nan"),
        "q50": float(q[0]),
        "q90": float(q[1]),
        "q99": float(q[2]),
        "q999": float(q[3]),
        "gini": gini(summary.sample),
        "excess_kurtosis": summary.excess_kurtosis,
        "topk": int(min(k, summary.numel)),
        "topk_mass_share": topk_mass / summary.total if summary.total > 0 else float("nan"),
        "topk_element_share": min(k, summary.numel) / summary.numel,
        **tail_fits(summary.top, m),
    }


def combine(summaries: list[TensorSummary], *, tail: int, seed: int = 0) -> TensorSummary:
    """The model-wide distribution from per-tensor summaries: exact moments and top values, pooled sample."""
    n = sum(s.numel for s in summaries)
    total = sum(s.total for s in summaries)
    mean = total / n
    # Exact pooled central moments from each part's mean, variance and fourth central moment.
    # Exact pooled central moments: for a part with mean offset d = mean_part − mean and central moments
    # c2, c3, c4:  E[(x−μ)²] = c2 + d²,  E[(x−μ)³] = c3 + 3d·c2 + d³,  E[(x−μ)⁴] = c4 + 4d·c3 + 6d²·c2 + d⁴.
    m2 = m3 = m4 = 0.0
    for s in summaries:
        d = s.mean - mean
        c2 = s.std ** 2
        c4 = (s.excess_kurtosis + 3.0) * c2 * c2 if c2 > 0 else 0.0
        m2 += s.numel * (c2 + d * d)
        m3 += s.numel * (s.m3 + 3 * d * c2 + d ** 3)
        m4 += s.numel * (c4 + 4 * d * s.m3 + 6 * d * d * c2 + d ** 4)
    m2, m3, m4 = m2 / n, m3 / n, m4 / n
    top = np.sort(np.concatenate([s.top for s in summaries]))[::-1][:tail]
    rng = np.random.default_rng(seed)
    parts = []
    for s in summaries:
        take = max(1, int(round(SAMPLE * s.numel / n)))
        parts.append(rng.choice(s.sample, size=min(take, s.sample.size), replace=s.sample.size < take))
    return TensorSummary(n, total, mean, math.sqrt(m2), m4 / (m2 * m2) - 3 if m2 > 0 else float("nan"),
                         max(s.max for s in summaries), sum(s.zeros for s in summaries), m3, top,
                         np.concatenate(parts))
