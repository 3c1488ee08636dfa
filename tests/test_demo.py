"""`make demo` end to end on the real (offline) emoji data, through the CLI with its defaults.

`make demo` runs `python -m dpcap demo --config configs/demo-cpu.yaml --out runs/demo`: the test calls
the same `dpcap.cli.main` with the progress bar on and wandb offline (the config's defaults), so the
suite runs what users run. Only sizes may be overridden here, where time requires.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from dpcap.errors import DataError
from dpcap.model import get_tokenizer
from dpcap.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"

# Sizes only; none are needed: the whole demo takes about 4½ minutes on 2 cores, so the test runs it as is.
SIZE_OVERRIDES: list[str] = []

STAGES = ("data", "train_dp", "train_nonprivate", "export", "probe_dp", "probe_nonprivate", "probe_random_init")


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 100, path
        image.verify()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    from dpcap.cli import main
    from dpcap.data.demo import emoji_font_path, emoji_test_path

    try:
        emoji_font_path(), emoji_test_path()
    except DataError as err:  # `make test` installs them; a bare pytest on another machine may not have them
        pytest.skip(str(err))
    monkeypatch.setenv("WANDB_MODE", "offline")  # what the config says; also keeps a user's WANDB_MODE out
    # Fixed (insecure) seeds make the test reproducible; `make demo` itself draws secret ones.
    seeds = ["privacy.insecure_noise_seed=1", "privacy.insecure_sampler_seed=2"]
    out = tmp_path / "demo"
    argv = ["demo", "--config", str(CONFIG), "--out", str(out), *SIZE_OVERRIDES, *seeds, "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])  # --json: the last stdout line
    saved = json.loads((out / "report.json").read_text())
    assert saved["probe"] == report["probe"]
    assert {"epsilon", "delta", "probe"} <= saved.keys() and set(saved["probe"]) == {"dp", "random_init", "nonprivate"}
    assert 7.9 <= saved["epsilon"] <= 8.0  # σ calibrated to spend the ε = 8 budget, never more
    assert saved["num_samples"] > 2000  # the real emoji train split
    assert saved["probe"]["dp"] > saved["probe"]["random_init"]
    # The baseline at its own batch, over twice the DP run's samples (the config's 2 × 50 × 256 = 400 × 64).
    assert saved["nonprivate_train"] == {"steps": 400, "batch_size": 64, "lr": 1e-3}
    assert len(read_metrics(out / "nonprivate" / "metrics.jsonl")) == 400
    # The captioners learn to caption: the non-private train loss ends well below uniform over the vocabulary.
    uniform = math.log(get_tokenizer("nano", vocab="unicode").vocab_size)
    last = [r["loss"] for r in read_metrics(out / "nonprivate" / "metrics.jsonl")[-5:]]
    assert sum(last) / len(last) < 0.6 * uniform
    export = out / "export"
    assert (export / "model.safetensors").is_file() and (export / "MODEL_CARD.md").is_file()

    assert len(saved["captions"]) == 8 and len({c["id"] for c in saved["captions"]}) == 8
    for sample in saved["captions"]:
        assert {"id", "image", "true", "dp", "nonprivate"} <= sample.keys()
        assert sample["true"].startswith("an emoji of ")
        assert all(isinstance(sample[k], str) and sample[k].strip() for k in ("dp", "nonprivate")), sample
    for png in (out / "captions.png", out / "probe.png", *(out / "probe" / f"{n}.png" for n in saved["probe"])):
        assert_png(png)
    assert set(STAGES) < saved["stage_seconds"].keys()
    assert all(seconds >= 0 for seconds in saved["stage_seconds"].values())
    assert sum(saved["stage_seconds"].values()) <= saved["seconds"] + 1
    total = len(saved["stage_seconds"])
    for i in range(1, total + 1):  # every stage announced on stderr, none on stdout (the JSON stays last)
        assert f"[demo {i}/{total}]" in captured.err and f"[demo {i}/{total}]" not in captured.out
    assert "dp steps" in captured.err  # the training progress bar was on


def test_demo_nonprivate_baseline_sees_twice_the_dp_runs_samples():
    from dpcap.config import load_config
    from dpcap.errors import ConfigError
    from dpcap.pipeline import demo_nonprivate_train

    def demo_config(*extra):
        return load_config(str(CONFIG), ["data.shards=_", "run_dir=_", *extra])

    def overrides(*extra):
        return demo_nonprivate_train(demo_config(*extra))

    base = demo_config()
    assert demo_nonprivate_train(base) == [
        "train.lr=0.001",
        "train.batch_size=64",
        "train.steps=400",  # twice the DP run's 50 steps × 256 = 400 × 64
        "train.warmup_steps=32",
        "train.checkpoint_every=200",
    ]
    # The DP run's micro-batch is kept: a Poisson batch of mean 64 is one micro-batch (5 std below it),
    # not 64 plus a second of a few samples that costs nearly as much.
    nonprivate = demo_config(*demo_nonprivate_train(base))
    assert nonprivate.train.micro_batch_size == base.train.micro_batch_size >= 64 + 5 * 64**0.5
    with pytest.raises(ConfigError, match="nonprivate_batch_size"):
        overrides("demo.nonprivate_batch_size=0")

    # Same compute as the DP run: as many samples, at the baseline's own batch or at the DP run's.
    once = "demo.nonprivate_sample_multiple=1"
    assert overrides(once)[1:4] == ["train.batch_size=64", "train.steps=200", "train.warmup_steps=16"]
    assert overrides("demo.nonprivate_batch_size=null", once) == ["train.lr=0.001"]
    at_dp_batch = overrides("demo.nonprivate_batch_size=null")
    assert at_dp_batch[1:4] == ["train.batch_size=256", "train.steps=100", "train.warmup_steps=8"]
    with pytest.raises(ConfigError, match="nonprivate_sample_multiple"):
        overrides("demo.nonprivate_sample_multiple=0")
