"""Fault injection on the run folder (issue 12): whatever happens, nothing is lost beyond the last checkpoint.

The runs are insecure-seeded (tests.conftest.train_overrides), so an interrupted-and-resumed run
must end with exactly the weights of an uninterrupted one: that is the oracle of every case here.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpcap.cli import main
from dpcap.config import load_config
from dpcap.errors import EXIT_STOPPED, ConfigError, StorageError
from dpcap.train.lock import RunLock
from dpcap.train.loop import train
from tests.conftest import train_overrides

STEPS = 6


def overrides(shards, run_dir, **extra) -> list[str]:
    return train_overrides(shards, run_dir, **{"train.steps": STEPS, "train.keep_checkpoints": 3, **extra})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = (run_dir / "LAST").read_text().strip()
    return load_file(run_dir / "checkpoints" / last / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> Path:
    """An uninterrupted run: what every faulted run must end as."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, overrides(tiny_shards, run)))
    return run


def stopped_at(shards, run: Path, step: int) -> None:
    train(load_config(None, overrides(shards, run)), max_steps_this_run=step)


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def resume_to_the_end(shards, run: Path, capsys) -> str:
    capsys.readouterr()
    result = train(load_config(None, overrides(shards, run)))
    assert result["done"] and result["step"] == STEPS
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "damage",
    ["truncated_model", "zero_filled_optimizer", "garbled_state", "one_flipped_weight_byte", "emptied_ledger"],
)
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tiny_shards, reference, tmp_path, capsys, damage):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 4)
    folder = checkpoint(run, 4)
    if damage == "truncated_model":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "zero_filled_optimizer":
        path = folder / "optimizer.safetensors"
        path.write_bytes(bytes(path.stat().st_size))
    elif damage == "garbled_state":
        (folder / "state.json").write_text('{"step": 4, "ledger": ')
    elif damage == "one_flipped_weight_byte":
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x01
        path.write_bytes(bytes(data))
    else:  # the ledger emptied by hand (checksum left stale) ...
        state = json.loads((folder / "state.json").read_text())
        state["ledger"]["segments"] = []
        (folder / "state.json").write_text(json.dumps(state))
    err = resume_to_the_end(tiny_shards, run, capsys)
    assert "resuming from step_00000003" in err and "step_00000004 passed over" in err
    assert_same_weights(run, reference)


def test_a_ledger_that_disagrees_with_the_step_is_refused_even_with_a_fresh_checksum(tiny_shards, tmp_path, capsys):
    from dpcap.train.state import STATE_DIGEST_KEY, _state_digest, verify_checkpoint

    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 3)
    path = checkpoint(run, 3) / "state.json"
    state = json.loads(path.read_text())
    state["ledger"]["segments"] = []
    state[STATE_DIGEST_KEY] = _state_digest(state)  # a careful forger: the checksum matches
    path.write_text(json.dumps(state))
    assert verify_checkpoint(checkpoint(run, 3)) == "the ledger records 0 steps for a checkpoint at step 3"


def test_last_escaping_the_run_folder_is_ignored(tiny_shards, reference, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 3)
    evil = tmp_path / "outside" / "evil"
    evil.mkdir(parents=True)
    (run / "LAST").write_text("../../outside/evil\n")
    err = resume_to_the_end(tiny_shards, run, capsys)
    assert "not a checkpoint folder name: ignored" in err
    assert_same_weights(run, reference)


def test_a_deleted_last_resumes_from_the_newest_checkpoint_and_pruning_keeps_the_new_ones(
    tiny_shards, reference, tmp_path, capsys
):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 4)
    (run / "LAST").unlink()
    stopped = train(load_config(None, overrides(tiny_shards, run)), max_steps_this_run=1)
    assert stopped["step"] == 5  # resumed at 4, not restarted from 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (3, 4, 5)]
    resume_to_the_end(tiny_shards, run, capsys)
    assert_same_weights(run, reference)


def test_a_newer_checkpoint_that_does_not_verify_is_set_aside_not_pruned_over(tiny_shards, reference, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 4)
    (checkpoint(run, 4) / "model.safetensors").write_bytes(b"")
    err = resume_to_the_end(tiny_shards, run, capsys)
    assert "step_00000004 is newer than the resumed step 3: moved to step_00000004.unverified" in err
    assert (run / "checkpoints" / "step_00000004.unverified" / "state.json").is_file()  # kept for inspection
    assert_same_weights(run, reference)


def test_nothing_that_verifies_is_exit_2(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 2)
    for step in (1, 2):
        (checkpoint(run, step) / "state.json").write_text("garbage")
    capsys.readouterr()
    assert main(["train", *overrides(tiny_shards, run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint in") and "verifies" in err and err.count("\n") == 1


def test_a_second_trainer_on_the_same_folder_exits_2_naming_the_holder(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 1)
    with RunLock(run):  # another trainer holds the folder (flock: per open file, so this process counts too)
        capsys.readouterr()
        assert main(["train", *overrides(tiny_shards, run)]) == 2
        err = capsys.readouterr().err
        assert "is in use by another trainer" in err and f"pid {os.getpid()}" in err
        with pytest.raises(StorageError):
            train(load_config(None, overrides(tiny_shards, tmp_path / "run")))
    assert train(load_config(None, overrides(tiny_shards, run)), max_steps_this_run=1)["step"] == 2  # released


def test_a_full_disk_is_exit_2_with_the_previous_checkpoint_intact(
    tiny_shards, reference, tmp_path, capsys, monkeypatch
):
    import dpcap.train.state as state_module

    run = tmp_path / "run"
    stopped_at(tiny_shards, run, 2)
    real_save = state_module.save_file

    def save_until_the_disk_fills(tensors, path, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(state_module, "save_file", save_until_the_disk_fills)
    capsys.readouterr()
    assert main(["train", *overrides(tiny_shards, run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device") and "step_00000002 is intact" in err
    assert (run / "LAST").read_text().strip() == "step_00000002"
    assert not list((run / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(state_module, "save_file", real_save)  # space freed
    resume_to_the_end(tiny_shards, run, capsys)
    assert_same_weights(run, reference)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.lr", ".inf"),
        ("train.lr", ".nan"),
        ("train.weight_decay", ".inf"),
        ("train.betas", "[.nan, 2]"),
        ("train.device", "bogus"),
        ("privacy.max_grad_norm", ".inf"),
    ],
)
def test_non_finite_optimiser_values_and_unknown_devices_are_config_errors(tiny_shards, tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides(tiny_shards, tmp_path / "run", **{key: value}))


def _cli(shards, run: Path) -> list[str]:
    return [sys.executable, "-m", "dpcap", "train", *overrides(shards, run, **{"train.steps": 40})]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


@pytest.mark.slow
def test_sigint_checkpoints_at_the_step_boundary_and_exits_4(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_shards, run), stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (run / "LAST").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, stderr[-2000:]
    assert "Traceback" not in stderr
    step = json.loads((run / "checkpoints" / (run / "LAST").read_text().strip() / "state.json").read_text())["step"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == step  # checkpointed at the boundary of the last step it logged


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_beyond_the_last_checkpoint(tiny_shards, tmp_path):
    """SIGKILL at seeded random moments (some inside checkpoint writes: one is written every step),
    then resume each time; the finished run equals an uninterrupted one bit for bit."""
    steps = 12
    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = [
        sys.executable,
        "-m",
        "dpcap",
        "train",
        *overrides(tiny_shards, reference, **{"train.steps": steps}),
    ]
    subprocess.run(uninterrupted, check=True, stderr=subprocess.DEVNULL, env=_env(), timeout=300)  # same threads
    cmd = [sys.executable, "-m", "dpcap", "train", *overrides(tiny_shards, run, **{"train.steps": steps})]
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        before = (run / "LAST").read_text() if (run / "LAST").exists() else None
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=_env())
        deadline = time.monotonic() + 120
        while ((run / "LAST").read_text() if (run / "LAST").exists() else None) == before:  # training has begun
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    final = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=_env(), timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_weights(run, reference)
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # no step logged twice or lost
