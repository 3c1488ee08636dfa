"""The only reader of launcher environment variables: who am I, how many are we.

Single-process runs need nothing; under torchrun / the deepspeed launcher (RANK, WORLD_SIZE) or
srun (SLURM_PROCID, SLURM_NTASKS) the same code learns its rank and world size here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_world(environ: dict[str, str] | None = None) -> World:
    """Rank and world size from torchrun/deepspeed (RANK, WORLD_SIZE) or slurm (SLURM_PROCID, SLURM_NTASKS)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()
