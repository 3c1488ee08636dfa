"""The empirical ε lower bound keeps its stated confidence (issue 11, case 4).

With no leakage at all (inserted and held-out scores from one distribution) a bound at confidence 0.95 may
come out above 0 in at most 5% of audits. Choosing the best threshold on the very scores the Clopper–Pearson
bound is computed on broke this (7–9% at 500–2,000 canaries per side); the threshold is now chosen on one
half of the canaries and the bound computed on the other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from dpcap.eval.audit import epsilon_lower_bound

NULL_TRIALS = 1000
NOMINAL = 0.05
# the nominal failure rate plus three binomial standard errors of the measured rate
NULL_LIMIT = NOMINAL + 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / NULL_TRIALS)


def _null_scores(rng: np.random.Generator, n: int, ties: bool) -> np.ndarray:
    scores = rng.normal(size=n)
    return np.round(scores * 4) if ties else scores  # ties: a coarse score with ~25 distinct values


@pytest.mark.parametrize(("n", "ties"), [(64, False), (500, False), (500, True), (1000, False), (2000, False)], ids=str)
def test_null_case_bound_is_positive_at_most_at_the_nominal_rate(n: int, ties: bool) -> None:
    rng = np.random.default_rng(20231101 + n + ties)
    bounds = np.array(
        [
            epsilon_lower_bound(_null_scores(rng, n, ties), _null_scores(rng, n, ties), delta=1e-5)[
                "epsilon_lower_bound"
            ]
            for _ in range(NULL_TRIALS)
        ]
    )
    assert np.isfinite(bounds).all() and (bounds >= 0).all()
    rate = float(np.mean(bounds > 0))
    assert rate <= NULL_LIMIT, f"{rate:.3%} of {NULL_TRIALS} no-leak audits gave ε_lb > 0 at confidence 0.95"


def _gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of μ-GDP (Dong, Roth & Su 2019): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε."""
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 100)


def test_real_leakage_still_gives_a_clearly_positive_bound() -> None:
    rng = np.random.default_rng(0)
    delta = 1e-5
    result = epsilon_lower_bound(rng.normal(2.0, 1.0, 1000), rng.normal(0.0, 1.0, 1000), delta=delta)
    assert result["epsilon_lower_bound"] >= 2.0
    assert result["epsilon_lower_bound"] <= _gaussian_dp_epsilon(2.0, delta)  # a μ = 2 Gaussian test is 2-GDP
    assert result["threshold_canaries"] == {"inserted": 500, "held_out": 500}
    assert result["bound_canaries"] == {"inserted": 500, "held_out": 500}
    assert 0 < result["tpr_low"] <= result["tpr"] and result["fpr"] <= result["fpr_high"] < 1


def test_bound_is_deterministic_and_split_seed_is_a_keyword() -> None:
    rng = np.random.default_rng(1)
    members, others = rng.normal(1.5, 1.0, 300), rng.normal(0.0, 1.0, 400)
    first = epsilon_lower_bound(members, others, delta=1e-5)
    assert epsilon_lower_bound(members, others, delta=1e-5) == first
    assert epsilon_lower_bound(members, others, delta=1e-5, split_seed=0) == first
    other = epsilon_lower_bound(members, others, delta=1e-5, split_seed=1)
    assert other["epsilon_lower_bound"] > 0 and other["threshold"] != first["threshold"]
    assert first["threshold_canaries"] == {"inserted": 150, "held_out": 200}
    assert first["bound_canaries"] == {"inserted": 150, "held_out": 200}


@pytest.mark.parametrize(("n_in", "n_out"), [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3)])
def test_tiny_canary_counts_give_zero(n_in: int, n_out: int) -> None:
    members, others = np.arange(n_in) + 100.0, np.arange(n_out, dtype=float)
    result = epsilon_lower_bound(members, others, delta=0.0)
    assert result["epsilon_lower_bound"] == 0.0 and result["threshold"] is None
    assert result["confidence"] == 0.95
