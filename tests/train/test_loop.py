"""The run loop: exact resume, the ε budget guard, checkpoints and the run folder interface."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpcap.cli import main
from dpcap.config import load_config
from dpcap.errors import BudgetExceededError
from dpcap.privacy.accountant import epsilon
from dpcap.train.loop import train
from tests.conftest import train_overrides


def weights(run_dir) -> dict[str, torch.Tensor]:
    last = (run_dir / "LAST").read_text().strip()
    return load_file(run_dir / "checkpoints" / last / "model.safetensors")


def state(run_dir) -> dict:
    last = (run_dir / "LAST").read_text().strip()
    return json.loads((run_dir / "checkpoints" / last / "state.json").read_text())


def test_resume_after_stop_equals_uninterrupted_run(tiny_shards, tmp_path):
    straight = train(load_config(None, train_overrides(tiny_shards, tmp_path / "a")))
    first = train(load_config(None, train_overrides(tiny_shards, tmp_path / "b")), max_steps_this_run=2)
    assert first["step"] == 2 and not first["done"]
    resumed = train(load_config(None, train_overrides(tiny_shards, tmp_path / "b")))
    assert resumed["done"] and resumed["step"] == straight["step"] == 4
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert state(tmp_path / "a")["ledger"] == state(tmp_path / "b")["ledger"]
    assert resumed["epsilon"] == pytest.approx(straight["epsilon"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one metrics line per logical step, none repeated after the resume


def test_run_folder_interface(tiny_shards, tmp_path):
    run = tmp_path / "run"
    result = train(
        load_config(None, train_overrides(tiny_shards, run, **{"train.steps": 3, "train.checkpoint_every": 2}))
    )
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 0
    assert (run / "LAST").read_text().strip() == "step_00000003"  # the last step is always checkpointed
    folder = run / "checkpoints" / "step_00000003"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    saved = state(run)
    assert saved["step"] == 3 and saved["sampler_seed"] == 11
    assert sum(seg["steps"] for seg in saved["ledger"]["segments"]) == 3  # the ledger travels with the checkpoint
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"step", "loss", "epsilon", "batch_size", "seconds"} <= records[-1].keys()
    q = 16 / 48
    assert records[-1]["epsilon"] == pytest.approx(epsilon(1.0, q, 3, 1 / 48))
    assert result["private"] is False  # insecure seeds: never claimed private


def test_budget_guard_refuses_the_step_that_would_cross_epsilon(tiny_shards, tmp_path):
    q, delta = 16 / 48, 1 / 48
    budget = (epsilon(1.0, q, 2, delta) + epsilon(1.0, q, 3, delta)) / 2  # room for 2 steps, not 3
    overrides = train_overrides(tiny_shards, tmp_path / "run", **{"privacy.epsilon": budget, "train.steps": 5})
    with pytest.raises(BudgetExceededError):
        train(load_config(None, overrides))
    assert state(tmp_path / "run")["step"] == 2
    assert main(["train", *overrides]) == 3  # resuming is refused too, with exit code 3


def test_calibrated_sigma_spends_exactly_the_budget(tiny_shards, tmp_path):
    overrides = train_overrides(
        tiny_shards, tmp_path / "run", **{"privacy.sigma": None, "privacy.epsilon": 6.0, "train.steps": 3}
    )
    result = train(load_config(None, overrides))
    assert result["done"] and result["epsilon"] <= 6.0
    assert result["epsilon"] == pytest.approx(6.0, rel=5e-3)


def test_nonprivate_baseline_is_marked(tiny_shards, tmp_path):
    overrides = train_overrides(tiny_shards, tmp_path / "run", **{"privacy.sigma": 0, "train.steps": 2})
    result = train(load_config(None, overrides))
    assert result["private"] is False and result["epsilon"] is None
    assert math.isinf(epsilon(0.0, 0.5, 2, 1e-5))


def test_training_reduces_the_loss_without_noise(tiny_shards, tmp_path):
    extra = {
        "privacy.sigma": 0,
        "train.steps": 30,
        "train.lr": 1e-2,
        "train.batch_size": 24,
        "train.checkpoint_every": 30,
    }
    train(load_config(None, train_overrides(tiny_shards, tmp_path / "run", **extra)))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_corrupt_sample_is_skipped_and_counted_without_changing_n(tiny_shards, tmp_path):
    import shutil

    import numpy as np

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    offsets = np.fromfile(shards / "shard-000000.idx", dtype="<u8").reshape(-1, 6)
    image_offset, image_size = int(offsets[3, 0]), int(offsets[3, 1])
    with open(shards / "shard-000000.tar", "r+b") as handle:  # damage one image inside the tar
        handle.seek(image_offset)
        handle.write(b"\0" * image_size)
    overrides = train_overrides(shards, tmp_path / "run", **{"train.steps": 1, "train.batch_size": 48})
    result = train(load_config(None, overrides))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["skipped"] == 1 and record["batch_size"] == 47  # q = 1: every other sample was used
    assert result["num_samples"] == 48 and result["sample_rate"] == 1.0  # N and q are those of sizes.json


def test_reader_workers_kept_for_the_run_give_the_same_weights(tiny_shards, tmp_path):
    """data.num_workers = 2 (one persistent worker pool a run) reads exactly what the inline reader reads."""
    inline = train(load_config(None, train_overrides(tiny_shards, tmp_path / "inline", **{"train.steps": 3})))
    pooled = train(
        load_config(
            None, train_overrides(tiny_shards, tmp_path / "pooled", **{"train.steps": 3, "data.num_workers": 2})
        )
    )
    assert inline["step"] == pooled["step"] == 3
    a, b = weights(tmp_path / "inline"), weights(tmp_path / "pooled")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
