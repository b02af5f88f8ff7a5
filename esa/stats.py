"""Statistics of perturbation trials: ΔPPL, paired per-window tests, bootstrap CIs, tests across seeds.

Notation: window w has T_w predicted tokens and baseline summed NLL N⁰_w; trial (condition c, seed s) gives
N^{c,s}_w. A trial *collapses* when any of its NLLs is not finite (e.g. a flipped exponent bit made a weight inf);
collapsed trials are counted apart and left out of every average.

- PPL of a trial: exp(Σ_w N_w / Σ_w T_w); ΔPPL = PPL − PPL⁰; relative ΔPPL = ΔPPL / PPL⁰;
  ΔNLL = mean NLL per token − baseline mean NLL per token.
- Per condition: mean and standard deviation of ΔPPL over its finite seeds, and the *pooled* per-window NLL
  N̄^c_w = mean over finite seeds of N^{c,s}_w, whose PPL gives the pooled ΔPPL with a bootstrap CI (windows
  resampled with replacement, the same resamples for every condition, percentile interval).
- Paired per-window comparison of conditions a vs b (super vs random_k, random_k vs bottom_k), with
  d_w = (N̄^a_w − N̄^b_w) / T_w: one-sided paired t-test and Wilcoxon signed-rank test (zeros split between the
  signs, "zsplit") of "a hurts more than b" (H1: mean d > 0), effect size d_z = mean(d) / sd(d), bootstrap CI of
  mean(d). n = windows, which is where the power is — but these tests are *conditional on the weight sets
  drawn*: they say that these sets differ, not that top-k sets beat random sets in general. Set-to-set variation
  is what the test across seeds measures.
- Across seeds, on the per-seed ΔPPL values (one-sided, H1: ΔPPL_a > ΔPPL_b): Welch's t-test when both
  conditions drew a different weight set in each seed. When one condition used a single set in every seed (the
  top-k without ``--stability-check``: its seeds are copies or noise replicates of one set), its seed mean is one
  draw x₀ of the set distribution, and the test is the prediction-interval t-test
  t = (x₀ − mean(b)) / (sd(b)·√(1 + 1/n_b)), df = n_b − 1 (mirrored when b is the single set). Undefined (NaN,
  with the reason) with fewer than two seeds or no spread at all. Three seeds give this test little power.
- Effect ratio ΔPPL(super) / ΔPPL(random_k) on the pooled ΔPPL, with a bootstrap CI over the resamples where
  random_k's ΔPPL is positive (the share left out is reported; above 2.5% the interval has no upper end);
  infinite when random_k does not raise PPL at all.
- Collapsed trials are left out of the averages and tests; every test and the ratio say how many were.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass
class Trial:
    condition: str
    seed: int
    nll: np.ndarray  # summed NLL per window
    tokens: np.ndarray
    bits_flipped: int = 0
    n_weights: int = 0
    set_id: str = ""  # identity of the weight set (e.g. its hash); equal ids = the same set in several seeds

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.nll).all())

    @property
    def ppl(self) -> float:
        return _ppl(self.nll, self.tokens)


def _ppl(nll: np.ndarray, tokens: np.ndarray) -> float:
    mean = float(np.sum(nll) / np.sum(tokens))
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf


def _finite_mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def bootstrap_indices(n_windows: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_windows, size=(n_boot, n_windows))


def paired_comparison(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, boot: np.ndarray) -> dict:
    """a, b: pooled per-window NLL of two conditions; tests H1 'a hurts more than b' (see module doc)."""
    d = (a - b) / tokens
    out = {"n_windows": int(d.size), "mean_window_delta_nll_per_token": float(d.mean()) if d.size else math.nan,
           "n_zero_differences": int(np.sum(d == 0))}
    nan = float("nan")
    if d.size < 2:
        out.update(p_paired_t=nan, p_wilcoxon=nan, effect_size_dz=nan, note="fewer than two windows: no test")
        return out
    if np.all(d == d[0]):
        # Every window moved by exactly the same amount: the t statistic is undefined; the exact sign test is not.
        p_sign = 0.5 ** d.size if d[0] > 0 else (1.0 if d[0] < 0 else nan)
        out.update(p_paired_t=nan, p_wilcoxon=p_sign, effect_size_dz=nan,
                   ci95_mean_window_delta_nll_per_token=[float(d[0])] * 2,
                   note="differences identical in every window: t-test undefined; p_wilcoxon is the exact sign test")
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = sps.ttest_1samp(d, 0.0, alternative="greater")
        try:
            p_w = float(sps.wilcoxon(d, zero_method="zsplit", alternative="greater").pvalue)
        except ValueError:  # all differences zero
            p_w = nan
    sd = float(d.std(ddof=1))
    out.update(
        t_statistic=float(t.statistic),
        p_paired_t=float(t.pvalue),
        p_wilcoxon=p_w,
        effect_size_dz=float(d.mean() / sd) if sd > 0 else float("inf"),
        ci95_mean_window_delta_nll_per_token=_ci(d[boot].mean(axis=1)),
    )
    return out


def _spread(x: list[float]) -> float:
    return float(np.ptp(x)) if len(x) else 0.0  # exactly 0 for copies (np.var of copies can be 1e-34)


def across_seeds(a: list[float], b: list[float], *, a_single_set: bool = False, b_single_set: bool = False) -> dict:
    """One-sided test of per-seed ΔPPL values, H1: a > b (see the module docstring for which test runs)."""
    nan = float("nan")
    if a_single_set and b_single_set:
        return {"test": "none", "p_value": nan, "note": "both conditions used one weight set: no set-level test"}
    if a_single_set or b_single_set:
        single, sample, sign = (a, b, 1.0) if a_single_set else (b, a, -1.0)
        if len(single) < 1 or len(sample) < 2:
            return {"test": "prediction_interval", "p_value": nan, "note": "fewer than two finite seeds"}
        if _spread(sample) == 0:
            return {"test": "prediction_interval", "p_value": nan, "note": "no spread across seeds"}
        x0 = float(np.mean(single))
        t = sign * (x0 - float(np.mean(sample))) / (float(np.std(sample, ddof=1)) * math.sqrt(1 + 1 / len(sample)))
        return {"test": "prediction_interval", "t_statistic": t, "df": len(sample) - 1,
                "p_value": float(sps.t.sf(t, len(sample) - 1)),
                "note": "one condition used a single weight set in every seed: compared as one draw against the "
                        "other's spread"}
    if len(a) < 2 or len(b) < 2:
        return {"test": "welch", "p_value": nan, "note": "fewer than two finite seeds per condition"}
    if _spread(a) == 0 and _spread(b) == 0:
        return {"test": "welch", "p_value": nan, "note": "no spread across seeds in either condition"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sps.ttest_ind(a, b, equal_var=False, alternative="greater")
    return {"test": "welch", "t_statistic": float(r.statistic), "p_value": float(r.pvalue)}


def summarize_trials(baseline: Trial, trials: list[Trial], *, n_boot: int = 10_000, seed: int = 0,
                     comparisons: tuple[tuple[str, str], ...] = (("super", "random_k"), ("random_k", "bottom_k"))
                     ) -> dict:
    """The statistics of the module docstring for every condition present in ``trials``."""
    tokens = baseline.tokens.astype(np.float64)
    ppl0 = baseline.ppl
    mean0 = float(baseline.nll.sum() / tokens.sum())
    boot = bootstrap_indices(tokens.size, n_boot, seed)
    boot_ppl0 = np.exp(baseline.nll[boot].sum(axis=1) / tokens[boot].sum(axis=1))
    conditions: dict[str, dict] = {}
    pooled: dict[str, np.ndarray] = {}
    boot_delta: dict[str, np.ndarray] = {}
    for cond in dict.fromkeys(t.condition for t in trials):
        ts = sorted((t for t in trials if t.condition == cond), key=lambda t: t.seed)
        finite = [t for t in ts if t.finite]
        per_seed = [{"seed": t.seed, "ppl": t.ppl, "delta_ppl": t.ppl - ppl0, "finite": t.finite,
                     "mean_nll": float(t.nll.sum() / tokens.sum()), "bits_flipped": t.bits_flipped,
                     "n_weights": t.n_weights} for t in ts]
        deltas = [t.ppl - ppl0 for t in finite]
        set_ids = {t.set_id for t in ts if t.set_id}
        entry = {
            "n_trials": len(ts),
            "n_collapsed": len(ts) - len(finite),
            "n_distinct_sets": len(set_ids) if set_ids else None,
            "per_seed": per_seed,
            "mean_bits_flipped": _finite_mean([t.bits_flipped for t in ts]),
            "n_weights": ts[0].n_weights if ts else 0,
        }
        if finite:
            nbar = np.mean([t.nll for t in finite], axis=0)
            pooled[cond] = nbar
            ppl = _ppl(nbar, tokens)
            bd = np.exp(nbar[boot].sum(axis=1) / tokens[boot].sum(axis=1)) - boot_ppl0
            boot_delta[cond] = bd
            entry.update(
                ppl=ppl,
                delta_ppl=ppl - ppl0,
                relative_delta_ppl=(ppl - ppl0) / ppl0,
                delta_nll_per_token=float(nbar.sum() / tokens.sum()) - mean0,
                delta_ppl_mean_over_seeds=float(np.mean(deltas)),
                delta_ppl_std_over_seeds=float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
                ci95_delta_ppl=_ci(bd),
            )
        else:
            entry.update(ppl=math.inf, delta_ppl=math.inf, note="every trial collapsed (non-finite loss)")
        conditions[cond] = entry
    tests = {}
    for a, b in comparisons:
        if a not in conditions or b not in conditions:
            continue
        key = f"{a}_vs_{b}"
        if a in pooled and b in pooled:
            test = paired_comparison(pooled[a], pooled[b], tokens, boot)
        else:
            test = {"note": "a condition collapsed in every trial: paired tests undefined"}
        da = [s["delta_ppl"] for s in conditions[a]["per_seed"] if s["finite"]]
        db = [s["delta_ppl"] for s in conditions[b]["per_seed"] if s["finite"]]
        test["across_seeds"] = across_seeds(da, db, a_single_set=conditions[a]["n_distinct_sets"] == 1,
                                            b_single_set=conditions[b]["n_distinct_sets"] == 1)
        collapsed = conditions[a]["n_collapsed"] + conditions[b]["n_collapsed"]
        if collapsed:
            test["collapsed_trials_left_out"] = collapsed
        tests[key] = test
    ratio = effect_ratio(conditions, boot_delta)
    collapsed = sum(conditions[c]["n_collapsed"] for c in ("super", "random_k") if c in conditions)
    if collapsed:
        ratio["collapsed_trials_left_out"] = collapsed
    return {"baseline": {"ppl": ppl0, "mean_nll": mean0, "tokens": int(tokens.sum()), "n_windows": int(tokens.size)},
            "conditions": conditions, "tests": tests, "effect_ratio": ratio, "n_bootstrap": n_boot,
            "bootstrap_seed": seed}


def effect_ratio(conditions: dict, boot_delta: dict[str, np.ndarray]) -> dict:
    """ΔPPL(super) / ΔPPL(random_k) with a bootstrap CI (see module doc)."""
    if "super" not in conditions or "random_k" not in conditions:
        return {"value": float("nan"), "note": "needs both super and random_k"}
    ds, dr = conditions["super"].get("delta_ppl"), conditions["random_k"].get("delta_ppl")
    if ds is None or dr is None or not math.isfinite(dr):
        return {"value": float("nan"), "note": "random_k collapsed"}
    if not math.isfinite(ds):
        return {"value": math.inf, "note": "super collapsed (infinite ΔPPL)"}
    out: dict = {"super_delta_ppl": ds, "random_k_delta_ppl": dr}
    if dr <= 0:
        out.update(value=math.inf if ds > 0 else float("nan"), note="random_k did not raise PPL")
        return out
    out["value"] = ds / dr
    if "super" in boot_delta and "random_k" in boot_delta:
        positive = boot_delta["random_k"] > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            r = boot_delta["super"][positive] / boot_delta["random_k"][positive]
        dropped = 1.0 - float(positive.mean())
        out["ci95"] = _ci(r)
        out["ci95_resamples_left_out"] = dropped
        if dropped > 0.025:  # random_k's own CI reaches 0: the ratio has no upper bound
            out["ci95"][1] = math.inf
            out["ci95_note"] = (f"random_k's ΔPPL was ≤ 0 in {dropped:.1%} of the resamples: the upper end of the "
                                "ratio's interval is unbounded")
    return out
