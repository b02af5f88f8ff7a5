"""esa.stats edge cases and calibration: the tests say 5% when nothing differs, and never 0 by accident."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from esa.stats import Trial, across_seeds, bootstrap_indices, paired_comparison, summarize_trials


def test_paired_comparison_edge_cases():
    boot = bootstrap_indices(40, 200, 0)
    tokens = np.full(40, 63.0)
    # One window: no test (not p = 0).
    one = paired_comparison(np.array([5.0]), np.array([4.0]), np.array([63.0]), bootstrap_indices(1, 10, 0))
    assert math.isnan(one["p_paired_t"]) and "fewer than two windows" in one["note"]
    # Differences far below 1e-8 per token that still vary are tested, not declared constant.
    rng = np.random.default_rng(0)
    base = rng.normal(200, 20, 40)
    shifted = base + rng.normal(0, 1e-7, 40)
    tiny = paired_comparison(shifted, base, tokens, boot)
    d = (shifted - base) / tokens
    assert "note" not in tiny and 0 < tiny["p_paired_t"] < 1
    assert tiny["p_paired_t"] == pytest.approx(sps.ttest_1samp(d, 0, alternative="greater").pvalue, rel=1e-9)
    # Every window moved by exactly the same amount: t undefined, exact sign test 2^-n.
    base = np.round(base)  # integers, so that base + 63 - base is exactly 63 everywhere
    const = paired_comparison(base + 63.0, base, tokens, boot)
    assert math.isnan(const["p_paired_t"]) and const["p_wilcoxon"] == pytest.approx(0.5 ** 40)
    assert const["n_zero_differences"] == 0
    assert paired_comparison(base - 63.0, base, tokens, boot)["p_wilcoxon"] == 1.0


def test_paired_p_value_equals_a_one_sample_t_test_on_per_token_differences():
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 64, 30).astype(float)
    a, b = rng.normal(200, 20, 30), rng.normal(199, 20, 30)
    out = paired_comparison(a, b, tokens, bootstrap_indices(30, 100, 0))
    d = (a - b) / tokens
    assert out["p_paired_t"] == pytest.approx(sps.ttest_1samp(d, 0, alternative="greater").pvalue, rel=1e-12)
    assert out["effect_size_dz"] == pytest.approx(d.mean() / d.std(ddof=1))


@pytest.mark.parametrize("p_key,noise", [("p_paired_t", "normal"), ("p_wilcoxon", "normal"),
                                         ("p_paired_t", "t3"), ("p_wilcoxon", "t3")])
def test_paired_tests_are_calibrated_under_the_null(p_key, noise):
    """No difference between conditions: p < 0.05 about 5% of the time, for light and heavy-tailed noise."""
    rng = np.random.default_rng(2)
    tokens = np.full(40, 63.0)
    boot = bootstrap_indices(40, 10, 0)
    draw = (lambda: rng.normal(0, 3, 40)) if noise == "normal" else (lambda: rng.standard_t(3, 40))
    hits = 0
    for _ in range(400):
        base = rng.normal(200, 20, 40)
        hits += paired_comparison(base + draw(), base + draw(), tokens, boot)[p_key] < 0.05
    assert 0.02 < hits / 400 < 0.09


def test_across_seeds_copies_have_no_spread():
    out = across_seeds([0.1] * 3, [0.1] * 3)  # np.var of these copies is 1.9e-34, not 0
    assert math.isnan(out["p_value"]) and "no spread" in out["note"]


def test_prediction_interval_test_formula_and_calibration():
    out = across_seeds([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], a_single_set=True)
    t = (5.0 - 2.0) / (1.0 * math.sqrt(1 + 1 / 3))
    assert out["test"] == "prediction_interval" and out["t_statistic"] == pytest.approx(t)
    assert out["p_value"] == pytest.approx(sps.t.sf(t, 2))
    mirrored = across_seeds([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], b_single_set=True)
    assert mirrored["t_statistic"] == pytest.approx(-t)
    # Null: the single set is one more draw of the same set distribution; Welch on copies would say ~13%.
    rng = np.random.default_rng(3)
    hits = sum(across_seeds([x] * 3, list(rng.normal(0, 1, 3)), a_single_set=True)["p_value"] < 0.05
               for x in rng.normal(0, 1, 4000))
    assert 0.04 < hits / 4000 < 0.06


def test_summarize_uses_the_single_set_test_and_flags_unbounded_ratio_intervals():
    rng = np.random.default_rng(4)
    tokens = np.full(40, 63)
    base_nll = rng.normal(200, 20, 40)
    baseline = Trial("baseline", -1, base_nll, tokens)
    trials = []
    for s in range(3):
        trials.append(Trial("super", s, base_nll + 30 + rng.normal(0, 1, 40), tokens, set_id="same"))
        trials.append(Trial("random_k", s, base_nll + rng.normal(0.02, 1, 40), tokens, set_id=f"r{s}"))
    out = summarize_trials(baseline, trials, n_boot=2000)
    assert out["conditions"]["super"]["n_distinct_sets"] == 1
    assert out["tests"]["super_vs_random_k"]["across_seeds"]["test"] == "prediction_interval"
    ratio = out["effect_ratio"]
    if ratio["ci95_resamples_left_out"] > 0.025:
        assert ratio["ci95"][1] == math.inf and "unbounded" in ratio["ci95_note"]
    # A single seed: no spread is measured, so none is reported.
    single = summarize_trials(baseline, [t for t in trials if t.seed == 0], n_boot=200)
    assert math.isnan(single["conditions"]["random_k"]["delta_ppl_std_over_seeds"])
