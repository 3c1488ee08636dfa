"""Plan a DP-SGD run: the noise multiplier, epochs and gradient accumulation for a privacy budget.

With Poisson sampling of rate q = B/N (B the expected logical batch), T steps and noise
multiplier σ, the averaged update is (Σ_i clip(g_i) + N(0, σ²C²)) / B: its noise has
per-coordinate standard deviation σC/B. Keeping σ/B fixed while shrinking B (Sander et al. 2023,
"TAN without a burn", arXiv:2210.03403) keeps the update's noise level, so small "TAN-equivalent"
runs predict large ones cheaply — but a small run with σ' = σ·B'/B is far less private (its ε is
much larger), so it carries no DP guarantee of its own.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from dpcap.errors import ConfigError
from dpcap.privacy.accountant import calibrate_sigma
from dpcap.privacy.accountant import epsilon as compute_epsilon

__all__ = ["TAN_BATCH_DIVISOR", "TAN_NOTE", "plan"]

#: Without a hardware layout, the TAN-equivalent batch is B / 256 (at least 1).
TAN_BATCH_DIVISOR = 256
TAN_NOTE = "TAN-scaled (Sander et al. 2023) noise for cheap hyper-parameter search: carries NO DP guarantee"


def plan(
    num_samples: int,
    batch_size: int,
    steps: int,
    epsilon: float,
    *,
    delta: float | None = None,
    gpus: int | None = None,
    per_gpu_batch: int | None = None,
    accountant: str = "prv",
) -> dict[str, Any]:
    """A JSON-ready plan for ``steps`` steps of expected batch ``batch_size`` over ``num_samples`` at ``epsilon``.

    σ is the smallest noise multiplier meeting (ε, δ) (δ defaults to 1/N); "epsilon" is the ε that
    σ actually gives (≤ "target_epsilon"); epochs = T·q; accumulation = ceil(B / (gpus·per_gpu_batch))
    micro-steps when both are given. Raises ``ConfigError`` naming any invalid argument.
    """
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    steps = _positive_int("steps", steps)
    if batch_size > num_samples:
        raise ConfigError(f"batch_size ({batch_size}) must not exceed num_samples ({num_samples})")
    gpus = None if gpus is None else _positive_int("gpus", gpus)
    per_gpu_batch = None if per_gpu_batch is None else _positive_int("per_gpu_batch", per_gpu_batch)
    sample_rate = batch_size / num_samples
    delta = 1.0 / num_samples if delta is None else delta
    sigma = calibrate_sigma(epsilon, sample_rate, steps, delta, accountant)
    per_step = None if gpus is None or per_gpu_batch is None else gpus * per_gpu_batch
    return {
        "sigma": sigma,
        "epsilon": compute_epsilon(sigma, sample_rate, steps, delta, accountant),
        "target_epsilon": float(epsilon),
        "delta": float(delta),
        "sample_rate": sample_rate,
        "epochs": steps * sample_rate,
        "steps": steps,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "accountant": accountant,
        "accumulation_steps": None if per_step is None else math.ceil(batch_size / per_step),
        "gpus": gpus,
        "per_gpu_batch": per_gpu_batch,
        "noise_std_per_coordinate": sigma / batch_size,
        "tan_equivalent": _tan_equivalent(sigma, batch_size, per_step),
    }


def _tan_equivalent(sigma: float, batch_size: int, per_step: int | None) -> dict[str, Any]:
    """Batch B' and σ' = σ·B'/B with the same per-coordinate noise σ'/B' = σ/B (Sander et al. 2023).

    B' is one forward/backward of the whole machine (gpus·per_gpu_batch, no accumulation) when
    known, else B/256; never more than B.
    """
    small = per_step if per_step is not None else max(1, batch_size // TAN_BATCH_DIVISOR)
    small = min(small, batch_size)
    return {"batch_size": small, "sigma": sigma * small / batch_size, "note": TAN_NOTE}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
