"""Turn each rank's clipped gradient sums into the one noisy logical update (invariant 3).

Σ over ranks of the clipped sums, plus N(0, σ²C²) drawn exactly once for the whole world, divided
by the expected logical batch qN (not the realised size, the world size or the accumulation count).
"""

from __future__ import annotations

import torch

from dpcap.privacy.noise import add_gaussian_noise_


class LocalReducer:
    """One process holds the whole logical batch: there is nothing to sum across ranks."""

    def finish(
        self,
        params: list[torch.nn.Parameter],
        *,
        noise_std: float,
        generator: torch.Generator | None,
        expected_batch_size: float,
    ) -> None:
        grads = [p.grad for p in params]
        if noise_std > 0:
            add_gaussian_noise_(grads, std=noise_std, generator=generator)
        for grad in grads:
            grad.div_(expected_batch_size)
