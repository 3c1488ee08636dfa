"""The offline emoji data set: parsing, rendering, captions and leak-free splits."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpcap.data import demo
from dpcap.data.index import ShardIndex
from dpcap.errors import ConfigError, DataError


def require_packages() -> None:
    try:
        demo.emoji_font_path()
        demo.emoji_test_path()
    except DataError as exc:
        pytest.skip(f"emoji demo data unavailable: {exc}")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_packages()
    return demo.build_emoji_source(tmp_path_factory.mktemp("emoji"), image_size=32, limit=200)


def manifest_rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def test_base_name_strips_only_skin_tones() -> None:
    assert demo.base_name("waving hand: medium skin tone") == "waving hand"
    assert demo.base_name("handshake: medium-light skin tone, light skin tone") == "handshake"
    assert demo.base_name("kiss: woman, man, dark skin tone") == "kiss: woman, man"
    assert demo.base_name("man: medium skin tone, red hair") == "man: red hair"
    assert demo.base_name("flag: Germany") == "flag: Germany"
    assert demo.base_name("medium skin tone") == "medium skin tone"


def test_parse_emoji_test() -> None:
    require_packages()
    entries = demo.parse_emoji_test(demo.emoji_test_path())
    assert len(entries) > 3000
    assert len({e.group for e in entries}) >= 9
    first = entries[0]
    assert (first.codepoints, first.name, first.group, first.subgroup) == (
        (0x1F600,),
        "grinning face",
        "Smileys & Emotion",
        "face-smiling",
    )
    assert first.text == "\U0001f600" and first.slug == "1f600"
    assert len({e.slug for e in entries}) == len(entries)


def test_rendered_images_are_real_glyphs(source: Path) -> None:
    rows = manifest_rows(source)
    stats = json.loads((source.parent / "emoji_stats.json").read_text())
    assert len(rows) == stats["rendered"] == 200 - stats["blank"] and stats["blank"] <= 2
    for row in rows[::20]:
        pixels = np.asarray(Image.open(source.parent / row["image"]))
        assert pixels.shape == (32, 32, 3)
        assert pixels.std() > 10 and (pixels < 250).mean() > 0.1  # neither blank nor nearly blank
    assert len({r["group"] for r in rows}) >= 8  # the limit is spread over the whole file


def test_captions_and_fields(source: Path) -> None:
    rows = manifest_rows(source)
    assert all(r["caption"] == f"an emoji of {r['name']}" for r in rows)
    assert {"image", "caption", "group", "subgroup", "base", "split", "name", "codepoints"} <= set(rows[0])
    toned = [r for r in rows if "skin tone" in r["name"]]
    assert toned and all("skin tone" not in r["base"] for r in toned if r["group"] != "Component")


def test_splits_are_disjoint_by_base(source: Path) -> None:
    rows = manifest_rows(source)
    splits_of_base = defaultdict(set)
    for r in rows:
        splits_of_base[r["base"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_base.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_split_proportions_over_all_bases() -> None:
    require_packages()
    bases = sorted({demo.base_name(e.name) for e in demo.parse_emoji_test(demo.emoji_test_path())})
    fractions = {s: np.mean([demo.split_of(b, 0) == s for b in bases]) for s in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.70) < 0.04 and abs(fractions["val"] - 0.15) < 0.03
    assert demo.split_of("grinning face", 0) == demo.split_of("grinning face", 0)


def test_build_emoji_dataset_shards_each_split(tmp_path: Path) -> None:
    require_packages()
    result = demo.build_emoji_dataset(tmp_path, image_size=16, limit=60, samples_per_shard=16)
    rows = manifest_rows(Path(result["source"]))
    for split in ("train", "val", "test"):
        expected = sum(r["split"] == split for r in rows)
        assert result[split]["written"] == expected == len(ShardIndex(tmp_path / split))
        assert result[split]["skipped"] == {}


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "FONT_CANDIDATES", ("/nonexistent/NotoColorEmoji.ttf",))
    monkeypatch.setattr(demo, "EMOJI_TEST_CANDIDATES", ("/nonexistent/emoji-test.txt",))
    with pytest.raises(DataError, match="fonts-noto-color-emoji"):
        demo.emoji_font_path()
    with pytest.raises(DataError, match="unicode-data"):
        demo.emoji_test_path()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        demo.build_emoji_source(tmp_path, image_size=4)
    require_packages()
    with pytest.raises(ConfigError):
        demo.build_emoji_source(tmp_path, limit=0)
