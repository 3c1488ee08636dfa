"""Poisson sampling of logical batches: what the privacy accountant assumes, drawn statelessly.

At every step each of the N examples enters the batch independently with probability q, so the batch
size is K ~ Binomial(N, q) and, given K, the batch is a uniformly random K-subset of {0, …, N-1}. We
draw exactly that: K from the binomial, then K distinct ids with ``Generator.choice(N, K,
replace=False)`` -- the two-stage draw has the same law as N independent Bernoulli(q) coins, since
P(S) = C(N, |S|) q^|S| (1-q)^(N-|S|) · 1 / C(N, |S|) = q^|S| (1-q)^(N-|S|) for every subset S.

The generator of step t is ``PCG64(SeedSequence([seed, t]))``: it depends on (seed, t) only, so every
rank draws the same ids, and a run resumed at step k draws what an uninterrupted run would have drawn.
Batches are never fixed-size.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from dpcap.errors import ConfigError


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class PoissonSampler:
    """``indices(step)`` → the sorted int64 ids of step ``step``'s Poisson-sampled batch.

    Args:
        num_samples: N, the data set size (fixed by ``sizes.json``).
        sample_rate: q in (0, 1], the inclusion probability of every example at every step.
        seed: non-negative integer; with the step it fully determines the draw.
    """

    def __init__(self, num_samples: int, sample_rate: float, seed: int) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.seed = _check_int("seed", seed, 0)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)

    @property
    def expected_batch_size(self) -> float:
        """E[K] = qN, the denominator of the noisy mean update."""
        return self.sample_rate * self.num_samples

    def generator(self, step: int) -> np.random.Generator:
        """The generator that step ``step`` draws from: ``PCG64(SeedSequence([seed, step]))``."""
        step = _check_int("step", step, 0)
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))

    def indices(self, step: int) -> np.ndarray:
        """Sorted ids of step ``step``: K ~ Bin(N, q), then K distinct ids uniformly at random."""
        rng = self.generator(step)
        k = int(rng.binomial(self.num_samples, self.sample_rate))
        ids = rng.choice(self.num_samples, size=k, replace=False, shuffle=False).astype(np.int64)
        ids.sort()
        return ids

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the sampler (it holds no other state)."""
        return {"num_samples": self.num_samples, "sample_rate": self.sample_rate, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PoissonSampler:
        return cls(state["num_samples"], state["sample_rate"], state["seed"])

    def __repr__(self) -> str:
        return f"PoissonSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, seed={self.seed})"
