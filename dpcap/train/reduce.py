"""Turn each rank's clipped gradient sums into the one noisy logical update (invariant 3).

Σ over ranks of the clipped sums, plus N(0, σ²C²) drawn exactly once for the whole world, divided
by the expected logical batch qN (not the realised size, the world size or the accumulation count).
This module and `world.py` are the only ones that touch torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dpcap.privacy.noise import add_gaussian_noise_

# Gradients are all-reduced in flat buckets of about this many elements (fewer, larger messages).
_BUCKET_ELEMENTS = 32 * 1024 * 1024


class LocalReducer:
    """One process holds the whole logical batch: there is nothing to sum across ranks."""

    rank, world_size = 0, 1
    shards_optimizer_state = False  # True where each rank holds only a partition of it (ZeRO-1/2)

    def finish(
        self, params, *, noise_std: float, generator: torch.Generator | None, expected_batch_size: float
    ) -> None:
        grads = [p.grad for p in params]
        if noise_std > 0:
            add_gaussian_noise_(grads, std=noise_std, generator=generator)
        for grad in grads:
            grad.div_(expected_batch_size)

    def sum_scalars(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_int(self, value: int) -> int:
        return value


class DataParallelReducer(LocalReducer):
    """DDP-style: rank 0 adds the one noise draw to its partial sum, then an all-reduce sums everything.

    Every rank ends with the identical update Σ_ranks(clipped sums) + N(0, σ²C²), so parameters
    stay in sync without broadcasting them. Noise is drawn before the reduction and only on rank 0,
    whose generator is the only one that exists.
    """

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def finish(
        self, params, *, noise_std: float, generator: torch.Generator | None, expected_batch_size: float
    ) -> None:
        grads = [p.grad for p in params]
        if noise_std > 0 and self.rank == 0:
            add_gaussian_noise_(grads, std=noise_std, generator=generator)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        for grad in grads:
            grad.div_(expected_batch_size)

    def sum_scalars(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value everywhere (e.g. the secret sampler seed, drawn once)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())


def _buckets(grads: list[torch.Tensor]):
    bucket, size = [], 0
    for grad in grads:
        if bucket and (size + grad.numel() > _BUCKET_ELEMENTS or grad.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def make_reducer(world) -> LocalReducer:
    return DataParallelReducer() if world.distributed else LocalReducer()
