"""launch/train.py under torchrun (2 processes equal 1), its exit codes and signals; launch/status.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dpcap.config import load_config
from dpcap.privacy.accountant import epsilon
from dpcap.train.loop import train
from launch.status import main as status_main
from launch.status import run_status
from launch.train import EXIT_STOPPED, run, strip_launcher_args
from tests.conftest import train_overrides

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "launch" / "train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = (run_dir / "LAST").read_text().strip()
    return load_file(run_dir / "checkpoints" / last / "model.safetensors")


@pytest.fixture(scope="module")
def one_process_run(tiny_shards, tmp_path_factory) -> Path:
    """The in-process, single-process reference: 2 steps."""
    run_dir = tmp_path_factory.mktemp("launch") / "one"
    train(load_config(None, train_overrides(tiny_shards, run_dir, **{"train.steps": 2})))
    return run_dir


def test_strip_launcher_args():
    argv = ["--local_rank=3", "cfg.yaml", "--local-rank", "1", "train.steps=2", "--json", "--local-rank=0"]
    assert strip_launcher_args(argv) == ["cfg.yaml", "train.steps=2", "--json"]
    assert strip_launcher_args(["a=1", "--resume", "runs/x"]) == ["a=1", "--resume", "runs/x"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun next to {sys.executable}")
def test_torchrun_two_processes_equal_one(tiny_shards, tmp_path, one_process_run):
    run_dir = tmp_path / "two"
    # --local_rank=0 is what the deepspeed launcher appends: accepted and ignored.
    overrides = train_overrides(tiny_shards, run_dir, **{"train.steps": 2})
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(ENTRY), "--local_rank=0", *overrides, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 2 and all(s["step"] == 2 and s["done"] for s in summaries)
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" in proc.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    one, two = final_weights(one_process_run), final_weights(run_dir)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_budget_exit_code_and_process_group_shut_down(tiny_shards, tmp_path):
    """Exit code 3 passes through, and the process group is left on the way out."""
    one_step = epsilon(1.0, 16 / 48, 1, 1 / 48)
    overrides = train_overrides(tiny_shards, tmp_path / "run", **{"privacy.epsilon": one_step * 1.05})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert run(overrides) == 3
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert run_status(tmp_path / "run") == {"run_dir": str(tmp_path / "run"), "step": 1, "steps": 4, "done": False}


def test_signal_during_startup_exits_stopped(tiny_shards, tmp_path):
    """SIGUSR1 before the training loop (here: while torch is imported) → EXIT_STOPPED, not death by signal."""
    cmd = [sys.executable, str(ENTRY), *train_overrides(tiny_shards, tmp_path / "run")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not _catches_sigusr1(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "launch/train.py never installed its handler"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "SIGUSR1 outside the training loop" in stderr
    assert not (tmp_path / "run" / "LAST").exists()


def _catches_sigusr1(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGUSR1_BIT)
    return False


def test_status_of_run_folders(one_process_run, tmp_path, capsys):
    assert run_status(one_process_run) == {"run_dir": str(one_process_run), "step": 2, "steps": 2, "done": True}
    assert status_main([str(one_process_run), "--fields", "step,steps,done"]) == 0
    assert capsys.readouterr().out.strip() == "2 2 true"
    assert status_main([str(tmp_path)]) == 1  # not started: resumable, not done
    assert json.loads(capsys.readouterr().out) == {"run_dir": str(tmp_path), "step": 0, "steps": None, "done": False}
    (tmp_path / "LAST").write_text("step_00000009\n")  # points at a missing checkpoint
    assert status_main([str(tmp_path)]) == 2
    assert "not a readable run folder" in capsys.readouterr().err
