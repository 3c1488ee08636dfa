"""Greedy captions of a shard folder's samples; oracle: the reader's batch through generate and decode by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpcap.data.reader import SampleReader, image_transform
from dpcap.data.tokenizer import CaptionTokenizer
from dpcap.errors import ConfigError
from dpcap.eval.captions import caption_samples, save_captions_png, spread_ids
from dpcap.model import create_captioner
from tests.conftest import TINY_CAPTIONER


@pytest.fixture(scope="module")
def captioners() -> dict[str, torch.nn.Module]:
    return {name: create_captioner("nano", seed=seed, **TINY_CAPTIONER).eval() for name, seed in (("a", 0), ("b", 1))}


def test_spread_ids_are_slice_centres() -> None:
    assert spread_ids(48, 8) == [3, 9, 15, 21, 27, 33, 39, 45]
    assert spread_ids(3, 8) == [0, 1, 2]  # never more ids than samples
    with pytest.raises(ConfigError):
        spread_ids(10, 0)


def test_caption_samples_match_generate_and_decode(captioners, tiny_shards: Path) -> None:
    samples = caption_samples(captioners, tiny_shards, count=6, image_key="colour")
    assert [s.id for s in samples] == spread_ids(48, 6)
    model = captioners["b"]
    cfg = model.config
    reader = SampleReader(tiny_shards, image_transform(cfg.vision.image_size, cfg.image_mean, cfg.image_std))
    batch = reader.read([s.id for s in samples])
    tokenizer = CaptionTokenizer(cfg.text.context_length, vocab=cfg.text.vocab)
    with torch.no_grad():
        expected = tokenizer.decode(model.generate(batch.images))
    assert [s.captions["b"] for s in samples] == expected
    assert [s.true for s in samples] == batch.captions
    assert [s.image for s in samples] == [m["colour"] for m in batch.meta]
    assert samples[0].to_json() == {"id": 4, "image": "red", "true": "a red stripe", **samples[0].captions}
    assert set(samples[0].captions) == {"a", "b"}
    assert samples[0].pixels.shape == (16, 16, 3) and 0 <= samples[0].pixels.min() <= samples[0].pixels.max() <= 1
    again = caption_samples(captioners, tiny_shards, ids=[s.id for s in samples], tokenizer=tokenizer)
    assert [s.captions for s in again] == [s.captions for s in samples]  # greedy: deterministic
    assert [s.image for s in again] == [str(s.id) for s in samples]  # no image_key: the id


def test_caption_names_may_not_shadow_sample_keys(captioners, tiny_shards: Path) -> None:
    with pytest.raises(ConfigError, match="true"):
        caption_samples({"true": captioners["a"]}, tiny_shards, count=2)


def test_captions_png_is_an_image_and_leaves_no_temporary(captioners, tiny_shards: Path, tmp_path: Path) -> None:
    samples = caption_samples(captioners, tiny_shards, count=5)
    samples[0].captions["a"] = "a very long caption " * 6  # wraps over several lines
    out = save_captions_png(samples, tmp_path / "figs" / "captions.png", labels={"a": "DP"}, columns=3, title="t")
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and width == 990 and height > 2 * 220  # 3 columns of 3.3 in, 2 rows at 100 dpi
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100  # text and images were drawn, not a blank canvas
    assert [f.name for f in out.parent.iterdir()] == ["captions.png"]
    with pytest.raises(ConfigError):
        save_captions_png([], tmp_path / "empty.png")
