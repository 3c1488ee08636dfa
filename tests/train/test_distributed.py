"""Two gloo processes train exactly like one process; the world's noise is one draw of σC."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dpcap.config import load_config
from dpcap.privacy.noise import secret_generator
from dpcap.train.loop import train
from dpcap.train.reduce import DataParallelReducer
from dpcap.train.world import World, first_slurm_host, init_distributed, shutdown_distributed
from tests.conftest import TINY_CAPTIONER, train_overrides


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_rank(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    world = World(rank=rank, world_size=world_size, master_port=port)
    try:
        train(load_config(None, overrides), world=world)
    finally:
        shutdown_distributed()


def final_weights(run_dir):
    last = (run_dir / "LAST").read_text().strip()
    return load_file(run_dir / "checkpoints" / last / "model.safetensors")


@pytest.mark.slow
def test_two_processes_equal_one(tiny_shards, tmp_path):
    extra = {"train.steps": 3, "train.checkpoint_every": 3}
    one = train_overrides(tiny_shards, tmp_path / "one", **extra)
    two = train_overrides(tiny_shards, tmp_path / "two", **extra)
    mp.spawn(_train_rank, args=(1, free_port(), one), nprocs=1, join=True)
    mp.spawn(_train_rank, args=(2, free_port(), two), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(a["decoder.head.weight"], load_file_init(tmp_path))


def load_file_init(tmp_path):
    """The initial head weight, to show training moved the parameters at all."""
    from dpcap.model import create_captioner

    model = create_captioner("nano", seed=0, **TINY_CAPTIONER)
    return model.decoder.head.weight.detach()


def _noise_rank(rank: int, world_size: int, port: int, queue) -> None:
    init_distributed(World(rank=rank, world_size=world_size, master_port=port), backend="gloo")
    try:
        param = torch.nn.Parameter(torch.zeros(200_000))
        param.grad = torch.zeros_like(param)
        generator = secret_generator(insecure_seed=3) if rank == 0 else None
        DataParallelReducer().finish([param], noise_std=0.5, generator=generator, expected_batch_size=10.0)
        # A numpy copy travels by value: a tensor would be shared through this process's fd server, gone
        # once it exits, and the parent's get() then fails (FileNotFoundError) if the child is quicker.
        queue.put((rank, param.grad.numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_world_noise_is_one_draw_of_sigma_c():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_noise_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: torch.from_numpy(grad) for rank, grad in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    torch.testing.assert_close(results[0], results[1])  # every rank holds the same update
    std = float((results[0] * 10.0).std())  # undo the ÷ qN normalisation
    assert abs(std - 0.5) < 0.01  # σC, not sqrt(world)·σC (= 0.707)


def test_first_slurm_host():
    assert first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("n[1-2]") == "n1"
