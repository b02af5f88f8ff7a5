"""esa.stats edge cases and calibration: the tests say 5% when nothing differs, and never 0 by accident."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from esa.stats import Trial, bootstrap_indices, paired_comparison, summarize_trials


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


def test_summarize_ranks_one_super_set_against_the_control_sets():
    """A fixed super set evaluated in three seeds is one statistic; 19 control sets; a clear effect gets the
    smallest p the rank test allows and a bounded ratio; one control set cannot give a p below 0.5."""
    rng = np.random.default_rng(4)
    tokens = np.full(40, 63)
    base_nll = rng.normal(200, 20, 40)
    baseline = Trial("baseline", -1, base_nll, tokens)
    super_nll = base_nll + 30 + rng.normal(0, 1, 40)
    trials = [Trial("super", s, super_nll, tokens, set_id="same") for s in range(3)]
    trials += [Trial("random_k", j, base_nll + 63 * rng.lognormal(-6, 1) + rng.normal(0, 1, 40), tokens,
                     set_id=f"r{j}") for j in range(19)]
    out = summarize_trials(baseline, trials, n_boot=500)
    test = out["tests"]["super_vs_random_k"]
    assert out["conditions"]["super"]["n_distinct_sets"] == 1 and test["n_tested_trials"] == 3
    assert test["p_value"] == pytest.approx(1 / 20) and test["parametric"]["p_value"] < 1e-6
    x = (super_nll.sum() - base_nll.sum()) / tokens.sum()
    assert test["statistic_delta_nll_per_token"] == pytest.approx(x)
    ratio = out["effect_ratio"]
    controls = [s["delta_nll_per_token"] for s in out["conditions"]["random_k"]["per_seed"]]
    assert ratio["value"] == pytest.approx(x / np.mean(controls))
    assert ratio["lower_bound_95"] == pytest.approx(x / max(controls))  # K = 0 with 19 sets: the largest
    lo, hi = out["conditions"]["random_k"]["set_level"]["ci95_mean_delta_nll_per_token"]
    assert lo < np.mean(controls) < hi
    one = summarize_trials(baseline, trials[:3] + trials[3:4], n_boot=200)
    assert one["tests"]["super_vs_random_k"]["p_value"] == 0.5 and "cannot reach" in one["tests"][
        "super_vs_random_k"]["note"]
    assert math.isnan(one["effect_ratio"]["lower_bound_95"]) and "too few" in one["effect_ratio"]["note"]


def test_collapsed_trials_count_as_the_worst_rank_in_every_condition():
    rng = np.random.default_rng(5)
    tokens = np.full(10, 63)
    base = rng.normal(200, 20, 10)
    baseline = Trial("baseline", -1, base, tokens)
    inf = base.copy()
    inf[3] = np.inf
    controls = [Trial("random_k", j, base + rng.normal(5, 1, 10), tokens, set_id=f"r{j}") for j in range(19)]
    collapsed_super = [Trial("super", 0, inf, tokens, set_id="s")]
    out = summarize_trials(baseline, collapsed_super + controls, n_boot=200)
    assert out["tests"]["super_vs_random_k"]["p_value"] == pytest.approx(1 / 20)
    assert out["effect_ratio"]["lower_bound_95"] == math.inf
    # A collapsed control set is at least as harmful as a collapsed super set: it is counted, not left out.
    controls[0] = Trial("random_k", 0, inf, tokens, set_id="r0")
    out = summarize_trials(baseline, collapsed_super + controls, n_boot=200)
    assert out["tests"]["super_vs_random_k"]["p_value"] == pytest.approx(2 / 20)
    assert out["conditions"]["random_k"]["set_level"]["ci95_mean_delta_nll_per_token"][1] == math.inf


def test_bottom_k_that_leaves_every_window_unchanged_is_flagged():
    rng = np.random.default_rng(6)
    tokens = np.full(10, 63)
    base = rng.normal(200, 20, 10)
    trials = [Trial("super", 0, base + 50, tokens, set_id="s"), Trial("bottom_k", 0, base.copy(), tokens, set_id="b")]
    trials += [Trial("random_k", j, base + rng.normal(1, 1, 10), tokens, set_id=f"r{j}") for j in range(19)]
    out = summarize_trials(Trial("baseline", -1, base, tokens), trials, n_boot=200)
    assert "unchanged" in out["tests"]["random_k_vs_bottom_k"]["not_informative"]
    trials[1] = Trial("bottom_k", 0, base + 1e-9, tokens, set_id="b")
    out = summarize_trials(Trial("baseline", -1, base, tokens), trials, n_boot=200)
    assert "not_informative" not in out["tests"]["random_k_vs_bottom_k"]
