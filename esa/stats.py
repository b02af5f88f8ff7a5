"""Statistics of perturbation trials: per-condition descriptions, set-level tests (:mod:`esa.setstats`).

Notation: window w has T_w predicted tokens and baseline summed NLL N⁰_w; a trial (condition c, one weight set)
gives N^{c}_w. A trial *collapses* when any of its NLLs is not finite (e.g. a flipped exponent bit made a weight
inf). Every trial is one weight set: the super set once per seed, each of the ``--control-sets`` random_k sets
once, bottom_k once per seed.

Evidence (unit: the weight set; :mod:`esa.setstats`):
- per set ΔNLL = (Σ_w N_w − Σ_w N⁰_w) / Σ_w T_w nats per token, +∞ for a collapsed set (worst rank, counted);
- super vs random_k: the Monte Carlo rank p-value of the mean super ΔNLL (mean over its seeds' sets: one
  statistic, never independent samples) among the random_k sets, with the prediction-interval t-test on ΔNLL as
  a secondary, parametric check; random_k vs bottom_k: the same rank test of bottom_k's mean ΔNLL, lower tail,
  flagged "not informative" when bottom_k left every window's loss exactly unchanged in every trial;
- mean ΔNLL of each condition with a hierarchical bootstrap CI (sets, then windows), and the effect ratio
  mean ΔNLL(super) / mean ΔNLL(random_k) with that CI and the rank-inversion lower bound (ΔPPL ratio alongside).

Descriptions (unit: the window, *given these weight sets* — they say that these sets differ, not that sets
chosen like this differ from random sets in general):
- PPL of a trial exp(Σ_w N_w / Σ_w T_w); per condition the pooled per-window NLL N̄^c_w (mean over its finite
  trials), its ΔPPL = PPL − PPL⁰ with a window bootstrap CI (same resamples for every condition, percentile);
- paired per-window comparison, d_w = (N̄^a_w − N̄^b_w) / T_w: one-sided paired t-test and Wilcoxon signed-rank
  test (zeros split, "zsplit") of H1 mean d > 0, d_z = mean(d) / sd(d), bootstrap CI of mean(d).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from esa import setstats

WINDOW_UNIT = "window (given these weight sets)"


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


def _condition_entry(ts: list[Trial], tokens: np.ndarray, ppl0: float, mean0: float, boot: np.ndarray,
                     boot_ppl0: np.ndarray, baseline_nll: np.ndarray) -> tuple[dict, np.ndarray | None]:
    """Description of one condition: pooled ΔPPL with its window-only CI, and the per-set ΔNLL values."""
    finite = [t for t in ts if t.finite]
    per_set = setstats.delta_nll(np.array([t.nll for t in ts]), baseline_nll, tokens)
    per_seed = [{"seed": t.seed, "ppl": t.ppl, "delta_ppl": t.ppl - ppl0, "finite": t.finite,
                 "mean_nll": float(t.nll.sum() / tokens.sum()), "delta_nll_per_token": float(d),
                 "bits_flipped": t.bits_flipped, "n_weights": t.n_weights} for t, d in zip(ts, per_set)]
    set_ids = {t.set_id for t in ts if t.set_id}
    entry = {
        "n_trials": len(ts),
        "n_collapsed": len(ts) - len(finite),
        "n_distinct_sets": len(set_ids) if set_ids else None,
        "per_seed": per_seed,
        "mean_bits_flipped": _finite_mean([t.bits_flipped for t in ts]),
        "n_weights": ts[0].n_weights if ts else 0,
        "mean_delta_nll_per_set": float(np.mean(per_set)),
        "unchanged_in_every_trial": bool(all(np.array_equal(t.nll, baseline_nll) for t in ts)),
    }
    if not finite:
        entry.update(ppl=math.inf, delta_ppl=math.inf, note="every trial collapsed (non-finite loss)")
        return entry, None
    nbar = np.mean([t.nll for t in finite], axis=0)
    ppl = _ppl(nbar, tokens)
    deltas = [t.ppl - ppl0 for t in finite]
    entry.update(
        ppl=ppl,
        delta_ppl=ppl - ppl0,
        relative_delta_ppl=(ppl - ppl0) / ppl0,
        delta_nll_per_token=float(nbar.sum() / tokens.sum()) - mean0,
        delta_ppl_mean_over_seeds=float(np.mean(deltas)),
        delta_ppl_std_over_seeds=float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
        ci95_delta_ppl=_ci(np.exp(nbar[boot].sum(axis=1) / tokens[boot].sum(axis=1)) - boot_ppl0),
        ci95_delta_ppl_unit=WINDOW_UNIT,
    )
    if len(finite) < len(ts):
        entry["pooled_note"] = "pooled ΔPPL over the finite trials only; the set-level values count collapses"
    return entry, nbar


def summarize_trials(baseline: Trial, trials: list[Trial], *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """The statistics of the module docstring for every condition present in ``trials``.

    Every trial of a condition is one evaluated weight set: the super set once per seed (copies when the
    selection is not re-done per seed), each random_k control set once, bottom_k once per seed.
    """
    tokens = baseline.tokens.astype(np.float64)
    ppl0 = baseline.ppl
    mean0 = float(baseline.nll.sum() / tokens.sum())
    boot = bootstrap_indices(tokens.size, n_boot, seed)
    boot_ppl0 = np.exp(baseline.nll[boot].sum(axis=1) / tokens[boot].sum(axis=1))
    conditions: dict[str, dict] = {}
    pooled: dict[str, np.ndarray] = {}
    by_cond: dict[str, list[Trial]] = {}
    for t in trials:
        by_cond.setdefault(t.condition, []).append(t)
    for cond, ts in by_cond.items():
        ts.sort(key=lambda t: t.seed)
        conditions[cond], nbar = _condition_entry(ts, tokens, ppl0, mean0, boot, boot_ppl0, baseline.nll)
        if nbar is not None:
            pooled[cond] = nbar
    diffs = {c: np.array([t.nll - baseline.nll for t in ts]) for c, ts in by_cond.items()}
    reps = setstats.hierarchical_bootstrap(diffs, tokens, n_boot=n_boot, seed=seed)
    for cond, entry in conditions.items():
        single = len({t.set_id for t in by_cond[cond]}) == 1 and bool(by_cond[cond][0].set_id)
        entry["set_level"] = {
            "unit": setstats.UNIT, "n_sets": len(by_cond[cond]),
            "mean_delta_nll_per_token": entry["mean_delta_nll_per_set"],
            "ci95_mean_delta_nll_per_token": setstats.percentile_ci(reps[cond]),
            "ci_unit": ("window (given this one set: a single distinct set has no set-level spread)" if single
                        else "weight set, then window (hierarchical bootstrap)")}
    tests: dict[str, dict] = {}
    controls = (np.array([s["delta_nll_per_token"] for s in conditions["random_k"]["per_seed"]])
                if "random_k" in conditions else None)
    for a, b, greater in (("super", "random_k", True), ("random_k", "bottom_k", False)):
        if a not in conditions or b not in conditions:
            continue
        tested = a if greater else b
        x = conditions[tested]["mean_delta_nll_per_set"]
        test = {"unit": setstats.UNIT, "test": "monte_carlo_rank",
                "hypothesis": ("super hurts more than a random_k set" if greater
                               else "bottom_k hurts less than a random_k set"),
                "statistic_delta_nll_per_token": x, "n_control_sets": int(controls.size),
                "n_tested_trials": conditions[tested]["n_trials"],
                "p_value": setstats.rank_p_value(x, controls, greater=greater),
                "parametric": setstats.parametric_test(x, controls, greater=greater),
                "collapsed_sets_counted_as_worst": conditions[a]["n_collapsed"] + conditions[b]["n_collapsed"]}
        if controls.size < setstats.min_control_sets():
            test["note"] = (f"{controls.size} control sets: the rank p-value cannot reach "
                            f"{setstats.ALPHA:g} (needs {setstats.min_control_sets()})")
        if not greater and conditions[b]["unchanged_in_every_trial"]:
            test["not_informative"] = "bottom_k left every window's loss exactly unchanged in every trial"
        if a in pooled and b in pooled:
            test["per_window"] = {"unit": WINDOW_UNIT, **paired_comparison(pooled[a], pooled[b], tokens, boot)}
        tests[f"{a}_vs_{b}"] = test
    return {"baseline": {"ppl": ppl0, "mean_nll": mean0, "tokens": int(tokens.sum()), "n_windows": int(tokens.size)},
            "conditions": conditions, "tests": tests, "effect_ratio": effect_ratio(conditions, reps),
            "n_bootstrap": n_boot, "bootstrap_seed": seed, "statistics_version": 2}


def effect_ratio(conditions: dict, reps: dict[str, np.ndarray]) -> dict:
    """Mean ΔNLL(super) / mean ΔNLL(random_k) with its set-level bounds (see the module doc)."""
    if "super" not in conditions or "random_k" not in conditions:
        return {"value": float("nan"), "note": "needs both super and random_k"}
    x = conditions["super"]["mean_delta_nll_per_set"]
    controls = np.array([s["delta_nll_per_token"] for s in conditions["random_k"]["per_seed"]])
    value = float(setstats.ratio_samples(x, float(np.mean(controls))))
    out: dict = {"value": value, "of": "mean ΔNLL per token (nats)", "unit": setstats.UNIT,
                 "super_delta_nll_per_token": x, "random_k_mean_delta_nll_per_token": float(np.mean(controls)),
                 "lower_bound_95": setstats.ratio_lower_bound(x, controls),
                 "lower_bound_method": "rank-test inversion: super as one draw against the control-set distribution",
                 "ci95": setstats.percentile_ci(setstats.ratio_samples(reps["super"], reps["random_k"])),
                 "ci95_unit": "weight set, then window (hierarchical bootstrap)"}
    ds, dr = conditions["super"].get("delta_ppl"), conditions["random_k"].get("delta_ppl")
    if ds is not None and dr is not None:
        out["delta_ppl_ratio"] = float(setstats.ratio_samples(ds, dr)) if not (math.isinf(ds) and math.isinf(dr)) \
            else float("nan")
    if math.isnan(out["lower_bound_95"]) and controls.size < setstats.min_control_sets():
        out["note"] = (f"{controls.size} control sets: too few for a set-level bound "
                       f"(needs {setstats.min_control_sets()})")
    return out
