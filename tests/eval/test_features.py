"""Feature extraction and its safetensors cache; oracle: encode_image on hand-transformed images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dpcap.data.build import build_shards
from dpcap.data.reader import image_transform
from dpcap.errors import DataError
from dpcap.eval.features import cached_features, extract_features, labelled_features
from dpcap.model import create_captioner

GROUPS = ("animal", "food", "flag")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_captioner("nano", image_size=16, patch_size=8, vision_layers=1, text_layers=1, seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """9 random 20×24 PNGs with captions and sidecar labels, built into 2 shards."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"picture number {i}")
        meta = {"group": GROUPS[i % 3], "split": "test" if i >= 6 else "train"}
        (src / f"img{i}.json").write_text(json.dumps(meta))
    out = tmp_path_factory.mktemp("shards") / "ds"
    assert build_shards(src, out, samples_per_shard=5)["written"] == 9
    return src, out


def test_extract_features_matches_encode_image(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 16, 16, generator=gen)
    model.train()
    feats = extract_features(model, [images[:3], images[3:3], images[3:]], pool="mean")
    assert model.training  # previous mode restored
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(images, pool="mean")
        tokens = model.encoder.forward_features(images)
    assert feats.dtype == torch.float32 and feats.shape == (7, 128)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    cls = extract_features(model, [images], pool="cls")
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-5, atol=1e-5)
    assert extract_features(model, []).shape == (0, 128)


def test_cached_features_computes_once(tmp_path: Path) -> None:
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"features": torch.arange(6.0).view(3, 2), "ids": torch.tensor([4, 5, 6])}

    path = tmp_path / "cache" / "f.safetensors"
    first = cached_features(path, compute, fingerprint="abc")
    second = cached_features(path, compute, fingerprint="abc")
    assert len(calls) == 1
    assert torch.equal(first["features"], second["features"]) and torch.equal(second["ids"], torch.tensor([4, 5, 6]))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["fingerprint"] == "abc"
    cached_features(path, compute, fingerprint="other")  # stale fingerprint → recompute and replace
    assert len(calls) == 2
    path.write_bytes(b"not a safetensors file")  # unreadable → recompute
    assert torch.equal(cached_features(path, compute, fingerprint="other")["ids"], torch.tensor([4, 5, 6]))
    assert len(calls) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.safetensors"]  # no temporaries left


def test_labelled_features_against_manual_transform(model: torch.nn.Module, shards: tuple[Path, Path]) -> None:
    src, out = shards
    result = labelled_features(model, out, label_key="group", batch_size=4)
    assert result["labels"] == [GROUPS[i % 3] for i in range(9)]
    assert result["split"] == ["train"] * 6 + ["test"] * 3
    assert result["ids"].tolist() == list(range(9))
    cfg = model.config
    transform = image_transform(cfg.vision.image_size, cfg.image_mean, cfg.image_std)
    images = torch.stack([transform(Image.open(src / f"img{i}.png")) for i in range(9)])
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(images, pool="mean")
    torch.testing.assert_close(result["features"], ref, rtol=1e-5, atol=1e-5)


def test_labelled_features_cache_is_read_and_keyed_by_weights(
    model: torch.nn.Module, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = shards
    first = labelled_features(model, out, label_key="group", pool="cls", cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.safetensors")
    # Tamper with the cached features (same fingerprint): a second call must return the file's content.
    with safe_open(str(cache), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(cache)
    tensors["features"] = torch.zeros_like(tensors["features"])
    save_file(tensors, cache, metadata=metadata)
    second = labelled_features(model, out, label_key="group", pool="cls", cache_dir=tmp_path)
    assert torch.count_nonzero(second["features"]) == 0 and second["labels"] == first["labels"]
    # Another pool, and changed weights, are other cache entries with fresh features.
    mean = labelled_features(model, out, label_key="group", pool="mean", cache_dir=tmp_path)
    assert torch.count_nonzero(mean["features"]) > 0
    other = create_captioner("nano", image_size=16, patch_size=8, vision_layers=1, text_layers=1, seed=1)
    changed = labelled_features(other, out, label_key="group", pool="cls", cache_dir=tmp_path)
    assert not torch.allclose(changed["features"], first["features"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_labelled_features_missing_label_key(model: torch.nn.Module, shards: tuple[Path, Path]) -> None:
    with pytest.raises(DataError, match="subgroup"):
        labelled_features(model, shards[1], label_key="subgroup")
