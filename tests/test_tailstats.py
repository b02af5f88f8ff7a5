"""Heavy-tail statistics on samples whose answer is known: Pareto, lognormal, exponential, and light tails."""

import warnings

import numpy as np
import pytest
import torch

from esa import tailstats

N, TAIL = 400_000, 2000


def fits(x: np.ndarray) -> dict:
    return tailstats.tail_fits(np.sort(x)[-(TAIL + 1):][::-1], TAIL)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_heavy_tails_are_recognised(rng):
    pareto = fits(rng.pareto(1.5, N) + 1)
    assert pareto["heavier_than_exponential"] and pareto["stretched_exp_beta"] < 0.5
    assert pareto["hill_alpha"] == pytest.approx(1.5, rel=0.1)
    assert "power_law" in pareto["best_fit"].split("~")
    lognormal = fits(rng.lognormal(0, 1.5, N))
    assert lognormal["heavier_than_exponential"] and "lognormal" in lognormal["best_fit"].split("~")


@pytest.mark.parametrize("name", ["exponential", "uniform", "half_normal", "weibull_2"])
def test_exponential_and_lighter_tails_are_not_called_heavy(rng, name):
    x = {"exponential": lambda: rng.exponential(1.0, N), "uniform": lambda: rng.uniform(0, 1, N),
         "half_normal": lambda: np.abs(rng.normal(0, 1, N)), "weibull_2": lambda: rng.weibull(2.0, N)}[name]()
    f = fits(x)
    assert not f["heavier_than_exponential"], f
    if name == "exponential":
        assert f["stretched_exp_beta"] == pytest.approx(1.0, abs=0.1)
        assert "exponential" in f["best_fit"].split("~")
    else:
        assert f["stretched_exp_beta"] > 1


def test_stretched_exponential_fit_recovers_its_shape(rng):
    tail = 20_000  # the shape of a 0.5% tail is noisy; 5% pins it down
    for beta in (0.5, 1.0, 2.0):
        x = rng.weibull(beta, N)
        top = np.sort(x)[-(tail + 1):][::-1]
        beta_hat, _ = tailstats.stretched_exponential_fit(top[:tail], top[tail])
        assert beta_hat == pytest.approx(beta, rel=0.1)


def test_moments_and_gini_of_a_summary(rng):
    x = rng.exponential(1.0, N)
    summary = tailstats.summarize(torch.from_numpy(x).float(), TAIL, seed=0)
    assert summary.excess_kurtosis == pytest.approx(6.0, rel=0.15)
    assert summary.mean == pytest.approx(x.mean(), rel=1e-5)
    assert tailstats.gini(summary.sample) == pytest.approx(0.5, abs=0.02)
    assert tailstats.gini(rng.uniform(0, 1, 100_000)) == pytest.approx(1 / 3, abs=0.01)
    d = tailstats.describe(summary, 100)
    top100 = np.sort(x.astype(np.float32))[-100:].sum()
    assert d["topk_mass_share"] == pytest.approx(top100 / x.astype(np.float32).sum(), rel=1e-4)


# ---------------------------------------------------------------------------------- against the powerlaw package
powerlaw = pytest.importorskip("powerlaw", reason="the powerlaw package (pip install powerlaw) is the reference")


@pytest.mark.parametrize("name", ["pareto", "lognormal", "exponential"])
def test_fits_agree_with_the_powerlaw_package_at_the_same_x_min(rng, name):
    """esa's power-law / exponential / lognormal fits and Vuong tests equal powerlaw's (Alstott et al. 2014) when
    both use esa's x_min (the (m+1)-th largest score)."""
    x = {"pareto": lambda: rng.pareto(1.5, N) + 1, "lognormal": lambda: rng.lognormal(0, 1.5, N),
         "exponential": lambda: rng.exponential(1.0, N)}[name]()
    top = np.sort(x)[-(TAIL + 1):][::-1]
    ours = tailstats.tail_fits(top, TAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(top[:TAIL], xmin=top[TAIL], verbose=False, parameter_ranges={"alpha": [1.0, 100.0]})
    assert ours["x_min"] == ref.xmin
    assert ours["hill_alpha"] + 1 == pytest.approx(ref.power_law.alpha, rel=1e-9)
    # powerlaw fits the exponential numerically; esa uses the closed-form MLE, which can only be as good or better.
    assert ours["exponential_lambda"] == pytest.approx(ref.exponential.Lambda, rel=2e-3)
    assert ours["loglik"]["exponential"] >= ref.exponential.loglikelihoods(top[:TAIL]).sum() - 1e-6
    assert ours["loglik"]["power_law"] == pytest.approx(ref.power_law.loglikelihoods(top[:TAIL]).sum(), rel=1e-9)
    ours_ln = ours["loglik"]["lognormal"]
    assert ours_ln >= ref.lognormal.loglikelihoods(top[:TAIL]).sum() - 1e-3 * abs(ours_ln)  # our MLE is as good
    for a, b in (("power_law", "exponential"), ("power_law", "lognormal")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r_ref, p_ref = ref.distribution_compare(a, b)
        r, p = ours[f"R_{a.replace('_', '')}_vs_{b}"], ours[f"p_{a.replace('_', '')}_vs_{b}"]
        assert np.sign(r) == np.sign(r_ref) or abs(r) < 1
        if a == "power_law" and b == "exponential":  # the same fits up to powerlaw's numerical exponential
            assert r == pytest.approx(r_ref, rel=2e-2, abs=1.0) and p == pytest.approx(p_ref, rel=0.2, abs=1e-6)


@pytest.mark.parametrize("name,heavy", [("pareto", True), ("exponential", False), ("half_normal", False)])
def test_heavy_tail_verdict_agrees_with_powerlaw_at_its_own_x_min(rng, name, heavy):
    """The field's procedure (x_min by minimum KS distance, then Vuong power law vs exponential) and esa's
    nested test at the fixed x_min reach the same verdict on samples whose answer is known. (A lognormal tail
    is left out: above its KS x_min powerlaw cannot tell it from an exponential at 500 values, p ≈ 0.3.)"""
    x = {"pareto": lambda: rng.pareto(1.5, N) + 1, "lognormal": lambda: rng.lognormal(0, 1.5, N),
         "exponential": lambda: rng.exponential(1.0, N), "half_normal": lambda: np.abs(rng.normal(0, 1, N))}[name]()
    top = np.sort(x)[-(TAIL + 1):][::-1]
    assert tailstats.tail_fits(top, TAIL)["heavier_than_exponential"] is heavy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # powerlaw warns when α̂ reaches its default range's edge (light tails)
        ref = powerlaw.Fit(top[:500], verbose=False)  # x_min by minimum KS distance among the top scores
        r, p = ref.distribution_compare("power_law", "exponential")
    assert bool(r > 0 and p < 0.05) is heavy


def test_streamed_moments_match_float64_numpy(monkeypatch):
    """Several chunks (the scan's and the power sums' chunks made small, one not a multiple of the other): sum,
    zeros, max and the central moments against numpy in float64."""
    from esa import scorescan
    from esa.kernels import moments

    monkeypatch.setattr(scorescan, "CPU_CHUNK", 4 * scorescan.BLOCK)
    monkeypatch.setattr(moments, "TORCH_CHUNK", 700)
    x = torch.from_numpy(np.random.default_rng(1).lognormal(0, 2, 4321)).float()
    x[::9] = 0
    total, zeros, mx, m2, m3, m4 = tailstats.moments(x)
    v = x.double().numpy()
    d = v - v.mean()
    assert total == pytest.approx(v.sum(), rel=1e-12) and zeros == int((v == 0).sum()) and mx == v.max()
    assert (m2, m3, m4) == pytest.approx(((d ** 2).mean(), (d ** 3).mean(), (d ** 4).mean()), rel=1e-9)


def test_normal_log_density_and_tail_are_scipys_bit_for_bit():
    """The lognormal fit's objective replaces scipy.stats.norm calls: the same floats, so the same fit."""
    from scipy import stats

    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, 5000)
    for mu, sigma in [(0.0, 1.0), (1.7, 0.3), (-2.5, 11.0), (0.1, 1e-3)]:
        assert np.array_equal(tailstats._norm_logpdf(x, mu, sigma), stats.norm.logpdf(x, mu, sigma))
        for z in (-40.0, -1.3, 0.0, 0.7, 9.0, (0.3 - mu) / sigma):
            assert tailstats._norm_sf(z) == stats.norm.sf(z)


def test_fits_in_worker_processes_are_the_same_floats(rng):
    """esa.scorestats.describe_all spreads the fits over spawned processes for many tensors: same results."""
    import json

    from esa.scorestats import FitWorkers, describe_all

    summaries = [tailstats.summarize(torch.from_numpy(rng.lognormal(0, s, 20_000)).float(), 1000, seed=1)
                 for s in (0.5, 1.0, 2.0, 3.0)]
    serial = describe_all(summaries, 100, workers=0)
    pooled = describe_all(summaries, 100, workers=2, fallback=False)
    assert json.dumps(pooled) == json.dumps(serial)  # NaN-proof, and every float to the last digit
    assert [d["numel"] for d in pooled] == [20_000] * 4
    with FitWorkers(2) as fits:  # started before the summaries exist, as esa profile starts them before scoring
        assert fits._pool is not None
        fits.prefetch("a", summaries[0], 100)  # fitted while selection would go on
        fits.prefetch("b", summaries[1], 5)  # another k: fitted again
        early = describe_all(summaries, 100, fits=fits, fallback=False, keys=["a", "b", None, None])
        assert fits._prefetched["a"][2].done()
    assert json.dumps(early) == json.dumps(serial) and fits._pool is None  # shut down on leaving
    with FitWorkers(2, early=False) as lazy:  # scoring on the CPU: no workers until the statistics need them
        lazy.prefetch("a", summaries[0], 100)
        assert lazy._pool is None and not lazy._prefetched
        assert json.dumps(describe_all(summaries, 100, fits=lazy, fallback=False)) == json.dumps(serial)


def test_statistics_workers_share_the_cores_among_local_ranks_and_leave_one_to_a_gpu_driver(monkeypatch):
    """One worker per core, none below 64 distributions; the ranks of a torchrun launch on one machine split the
    cores, and a process that drives a GPU keeps one; fewer than two workers is no pool at all."""
    import os

    from esa import distributed
    from esa.scorestats import statistics_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert statistics_workers(236) == 16 and statistics_workers(236, leave=1) == 15
    assert statistics_workers(63) == 0 and statistics_workers(80) == 10  # n // 8
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert statistics_workers(236) == 4 and statistics_workers(236, leave=1) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert statistics_workers(236, leave=1) == 0  # 2 cores per rank, one kept: no pool
