"""The DeepSpeed back-end (ZeRO 0/1/2) on CPU with 2 gloo processes keeps every DP invariant.

One spawn of two processes runs every DeepSpeed scenario (importing DeepSpeed costs seconds per
process); the 1-process references run the plain (non-DeepSpeed) path in the test process. The
oracles: a 1-process run with the same logical batches and the same insecure noise seed (noise is
drawn on rank 0 before the reduction, so the draws are identical), and the Gaussian moments of the
noise itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dpcap.config import load_config
from dpcap.errors import ConfigError
from dpcap.train.loop import train
from dpcap.train.world import World, init_distributed, shutdown_distributed
from tests.conftest import train_overrides

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

STAGES = (0, 1, 2)
STEPS = 2
SPAWN_DEADLINE_S = 400  # a rank stuck in a collective must fail the test, not hang it
NOISE_STD, EXPECTED_BATCH, NOISE_SIZE = 0.5, 4.0, 100_000
# bf16 autocast; σ = 0, where the unclipped sum must also reach `.grad` without firing ZeRO-2's hooks.
VARIANTS = {"bf16": {"train.precision": "bf16"}, "nonprivate": {"privacy.sigma": 0}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(shards, run_dir, **extra) -> list[str]:
    return train_overrides(shards, run_dir, **{"train.steps": STEPS, "train.checkpoint_every": 1, **extra})


def _deepspeed(stage: int, **extra) -> dict:
    return {"train.backend": "deepspeed", "train.zero_stage": stage, **extra}


def _noise_and_normalisation(rank: int, stage: int, world: World, out_dir: str) -> None:
    """One parameter, SGD(lr=1): the update is minus the reduced gradient, so it shows the reduction."""
    from dpcap.privacy.noise import secret_generator
    from dpcap.train.reduce_deepspeed import deepspeed_backend

    model = torch.nn.Linear(NOISE_SIZE, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    reducer, ds_optimizer = deepspeed_backend(model, optimizer, world, zero_stage=stage, micro_batch_size=1)
    model.weight.grad = torch.full_like(model.weight, 10.0 * (rank + 1))  # a clipped sum of norm ≫ 1
    generator = secret_generator(insecure_seed=3) if rank == 0 else None
    reducer.finish([model.weight], noise_std=NOISE_STD, generator=generator, expected_batch_size=EXPECTED_BATCH)
    ds_optimizer.step()
    update = -model.weight.detach().reshape(-1) * EXPECTED_BATCH  # undo ÷ qN: Σ_r G_r + noise
    save_file({"update": update.contiguous()}, os.path.join(out_dir, f"noise_zero{stage}_rank{rank}.safetensors"))


def _worker(rank: int, port: int, shards: str, root: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported (NOTES "Machines")
    torch.set_num_threads(1)
    world = World(rank=rank, world_size=2, master_port=port)
    init_distributed(world, backend="gloo")
    try:
        for stage in STAGES:
            train(load_config(None, _overrides(shards, f"{root}/zero{stage}", **_deepspeed(stage))), world=world)
        resume = _overrides(shards, f"{root}/resume", **_deepspeed(2))
        train(load_config(None, resume), world=world, max_steps_this_run=1)  # stopped after step 1 …
        dist.barrier()  # (a relaunch starts after every rank, rank 0's checkpoint write included, has ended)
        train(load_config(None, resume), world=world)  # … and resumed from its checkpoint
        handoff = _overrides(shards, f"{root}/handoff", **_deepspeed(1))
        train(load_config(None, handoff), world=world, max_steps_this_run=1)
        for name, extra in VARIANTS.items():
            train(load_config(None, _overrides(shards, f"{root}/{name}", **_deepspeed(2, **extra))), world=world)
        for stage in STAGES:
            _noise_and_normalisation(rank, stage, world, root)
    finally:
        shutdown_distributed()


def last_checkpoint(run_dir) -> tuple[dict, dict, dict]:
    folder = run_dir / "checkpoints" / (run_dir / "LAST").read_text().strip()
    state = json.loads((folder / "state.json").read_text())
    return load_file(folder / "model.safetensors"), load_file(folder / "optimizer.safetensors"), state


def assert_close_dicts(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    """Every 2-process DeepSpeed run (one spawn) and the 1-process plain references."""
    root = tmp_path_factory.mktemp("deepspeed")
    for name, extra in {"private": {}, **VARIANTS}.items():
        train(load_config(None, _overrides(tiny_shards, root / f"reference_{name}", **extra)), world=World())
    context = mp.spawn(_worker, args=(free_port(), str(tiny_shards), str(root)), nprocs=2, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process DeepSpeed runs did not finish in {SPAWN_DEADLINE_S} s")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_deepspeed_processes_equal_one_plain_process(runs, stage):
    weights, moments, state = last_checkpoint(runs / f"zero{stage}")
    ref_weights, ref_moments, ref_state = last_checkpoint(runs / "reference_private")
    assert_close_dicts(weights, ref_weights, rtol=1e-4, atol=1e-5)
    # The gathered ZeRO partitions have the plain path's layout: '{param index}.{exp_avg|exp_avg_sq|step}'.
    assert_close_dicts(moments, ref_moments, rtol=1e-4, atol=1e-7)
    assert state["step"] == STEPS and state["ledger"] == ref_state["ledger"]
    assert state["privacy"]["epsilon"] == pytest.approx(ref_state["privacy"]["epsilon"])
    before = load_file(runs / f"zero{stage}" / "checkpoints" / "step_00000001" / "model.safetensors")
    assert not torch.allclose(weights["decoder.head.weight"], before["decoder.head.weight"])  # it trained


@pytest.mark.slow
def test_stopped_zero2_run_resumes_at_its_last_step(runs):
    weights, moments, state = last_checkpoint(runs / "resume")
    straight_weights, straight_moments, straight_state = last_checkpoint(runs / "zero2")
    assert_close_dicts(weights, straight_weights, rtol=0, atol=1e-6)
    assert_close_dicts(moments, straight_moments, rtol=0, atol=1e-7)
    assert state["ledger"] == straight_state["ledger"] and state["step"] == STEPS
    lines = (runs / "resume" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # no step lost or repeated


@pytest.mark.slow
def test_zero1_checkpoint_resumes_in_one_plain_process(runs, tiny_shards):
    """The gathered checkpoint does not depend on the back-end or the world size."""
    _, _, state = last_checkpoint(runs / "handoff")
    assert state["step"] == 1
    train(load_config(None, _overrides(tiny_shards, runs / "handoff")), world=World())
    weights, moments, state = last_checkpoint(runs / "handoff")
    ref_weights, ref_moments, ref_state = last_checkpoint(runs / "reference_private")
    assert_close_dicts(weights, ref_weights, rtol=1e-4, atol=1e-5)
    assert_close_dicts(moments, ref_moments, rtol=1e-4, atol=1e-7)
    assert state["ledger"] == ref_state["ledger"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_and_nonprivate_runs_under_zero2_equal_one_process(runs, variant):
    weights, moments, _ = last_checkpoint(runs / variant)
    ref_weights, ref_moments, _ = last_checkpoint(runs / f"reference_{variant}")
    assert all(w.dtype == torch.float32 for w in weights.values())  # bf16 is autocast: weights stay fp32
    assert_close_dicts(weights, ref_weights, rtol=1e-4, atol=1e-5)
    assert_close_dicts(moments, ref_moments, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_world_noise_is_one_draw_of_sigma_c_and_the_sum_is_not_averaged(runs, stage):
    updates = [load_file(runs / f"noise_zero{stage}_rank{r}.safetensors")["update"] for r in range(2)]
    torch.testing.assert_close(updates[0], updates[1], rtol=0, atol=0)  # every rank holds the same weights
    noise = updates[0] - 30.0  # Σ_r G_r = 10 + 20: summed, not averaged (15), and not clipped to norm 1
    assert abs(float(noise.mean())) < 0.01
    for half in noise.chunk(2):  # under ZeRO each half is (mostly) another rank's partition
        assert abs(float(half.std()) - NOISE_STD) < 0.01  # σC, not sqrt(world)·σC (0.707) nor 0


def test_zero_stage_is_checked(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, _overrides(tiny_shards, tmp_path, **_deepspeed(3)))
    with pytest.raises(ConfigError, match="backend=deepspeed"):
        load_config(None, _overrides(tiny_shards, tmp_path, **{"train.zero_stage": 2}))
