"""MetricWriter with the defaults users get (progress bar on, wandb offline) and records with gaps."""

from __future__ import annotations

import json
import math

import pytest

from dpcap.train.metrics import MetricWriter, NonFiniteLossError, plot_curves

# What the loop writes: a DP step, a non-private step (epsilon None), a step whose batch was empty
# (no loss), and both at once.
RECORDS = [
    {"step": 1, "loss": 2.5, "epsilon": 0.75, "seconds": 0.1},
    {"step": 2, "loss": 2.25, "epsilon": None, "seconds": 0.1},
    {"step": 3, "epsilon": 0.8, "seconds": 0.1},
    {"step": 4, "loss": None, "epsilon": None, "seconds": 0.1},
]
POSTFIXES = ["eps=0.75, loss=2.500", "eps=∞, loss=2.250", "eps=0.80, loss=n/a", "eps=∞, loss=n/a"]  # tqdm sorts keys


def test_progress_bar_and_offline_wandb_accept_missing_and_none_values(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never reach the network, whatever the machine's settings
    writer = MetricWriter(tmp_path, total_steps=len(RECORDS), progress=True, wandb_mode="offline")
    try:
        postfixes = []
        for record in RECORDS:
            writer.write(record)
            postfixes.append(writer._bar.postfix)
    finally:
        writer.close()
    assert postfixes == POSTFIXES
    assert POSTFIXES[-1] in capsys.readouterr().err  # the bar's last refresh, as a user sees it
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    assert (tmp_path / "wandb").is_dir()


def test_non_finite_loss_still_stops_the_run(tmp_path):
    writer = MetricWriter(tmp_path, total_steps=1, progress=False, wandb_mode="disabled")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        writer.write({"step": 1, "loss": math.nan, "epsilon": None})


def test_curves_plot_records_without_loss_or_epsilon(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = plot_curves(metrics, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert out.stat().st_size > 0
