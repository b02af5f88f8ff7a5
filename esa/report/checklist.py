"""The runbook's evidence checklist, evaluated on run files: each criterion met / not met / not measured.

Evidence that the selected weights are special (thresholds from the runbook):
- effect ratio ΔPPL(super) / ΔPPL(random_k) > 2 (pooled ΔPPL over seeds, :mod:`esa.stats`);
- the controls are ordered: ΔPPL(random_k) ≥ ΔPPL(bottom_k) (the least sensitive weights matter least);
- super vs random_k significant, p < 0.05: across seeds (set-to-set variation, :mod:`esa.stats`) and per
  window (paired t-test, conditional on the sets drawn);
- top-k Jaccard across seeds > 0.3 (``--stability-check``);
- cross-metric overlap@k > 50% (mean over pairs of profile runs with different metrics);
- heavy-tailed scores: the tail is heavier than exponential (likelihood-ratio test of :mod:`esa.tailstats`);
- sensible locations: under half of the top-k in embeddings / lm_head, and spread over more than one tensor.

Technical checks: finite baseline and scores, baseline better than a uniform guess (not collapsed), no leak
warning, no collapsed perturbation trial, every trial restored bit-exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from esa.evaluate import LEAK_ACCURACY, LEAK_PPL

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"
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

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _status(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (MET if ok else NOT_MET)


EFFECT = "effect ratio ΔPPL(super)/ΔPPL(random_k)"
ORDER = "ΔPPL(random_k) ≥ ΔPPL(bottom_k)"
WELCH = "super vs random_k across seeds, p"
PAIRED = "super vs random_k per window, paired t p"
JACCARD = "top-k Jaccard across seeds"
OVERLAP = "cross-metric overlap@k"
HEAVY = "heavy-tailed scores"
SPREAD = "top-k not confined to embeddings or one tensor"
# Where each evidence criterion comes from, for the "not measured" row when no run provides it.
NEEDS = {EFFECT: "a perturb run with random_k", ORDER: "a perturb run with random_k and bottom_k",
         WELCH: "a perturb run with random_k over two or more seeds", PAIRED: "a perturb run with random_k",
         JACCARD: "a run with --stability-check", OVERLAP: "profile runs of two or more metrics on one model "
         "with the same mode, k, data and tensors (pass them all to esa report)", HEAVY: "a profile run",
         SPREAD: "a profile run"}


def _positive_or_inf(x) -> bool:
    return x == math.inf or _finite(x)


def effect_ratio_status(results: dict) -> tuple[bool | None, str]:
    """Is ΔPPL(super) more than twice ΔPPL(random_k)?

    When random_k did not raise PPL the ratio is infinite or undefined; the criterion then holds only if super
    did raise it beyond noise (the lower end of its 95% CI above 0), and fails if super did not raise it either.
    """
    conds = results.get("conditions", {})
    if "super" not in conds or "random_k" not in conds:
        return None, ""
    ratio = results.get("effect_ratio", {}).get("value")
    note = results.get("effect_ratio", {}).get("note", "")
    ds, dr = conds["super"].get("delta_ppl"), conds["random_k"].get("delta_ppl")
    if _finite(ratio):
        return ratio > EFFECT_RATIO_MIN, note
    if ds == math.inf and _finite(dr):
        return True, note or "super collapsed, random_k did not"
    if _finite(ds) and _finite(dr) and dr <= 0:
        if ds <= 0:
            return False, "neither super nor random_k raised PPL"
        lower = (conds["super"].get("ci95_delta_ppl") or [float("nan")])[0]
        return (lower > 0 if _finite(lower) else None), f"random_k did not raise PPL; super ΔPPL CI lower end {lower:.3g}"
    return None, note


def perturb_criteria(label: str, results: dict) -> list[Criterion]:
    src = "results.json"
    conds = results.get("conditions", {})
    tests = results.get("tests", {})
    out = []

    ratio = results.get("effect_ratio", {}).get("value")
    ok, note = effect_ratio_status(results)
    out.append(Criterion("evidence", EFFECT, label, ratio, f"> {EFFECT_RATIO_MIN:g}", _status(ok), src, note))

    dr, db = conds.get("random_k", {}).get("delta_ppl"), conds.get("bottom_k", {}).get("delta_ppl")
    order_ok = None
    if _positive_or_inf(dr) and _positive_or_inf(db) and not (dr == math.inf and db == math.inf):
        order_ok = dr >= db  # a collapsed (infinite) control counts as the larger
    p_rb = tests.get("random_k_vs_bottom_k", {}).get("p_paired_t")
    out.append(Criterion("evidence", ORDER, label, None if order_ok is None else f"{dr:.4g} vs {db:.4g}",
                         "random_k ≥ bottom_k", _status(order_ok), src,
                         "" if p_rb is None else f"paired t p = {p_rb:.3g}"))

    sr = tests.get("super_vs_random_k", {})
    seeds = sr.get("across_seeds", {})
    p_seeds = seeds.get("p_value")
    out.append(Criterion("evidence", WELCH, label, p_seeds, f"< {P_MAX:g}",
                         _status(p_seeds < P_MAX if _finite(p_seeds) else None), src,
                         "; ".join(x for x in (seeds.get("test", ""), seeds.get("note", "")) if x)))
    paired = sr.get("p_paired_t")
    out.append(Criterion("evidence", PAIRED, label, paired,
                         f"< {P_MAX:g}", _status(paired < P_MAX if _finite(paired) else None), src,
                         sr.get("note", "conditional on the weight sets drawn (n = windows)")))

    if "stability" in results and results.get("source") != "from_profile":  # else the profile run reports it
        out.append(jaccard_criterion(label, results["stability"], src))

    collapsed = sum(c.get("n_collapsed", 0) for c in conds.values())
    trials = sum(c.get("n_trials", 0) for c in conds.values())
    out.append(Criterion("technical", "no collapsed trial (non-finite PPL)", label, collapsed,
                         "= 0", _status(collapsed == 0), src, f"{collapsed} of {trials} trials"))
    restored = results.get("restore_verified")
    out.append(Criterion("technical", "weights restored bit-exactly after every trial", label, restored,
                         "true", _status(None if restored is None else bool(restored)), src))
    return out


def jaccard_criterion(label: str, stability: dict, source: str) -> Criterion:
    """Mean pairwise top-k Jaccard; not measured when every seed saw the same windows (trivially 1)."""
    value = stability.get("mean_jaccard")
    if stability.get("warning"):
        return Criterion("evidence", JACCARD, label, value, f"> {JACCARD_MIN:g}", NOT_MEASURED, source,
                         stability["warning"])
    return Criterion("evidence", JACCARD, label, value, f"> {JACCARD_MIN:g}",
                     _status(value > JACCARD_MIN if _finite(value) else None), source)


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
        out.append(jaccard_criterion(label, stability, "stability.json"))
    max_ratio = metrics.get("max_over_mean")
    out.append(Criterion("technical", "finite scores", label, max_ratio, "finite max/mean",
                         _status(_finite(max_ratio)), src))
    return out


def overlap_criterion(comparison: dict) -> Criterion:
    value = comparison["mean_overlap_at_k"]
    pairs = ", ".join(f"{p['a']}~{p['b']}: {p['overlap_at_k']:.2f}" for p in comparison["pairs"])
    return Criterion("evidence", OVERLAP, "", value, f"> {OVERLAP_MIN:.0%}",
                     _status(value > OVERLAP_MIN if _finite(value) else None), "top_weights.csv",
                     f"mean over pairs: {pairs}")


def not_measured(criteria: list[Criterion]) -> list[Criterion]:
    """A "not measured" row for every evidence criterion that no run provided, saying what would provide it."""
    present = {c.name for c in criteria}
    thresholds = {EFFECT: f"> {EFFECT_RATIO_MIN:g}", ORDER: "random_k ≥ bottom_k", WELCH: f"< {P_MAX:g}",
                  PAIRED: f"< {P_MAX:g}", JACCARD: f"> {JACCARD_MIN:g}", OVERLAP: f"> {OVERLAP_MIN:.0%}",
                  HEAVY: "tail heavier than exponential", SPREAD: f"< {EDGE_SHARE_MAX:.0%} and > 1 tensor"}
    return [Criterion("evidence", name, "", None, thresholds[name], NOT_MEASURED, "", f"needs {need}")
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
    counts = {s: sum(c.status == s for c in criteria) for s in (MET, NOT_MET, NOT_MEASURED)}
    return {"criteria": [c.as_dict() for c in criteria], "counts": counts}
