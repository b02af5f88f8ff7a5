"""Set-level inference: the weight set, not the evaluation window, is the unit of every test and interval.

The claim a perturbation experiment supports is about *sets of weights*: "weights selected like this hurt the
model more than random weights do". Windows are shared by every set, so per-window tests only say that *these*
sets differ; set-to-set variation is what decides the claim. Notation: a trial perturbs one weight set; its
effect is ΔNLL = (Σ_w N_w − Σ_w N⁰_w) / Σ_w T_w nats per predicted token (N_w summed NLL of window w, T_w its
predicted tokens, ⁰ the baseline). A *collapsed* trial (any non-finite NLL) has ΔNLL = +∞: the worst rank, counted
in every test and interval like any other set (never left out).

- Monte Carlo rank test (primary). x is the super statistic, c_1..c_N the ΔNLL of N independently drawn control
  sets. H1 "super hurts more": p = (1 + #{j: c_j ≥ x}) / (1 + N); H1 "x hurts less" (bottom_k below random_k):
  p = (1 + #{j: c_j ≤ x}) / (1 + N). Exact (P(p ≤ α) ≤ α) whenever x and the c_j are exchangeable under H0, for
  any distribution of set effects; ties count against H1. p ≤ 0.05 needs N ≥ 19.
- Re-selected super sets (``--stability-check``: one per seed, overlapping) enter as *one* statistic, the mean of
  their ΔNLL, ranked against single control sets; they are never treated as independent samples. The mean of m
  exchangeable draws is less spread than one draw, so the test stays valid (conservative when the sets differ,
  exact when they coincide).
- Parametric test (secondary): the prediction-interval t-test t = (x − mean(c)) / (sd(c)·√(1 + 1/N)), df = N − 1,
  on ΔNLL (which, unlike ΔPPL, is not an exponential of the effect). Assumes normal set effects; undefined when a
  set collapsed.
- Effect ratio R = mean ΔNLL(super) / mean ΔNLL(random_k). Its set-level lower bound inverts the rank test
  of "super is a draw from r × the control distribution": the largest r rejected at level α is
  x / c_[K+1], with c_[K+1] the (K+1)-th largest control effect and K = ⌊α(N+1)⌋ − 1 (∞ when c_[K+1] ≤ 0 < x).
  "R > 2" is met only when this bound exceeds 2, i.e. x > 2·c_[K+1]: a super set drawn like the controls, or like
  twice the controls, passes with probability ≤ α.
- Hierarchical bootstrap (descriptive intervals at the level of the claim): each replicate resamples the sets of
  each condition with replacement and, independently, the windows (one window resample shared by every
  condition, as windows are crossed with sets); statistic = mean over the resampled sets of their ΔNLL on the
  resampled windows. Percentile intervals. A condition with a single distinct set has no set-level spread to
  resample: its interval is "given this set".
- Holm's step-down correction over a family of p-values: p_(i) adjusted = max_{j ≤ i} min(1, (m − j + 1) p_(j)).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
UNIT = "weight set"


def delta_nll(nll: np.ndarray, baseline_nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """ΔNLL per token of each set: ``nll`` (sets × windows, summed NLL) against the baseline; collapsed → +∞."""
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    total = float(np.sum(tokens))
    out = (nll.sum(axis=1) - float(np.sum(baseline_nll))) / total
    out[~np.isfinite(nll).all(axis=1)] = math.inf
    return out


def rank_p_value(x, controls, *, greater: bool = True):
    """Monte Carlo rank p-value of ``x`` against ``controls`` (last axis); vectorised over leading axes."""
    controls = np.asarray(controls, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)[..., None]
    hits = (controls >= x) if greater else (controls <= x)
    p = (1.0 + hits.sum(axis=-1)) / (1.0 + controls.shape[-1])
    return float(p) if np.ndim(p) == 0 else p


def min_control_sets(alpha: float = ALPHA) -> int:
    """Fewest control sets for which the rank test can reach p ≤ alpha."""
    return math.ceil(1 / alpha) - 1


def ratio_lower_bound(x, controls, alpha: float = ALPHA):
    """Set-level lower confidence bound of the effect ratio (test inversion, see the module doc); vectorised.

    NaN when no ratio is rejected (x ≤ 0, or too many collapsed controls) or N < min_control_sets(alpha).
    """
    controls = np.sort(np.asarray(controls, dtype=np.float64), axis=-1)[..., ::-1]
    x = np.asarray(x, dtype=np.float64)
    k = math.floor(alpha * (controls.shape[-1] + 1) + 1e-9) - 1
    if k < 0:
        return np.full(x.shape, np.nan) if x.ndim else math.nan
    c = controls[..., k]
    with np.errstate(divide="ignore", invalid="ignore"):
        lb = np.where(c <= 0, np.inf, x / c)
    lb = np.where(np.isinf(c), np.nan, lb)  # more than K collapsed controls: nothing is rejected
    lb = np.where((x <= 0) | np.isnan(x), np.nan, lb)
    lb = np.where(np.isinf(x) & ~np.isinf(c), np.inf, lb)
    return float(lb) if lb.ndim == 0 else lb


def parametric_test(x: float, controls: np.ndarray, *, greater: bool = True) -> dict:
    """Prediction-interval t-test of one statistic against the control sets (secondary; see the module doc)."""
    c = np.asarray(controls, dtype=np.float64)
    nan = float("nan")
    if not math.isfinite(x) or not np.isfinite(c).all():
        return {"test": "prediction_interval_t", "p_value": nan, "note": "a set collapsed: use the rank test"}
    if c.size < 2 or float(np.ptp(c)) == 0:
        return {"test": "prediction_interval_t", "p_value": nan, "note": "fewer than two control sets or no spread"}
    t = (x - float(c.mean())) / (float(c.std(ddof=1)) * math.sqrt(1 + 1 / c.size))
    t = t if greater else -t
    return {"test": "prediction_interval_t", "t_statistic": t, "df": int(c.size - 1),
            "p_value": float(sps.t.sf(t, c.size - 1))}


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (NaN entries stay NaN and do not count in the family size)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval that tolerates ±∞ (order statistics, no interpolation between them)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return [float(lo), float(hi)]


def hierarchical_bootstrap(diffs: dict[str, np.ndarray], tokens: np.ndarray, *, n_boot: int, seed: int,
                           chunk: int = 1000) -> dict[str, np.ndarray]:
    """Replicates of the mean ΔNLL of each condition, resampling sets, then windows (see the module doc).

    ``diffs[c]``: sets × windows array of N_sw − N⁰_w (nats, summed per window); a row with a non-finite entry
    is a collapsed set (+∞ in every replicate that draws it).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    n_win = tokens.size
    rng_w = np.random.default_rng([seed, 0])
    rngs = {c: np.random.default_rng([seed, 1 + i]) for i, c in enumerate(diffs)}
    clean = {}
    for c, d in diffs.items():
        d = np.atleast_2d(np.asarray(d, dtype=np.float64))
        collapsed = ~np.isfinite(d).all(axis=1)
        clean[c] = (np.where(np.isfinite(d), d, 0.0), collapsed)
    out = {c: np.empty(n_boot) for c in diffs}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = rng_w.multinomial(n_win, np.full(n_win, 1 / n_win), size=b).astype(np.float64)  # window counts
        tok = w @ tokens
        for c, (d, collapsed) in clean.items():
            n_sets = d.shape[0]
            s = rngs[c].multinomial(n_sets, np.full(n_sets, 1 / n_sets), size=b).astype(np.float64)
            per_set = w @ d.T  # b × sets: Σ over resampled windows
            value = (s * per_set).sum(axis=1) / n_sets / tok
            value[(s[:, collapsed] > 0).any(axis=1)] = math.inf
            out[c][start:start + b] = value
    return out


def ratio_samples(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, with den ≤ 0 mapped to +∞ when num > 0 (super hurts, the control does not) and to −∞ otherwise."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r = np.where(den > 0, r, np.where(num > 0, np.inf, -np.inf))
    return np.where(np.isinf(num) & np.isinf(den), np.nan, r)
