"""Heavy-tail statistics on samples whose answer is known: Pareto, lognormal, exponential, and light tails."""

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
