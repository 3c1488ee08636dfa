"""PoissonSampler: exact Poisson sampling, checked statistically (scipy oracles) and for exact resume.

All draws use fixed seeds, so the statistical tests are deterministic; the thresholds are two-sided
tests at significance 1e-3 (or |z| < 4 for single means), loose enough that a correct sampler passes
for any seed with overwhelming probability and tight enough to catch fixed-size or biased batches.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpcap.data.sampler import PoissonSampler
from dpcap.errors import ConfigError

ALPHA = 1e-3


def draws(sampler: PoissonSampler, steps: int) -> list[np.ndarray]:
    return [sampler.indices(t) for t in range(steps)]


def test_ids_are_sorted_unique_int64_in_range() -> None:
    sampler = PoissonSampler(1000, 0.05, seed=1)
    for ids in draws(sampler, 20):
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert np.all(np.diff(ids) > 0)
        assert ids.size == 0 or (ids[0] >= 0 and ids[-1] < 1000)


def test_inclusion_frequency_per_id_matches_q() -> None:
    n, q, steps = 40, 0.15, 3000
    counts = np.zeros(n)
    for ids in draws(PoissonSampler(n, q, seed=7), steps):
        counts[ids] += 1
    # Each id's count ~ Bin(steps, q), independently across ids: Pearson statistic ~ chi2(n).
    z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
    assert stats.chi2.sf(np.sum(z**2), df=n) > ALPHA
    assert np.max(np.abs(z)) < stats.norm.isf(ALPHA / (2 * n))  # Bonferroni over the n ids


def test_batch_size_is_binomial_not_fixed() -> None:
    n, q, steps = 500, 0.04, 3000
    sizes = np.array([ids.size for ids in draws(PoissonSampler(n, q, seed=3), steps)])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) / np.sqrt(var / steps) < 4
    # variance: (steps-1)s²/σ² ≈ chi2(steps-1) (binomial near-normal at nq = 20)
    statistic = (steps - 1) * sizes.var(ddof=1) / var
    assert stats.chi2.cdf(statistic, steps - 1) > ALPHA / 2 and stats.chi2.sf(statistic, steps - 1) > ALPHA / 2
    # goodness of fit of the whole histogram against Bin(n, q), tails pooled
    edges = np.arange(8, 34)
    observed = np.array([np.sum(sizes < 8)] + [np.sum(sizes == k) for k in edges] + [np.sum(sizes > 33)])
    pmf = stats.binom.pmf(edges, n, q)
    expected = steps * np.concatenate([[stats.binom.cdf(7, n, q)], pmf, [stats.binom.sf(33, n, q)]])
    assert stats.chisquare(observed, expected).pvalue > ALPHA


def test_pairs_are_independent() -> None:
    """P(i ∈ B and j ∈ B) = q² for i ≠ j (fixed-size sampling would give q(qN - 1)/(N - 1))."""
    n, q, steps = 10, 0.3, 6000
    both = sum(int(0 in ids and 1 in ids) for ids in draws(PoissonSampler(n, q, seed=11), steps))
    assert stats.binomtest(both, steps, q * q).pvalue > ALPHA


def test_same_seed_and_step_same_ids_and_resume_is_exact() -> None:
    a, b = PoissonSampler(10_000, 0.01, seed=5), PoissonSampler(10_000, 0.01, seed=5)
    full = draws(a, 30)
    resumed = [b.indices(t) for t in range(12, 30)]
    assert all(np.array_equal(x, y) for x, y in zip(full[12:], resumed))
    assert all(np.array_equal(a.indices(t), full[t]) for t in (0, 29, 3))
    assert not np.array_equal(full[0], full[1])
    assert not np.array_equal(full[0], PoissonSampler(10_000, 0.01, seed=6).indices(0))
    assert PoissonSampler.from_state_dict(a.state_dict()).indices(4).tolist() == full[4].tolist()


def test_independent_of_global_rng_state() -> None:
    sampler = PoissonSampler(1000, 0.1, seed=0)
    before = sampler.indices(3)
    np.random.seed(123)
    np.random.random(10)
    assert np.array_equal(sampler.indices(3), before)


def test_expected_batch_size_and_full_rate() -> None:
    assert PoissonSampler(2000, 0.25, seed=0).expected_batch_size == 500.0
    assert np.array_equal(PoissonSampler(7, 1.0, seed=0).indices(9), np.arange(7))


def test_large_population_is_fast_and_sized_right() -> None:
    ids = PoissonSampler(50_000_000, 2e-4, seed=0).indices(0)
    assert abs(ids.size - 10_000) < 5 * np.sqrt(10_000) and np.all(np.diff(ids) > 0)


@pytest.mark.parametrize(
    ("n", "q", "seed"),
    [(0, 0.1, 0), (10, 0.0, 0), (10, 1.5, 0), (10, -0.1, 0), (10.5, 0.1, 0), (True, 0.1, 0), (10, 0.1, -1)],
)
def test_bad_arguments(n: object, q: object, seed: object) -> None:
    with pytest.raises(ConfigError):
        PoissonSampler(n, q, seed)  # type: ignore[arg-type]


def test_bad_step() -> None:
    with pytest.raises(ConfigError, match="step"):
        PoissonSampler(10, 0.5, 0).indices(-1)
