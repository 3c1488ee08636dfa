"""The only reader of launcher environment variables, and the only place a process group is made.

Single-process runs need nothing. Under torchrun or the deepspeed launcher (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) or srun (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, SLURM_JOB_ID)
the same code learns its rank and world size here and joins the group.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a slurm node list such as 'gpu[003-005,010],cpu1' → 'gpu003' (no scontrol needed)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_master_port(job_id: str | int) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    return 15000 + int(job_id) % 40000


def detect_world(environ: dict[str, str] | None = None) -> World:
    """Rank and world from torchrun/deepspeed (RANK, WORLD_SIZE) or slurm (SLURM_PROCID, SLURM_NTASKS)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    # Only inside an srun step: the batch shell also has SLURM_PROCID=0 and SLURM_NTASKS, but no peers.
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return World(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or slurm_master_port(env.get("SLURM_JOB_ID", 0))),
        )
    return World()


def init_distributed(world: World, backend: str | None = None) -> None:
    """Join the process group for a multi-process world (no-op for one process or if already joined)."""
    if not world.distributed or dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{world.master_addr}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
    )


def barrier(world: World) -> None:
    """Wait for every rank (no-op for one process): e.g. until all have written their share to a shared folder."""
    if world.distributed:
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, name: str) -> torch.device:
    """'auto' → this rank's GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)
