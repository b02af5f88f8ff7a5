"""The runbook's evidence checklist, evaluated on run files: each criterion met / not met / not measured
(or not applicable / not informative), with the unit of inference of every row.

Evidence that the selected weights are special; every row is built so that chance alone meets it rarely:
- effect ratio mean ΔNLL(super) / mean ΔNLL(random_k) > 2, met only when its set-level 95% lower bound exceeds 2
  (unit: weight set; :mod:`esa.setstats`: the rank-test inversion treating the super set as one draw);
- super vs random_k: Monte Carlo rank p-value of the super set's ΔNLL among the random_k control sets (unit:
  weight set); the per-window paired t / Wilcoxon tests are descriptions *given these sets* (in the row's detail
  and the tests table), not evidence;
- control ordering: bottom_k's ΔNLL ranked against the random_k control sets, lower tail (unit: weight set);
  "not informative" when bottom_k left every window's loss exactly unchanged in every trial (unused weights);
- p-value rows are Holm-corrected over the *family* of every p-value row of the report (all runs together):
  met iff the adjusted p ≤ 0.05; the family is named in each row's detail;
- top-k Jaccard across seeds > max(0.3, chance level): the chance level f / (2 − f) is the expected Jaccard of
  two random subsets holding a share f of the windows each (1/3 at the default f = 0.5); "not applicable" for a
  data-independent metric (magnitude: every seed selects the same set by construction);
- cross-metric overlap@k > 50%: the mean over pairs of the runbook's gradient metrics, every pair listed with the
  factors its metrics share by construction (magnitude~act_mag share |w|);
- heavy-tailed scores: the tail is heavier than exponential (:mod:`esa.tailstats`);
- sensible locations: under half of the top-k in embeddings / lm_head, and spread over more than one tensor.

Technical checks: finite baseline and scores, baseline better than a uniform guess (not collapsed), no leak
warning, no collapsed perturbation trial, every trial restored bit-exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from esa.evaluate import LEAK_ACCURACY, LEAK_PPL
from esa.setstats import holm

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"
NOT_APPLICABLE, NOT_INFORMATIVE = "not applicable", "not informative"
STATUSES = (MET, NOT_MET, NOT_MEASURED, NOT_APPLICABLE, NOT_INFORMATIVE)
EFFECT_RATIO_MIN = 2.0
P_MAX = 0.05
JACCARD_MIN = 0.3
OVERLAP_MIN = 0.5
EDGE_SHARE_MAX = 0.5


@dataclass
class Criterion:
    group: str  # "evidence" or "technical"
    name: str
    run: str  # label of the run the value comes from ("" for cross-run criteria)
    value: float | bool | str | None
    threshold: str
    status: str
    source: str  # file the value was read from, relative to the run
    detail: str = ""
    unit: str = ""  # unit of inference of the value ("weight set", "window", ...)
    p_value: float | None = None  # raw p-value of a p-value row (Holm-corrected across the report's family)
    p_holm: float | None = None
    p_floor: float | None = None  # smallest p-value the row's test can give (a rank test: 1 / (1 + N))

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _status(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (MET if ok else NOT_MET)


EFFECT = "effect ratio ΔNLL(super)/ΔNLL(random_k)"
ORDER = "control ordering: bottom_k below random_k sets, rank p"
RANK = "super vs random_k control sets, rank p"
JACCARD = "top-k Jaccard across seeds"
OVERLAP = "cross-metric overlap@k (gradient metrics)"
HEAVY = "heavy-tailed scores"
SPREAD = "top-k not confined to embeddings or one tensor"
SET = "weight set"
# Where each evidence criterion comes from, for the "not measured" row when no run provides it.
NEEDS = {EFFECT: "a perturb run with random_k control sets", RANK: "a perturb run with random_k control sets",
         ORDER: "a perturb run with random_k and bottom_k", JACCARD: "a run with --stability-check",
         OVERLAP: "profile runs of two or more gradient metrics on one model with the same mode, k, data and "
         "tensors (pass them all to esa report)", HEAVY: "a profile run", SPREAD: "a profile run"}
THRESHOLDS = {EFFECT: f"set-level 95% lower bound > {EFFECT_RATIO_MIN:g}", RANK: f"Holm-adjusted p ≤ {P_MAX:g}",
              ORDER: f"Holm-adjusted p ≤ {P_MAX:g}", JACCARD: f"> max({JACCARD_MIN:g}, chance level)",
              OVERLAP: f"> {OVERLAP_MIN:.0%}", HEAVY: "tail heavier than exponential",
              SPREAD: f"< {EDGE_SHARE_MAX:.0%} and > 1 tensor"}
# The runbook's gradient metrics (the overlap row), and the factors each metric's score is built from.
GRADIENT_METRICS = ("grad_x_weight", "grad_squared", "hutchinson_diag", "hessian_diag")
FACTORS = {"magnitude": {"|w|"}, "act_mag": {"|w|", "‖x‖"}, "grad_x_weight": {"|w|", "g"}, "grad_squared": {"g"},
           "hutchinson_diag": {"H"}, "hessian_diag": {"H"}}
DATA_INDEPENDENT = ("magnitude",)
OLD_RUN = "the run predates set-level statistics (rerun esa perturb to measure it)"


def _fmt_p(p) -> str:
    return f"{p:.3g}" if _finite(p) else "n/a"


def effect_ratio_criterion(label: str, results: dict) -> Criterion:
    """Met only when the set-level 95% lower bound of the ratio exceeds 2 (see the module doc)."""
    ratio = results.get("effect_ratio", {})
    value, src = ratio.get("value"), "results.json"
    if "random_k" not in results.get("conditions", {}) or "super" not in results.get("conditions", {}):
        return Criterion("evidence", EFFECT, label, value, THRESHOLDS[EFFECT], NOT_MEASURED, src,
                         "needs super and random_k", SET)
    if "lower_bound_95" not in ratio:
        return Criterion("evidence", EFFECT, label, value, THRESHOLDS[EFFECT], NOT_MEASURED, src, OLD_RUN, SET)
    lb = ratio["lower_bound_95"]
    ci = ratio.get("ci95") or [math.nan, math.nan]
    detail = (f"set-level lower bound {lb:.3g} ({ratio.get('lower_bound_method', '')}); 95% CI sets→windows "
              f"[{ci[0]:.3g}, {ci[1]:.3g}]; ΔPPL ratio {ratio.get('delta_ppl_ratio', math.nan):.3g} (description)")
    if ratio.get("note"):
        return Criterion("evidence", EFFECT, label, value, THRESHOLDS[EFFECT], NOT_MEASURED, src,
                         f"{ratio['note']}; {detail}", SET)
    ok = lb > EFFECT_RATIO_MIN if not (isinstance(lb, float) and math.isnan(lb)) else False
    return Criterion("evidence", EFFECT, label, value, THRESHOLDS[EFFECT], _status(ok), src, detail, SET)


def _rank_criterion(name: str, label: str, test: dict | None, describe: str) -> Criterion:
    src = "results.json"
    if test is None:
        return Criterion("evidence", name, label, None, THRESHOLDS[name], NOT_MEASURED, src, f"needs {NEEDS[name]}",
                         SET)
    if test.get("not_informative") and "p_value" not in test:
        return Criterion("evidence", name, label, None, THRESHOLDS[name], NOT_INFORMATIVE, src,
                         test["not_informative"], SET)
    if "p_value" not in test or "n_control_sets" not in test:
        return Criterion("evidence", name, label, None, THRESHOLDS[name], NOT_MEASURED, src, OLD_RUN, SET)
    p = test["p_value"]
    parts = [f"rank test over {test['n_control_sets']} control sets (floor {1 / (1 + test['n_control_sets']):.3g})",
             f"parametric (secondary) p = {_fmt_p(test.get('parametric', {}).get('p_value'))}", describe]
    window = test.get("per_window", {})
    if window:
        parts.append(f"per window given these sets (description): paired t p = {_fmt_p(window.get('p_paired_t'))}, "
                     f"Wilcoxon p = {_fmt_p(window.get('p_wilcoxon'))}")
    if test.get("collapsed_sets_counted_as_worst"):
        parts.append(f"{test['collapsed_sets_counted_as_worst']} collapsed sets counted as the worst rank")
    if test.get("note"):
        parts.append(test["note"])
    if test.get("not_informative"):
        return Criterion("evidence", name, label, p, THRESHOLDS[name], NOT_INFORMATIVE, src,
                         "; ".join([test["not_informative"], *parts]), SET)
    return Criterion("evidence", name, label, p, THRESHOLDS[name], NOT_MEASURED, src, "; ".join(parts), SET,
                     p_value=p if _finite(p) else None, p_floor=1 / (1 + test["n_control_sets"]))


def perturb_criteria(label: str, results: dict, config: dict | None = None) -> list[Criterion]:
    """Evidence and technical rows of one perturb run; p-value rows get their status from :func:`apply_holm`."""
    src = "results.json"
    conds = results.get("conditions", {})
    tests = results.get("tests", {})
    out = [effect_ratio_criterion(label, results)]
    if "random_k" in conds:
        out.append(_rank_criterion(RANK, label, tests.get("super_vs_random_k"),
                                   "re-selected super sets enter as their mean"))
    if "bottom_k" in conds and "random_k" in conds:
        test = tests.get("random_k_vs_bottom_k")
        seeds = conds["bottom_k"].get("per_seed") or []
        if seeds and all(x.get("delta_ppl") == 0 for x in seeds):  # also for runs written before the flag
            test = dict(test or {"n_control_sets": 0},
                        not_informative="bottom_k's ΔPPL is exactly 0 in every seed: it tests nothing")
        out.append(_rank_criterion(ORDER, label, test, "lower tail"))
    if "stability" in results and results.get("source") != "from_profile":  # else the profile run reports it
        sel = (config or {}).get("selection", {})
        out.append(jaccard_criterion(label, results["stability"], src, metric=sel.get("metric"),
                                     fraction=(config or {}).get("stability_fraction")))

    collapsed = sum(c.get("n_collapsed", 0) for c in conds.values())
    trials = sum(c.get("n_trials", 0) for c in conds.values())
    out.append(Criterion("technical", "no collapsed trial (non-finite PPL)", label, collapsed,
                         "= 0", _status(collapsed == 0), src, f"{collapsed} of {trials} trials"))
    restored = results.get("restore_verified")
    out.append(Criterion("technical", "weights restored bit-exactly after every trial", label, restored,
                         "true", _status(None if restored is None else bool(restored)), src))
    return out


def apply_holm(criteria: list[Criterion]) -> list[Criterion]:
    """Holm-correct every evidence row that carries a p-value, as one family, and set its status."""
    rows = [c for c in criteria if c.group == "evidence" and c.p_value is not None]
    adjusted = holm([c.p_value for c in rows])
    family = f"Holm family: {len(rows)} p-value rows of this report ({', '.join(sorted({c.name for c in rows}))})"
    for c, q in zip(rows, adjusted):
        c.p_holm = q
        c.status = _status(q <= P_MAX)
        floor = c.p_floor * len(rows) if c.p_floor else 0.0
        reach = (f"; with {len(rows)} rows this row cannot reach {P_MAX:g} (its smallest p is {c.p_floor:.3g}: "
                 f"use at least {math.ceil(len(rows) / P_MAX) - 1} control sets)" if floor > P_MAX else "")
        c.detail = f"Holm-adjusted p = {q:.3g}; {family}{reach}; {c.detail}"
    return criteria


def jaccard_chance(fraction: float | None) -> float:
    """Expected Jaccard of two random subsets holding a share ``fraction`` of the windows each: f / (2 − f)."""
    f = 0.5 if fraction is None else float(fraction)
    return f / (2 - f)


def jaccard_criterion(label: str, stability: dict, source: str, *, metric: str | None = None,
                      fraction: float | None = None) -> Criterion:
    """Mean pairwise top-k Jaccard against max(0.3, chance level); not applicable for data-independent metrics,
    not measured when every seed saw the same windows (trivially 1)."""
    value = stability.get("mean_jaccard")
    fraction = stability.get("fraction", fraction)
    chance = jaccard_chance(fraction)
    bar = max(JACCARD_MIN, chance)
    threshold = f"> {bar:.3g} (max of {JACCARD_MIN:g} and chance {chance:.3g} at window fraction {fraction or 0.5:g})"
    if metric in DATA_INDEPENDENT:
        return Criterion("evidence", JACCARD, label, value, threshold, NOT_APPLICABLE, source,
                         f"{metric} does not depend on the data: every seed selects the same set by construction")
    if stability.get("warning"):
        return Criterion("evidence", JACCARD, label, value, threshold, NOT_MEASURED, source, stability["warning"])
    return Criterion("evidence", JACCARD, label, value, threshold,
                     _status(value > bar if _finite(value) else None), source,
                     "a description of selection stability, not a significance test", "seed pair")


def profile_criteria(label: str, metrics: dict, stability: dict | None) -> list[Criterion]:
    src = "metrics.json"
    out = []
    heavy = metrics.get("heavier_than_exponential")
    alpha = metrics.get("hill_alpha")
    detail = (f"best fit {metrics.get('best_tail_fit')}, Hill α {alpha:.3g}, excess kurtosis "
              f"{metrics.get('excess_kurtosis', float('nan')):.3g}" if _finite(alpha) else
              f"best fit {metrics.get('best_tail_fit')}")
    out.append(Criterion("evidence", HEAVY, label, heavy, "tail heavier than exponential",
                         _status(None if heavy is None else bool(heavy)), "score_stats.json", detail))
    edge = metrics.get("topk_share_embed", 0.0) + metrics.get("topk_share_lm_head", 0.0)
    tensors = metrics.get("tensors_with_topk")
    spread_ok = None if tensors is None else (edge < EDGE_SHARE_MAX and tensors > 1)
    out.append(Criterion("evidence", SPREAD, label,
                         f"{edge:.1%} in embed/lm_head, {tensors} tensors", f"< {EDGE_SHARE_MAX:.0%} and > 1 tensor",
                         _status(spread_ok), "metrics.json",
                         f"largest single tensor holds {metrics.get('largest_single_tensor_share', float('nan')):.1%}"))
    if stability is not None:
        out.append(jaccard_criterion(label, stability, "stability.json", metric=metrics.get("metric")))
    max_ratio = metrics.get("max_over_mean")
    out.append(Criterion("technical", "finite scores", label, max_ratio, "finite max/mean",
                         _status(_finite(max_ratio)), src))
    return out


def shared_factors(a: str | None, b: str | None) -> set[str]:
    """Factors two metrics' scores share by construction (e.g. |w| for magnitude and act_mag)."""
    return FACTORS.get(a or "", set()) & FACTORS.get(b or "", set())


def overlap_criterion(comparison: dict) -> Criterion:
    """Mean overlap@k over the pairs of gradient metrics; every pair listed with the factors it shares."""
    listed, gradient = [], []
    for p in comparison["pairs"]:
        ma, mb = p.get("a_metric"), p.get("b_metric")
        shared = shared_factors(ma, mb)
        listed.append(f"{p['a']}~{p['b']}: {p['overlap_at_k']:.2f}"
                      + (f" (share {', '.join(sorted(shared))} by construction)" if shared else ""))
        if ma in GRADIENT_METRICS and mb in GRADIENT_METRICS:
            gradient.append(p["overlap_at_k"])
    value = sum(gradient) / len(gradient) if gradient else None
    detail = f"{len(gradient)} gradient-metric pairs; every pair: " + "; ".join(listed)
    return Criterion("evidence", OVERLAP, "", value, THRESHOLDS[OVERLAP],
                     _status(value > OVERLAP_MIN if _finite(value) else None), "top_weights.csv",
                     detail if gradient else f"needs {NEEDS[OVERLAP]}; " + detail, "metric pair")


def not_measured(criteria: list[Criterion]) -> list[Criterion]:
    """A "not measured" row for every evidence criterion that no run provided, saying what would provide it."""
    present = {c.name for c in criteria}
    return [Criterion("evidence", name, "", None, THRESHOLDS[name], NOT_MEASURED, "", f"needs {need}")
            for name, need in NEEDS.items() if name not in present]


def baseline_criteria(label: str, metrics: dict) -> list[Criterion]:
    src = "metrics.json"
    ppl, uniform = metrics.get("ppl"), metrics.get("uniform_guess_ppl")
    warnings = metrics.get("leak_warnings", [])
    return [
        Criterion("technical", "finite baseline loss", label, metrics.get("mean_nll"), "finite",
                  _status(_finite(metrics.get("mean_nll"))), src),
        Criterion("technical", "baseline not collapsed (PPL below uniform guess)", label, ppl,
                  f"< {uniform}" if uniform else "< vocabulary size",
                  _status(ppl < uniform if _finite(ppl) and uniform else None), src),
        Criterion("technical", "baseline not leaky (no label-leak signature)", label,
                  f"PPL {ppl:.4g}, accuracy {metrics.get('accuracy', float('nan')):.3f}" if _finite(ppl) else None,
                  f"PPL ≥ {LEAK_PPL:g} and accuracy ≤ {LEAK_ACCURACY:g}", _status(not warnings), src, "; ".join(warnings)),
    ]


def summarize(criteria: list[Criterion]) -> dict:
    counts = {s: sum(c.status == s for c in criteria) for s in STATUSES}
    return {"criteria": [c.as_dict() for c in criteria], "counts": counts}
