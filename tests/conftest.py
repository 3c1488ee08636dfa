"""Shared tiny fixtures, built in the test session (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A captioner small enough to train a few steps in about a second on 2 CPU cores.
TINY_CAPTIONER = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2)
TINY_CAPTIONER |= dict(text_width=32, text_layers=1, text_heads=2, context_length=12)
TINY_MODEL = ["model.size=nano"] + [f"model.{key}={value}" for key, value in TINY_CAPTIONER.items()]

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe")


def write_caption_folder(root: Path, count: int = 48, seed: int = 0) -> Path:
    """Images of coloured shapes with captions ("a red square") and labels, as a manifest."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        pixels = rng.integers(0, 40, size=(24, 24, 3), dtype=np.uint8)
        if shape == "square":
            pixels[6:18, 6:18] = COLOURS[colour]
        else:
            pixels[:, 9:15] = COLOURS[colour]
        path = root / "images" / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        rows.append(
            {"image": f"images/{path.name}", "caption": f"a {colour} {shape}", "colour": colour, "shape": shape}
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A shard folder of 48 labelled image-caption pairs in 2 shards."""
    from dpcap.data.build import build_shards

    root = tmp_path_factory.mktemp("tiny")
    build_shards(write_caption_folder(root / "src"), root / "shards", samples_per_shard=24)
    return root / "shards"


def train_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """Config overrides for a short, fully deterministic (insecure-seeded) tiny run."""
    base = {
        "data.shards": str(shards),
        "run_dir": str(run_dir),
        "train.steps": 4,
        "train.batch_size": 16,
        "train.micro_batch_size": 8,
        "train.warmup_steps": 1,
        "train.checkpoint_every": 1,
        "privacy.sigma": 1.0,
        "privacy.insecure_noise_seed": 7,
        "privacy.insecure_sampler_seed": 11,
        "log.wandb": "disabled",
        "log.progress": False,
    }
    return tiny_run_overrides({**base, **extra})


def tiny_run_overrides(settings: dict) -> list[str]:
    """The tiny captioner's model keys plus `settings` as key=value strings (None → null)."""
    return TINY_MODEL + [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
