"""Frozen-encoder features: extract once, cache as safetensors, reuse for every probe.

A cache file is a safetensors file whose header metadata holds a ``fingerprint`` (a SHA-256 over
everything the features depend on: the encoder weights, the pooling, the image transform, the
shard folder's contents and the label key). A file whose fingerprint differs, or that cannot be
read, is recomputed and replaced atomically (temporary name, then ``os.replace``). String columns
(labels, splits) are stored as int64 ids plus the UTF-8 JSON list of names as a uint8 tensor, so the
file holds tensors only and is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dpcap.errors import ConfigError, DataError

CACHE_FORMAT = "dpcap-features-v1"


def extract_features(
    model: nn.Module, batches: Iterable[torch.Tensor], *, pool: str = "mean", device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Stack ``model.encode_image(images, pool=pool)`` over ``batches`` → (N, D) float32 on the CPU.

    The model is moved to ``device`` (in place) and run in eval mode under ``torch.no_grad()``; its
    previous train/eval mode is restored afterwards. Empty batches are skipped; no batches at all
    give a (0, D) tensor, D read from ``model.encoder.num_features`` when available.
    """
    was_training = model.training
    model.to(device).eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for images in batches:
                if not isinstance(images, torch.Tensor):
                    raise ConfigError(f"extract_features expects image tensors, got {type(images).__name__}")
                if images.shape[0]:
                    feats = model.encode_image(images.to(device, non_blocking=True), pool=pool)
                    out.append(feats.float().cpu())
    finally:
        model.train(was_training)
    if out:
        return torch.cat(out)
    return torch.zeros(0, int(getattr(getattr(model, "encoder", None), "num_features", 0)))


def cached_features(
    cache_path: str | os.PathLike, compute_fn: Callable[[], dict[str, torch.Tensor]], *, fingerprint: str
) -> dict[str, torch.Tensor]:
    """Load ``cache_path`` if its metadata fingerprint equals ``fingerprint``, else compute and save.

    ``compute_fn()`` returns a dict of tensors. The file is written atomically with metadata
    ``{"fingerprint", "format"}``; an unreadable or stale file is simply recomputed.
    """
    path = Path(cache_path)
    if _stored_fingerprint(path) == fingerprint:
        return load_file(path)
    tensors = compute_fn()
    _atomic_save(path, tensors, {"fingerprint": fingerprint, "format": "pt", "dpcap": CACHE_FORMAT})
    return tensors


def _stored_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (SafetensorError, OSError, ValueError):
        return None


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the module's state dict: every tensor's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shards_fingerprint(shard_dir: str | os.PathLike) -> str:
    """SHA-256 over the resolved folder path, its ``sizes.json`` (or an in-place index's ``shards.json``)
    and the size and mtime of each shard and index file it names."""
    from dpcap.data.layout import SIZES_FILE, WDS_INDEX_FILE

    root = Path(shard_dir).resolve()
    listing = root / SIZES_FILE
    if not listing.is_file():
        listing = root / WDS_INDEX_FILE
    if not listing.is_file():
        raise DataError(
            f"{root / SIZES_FILE} not found: not a shard folder (build it with `dpcap data build`, or index "
            "WebDataset shards with `dpcap data index`)"
        )
    digest = hashlib.sha256(f"{root}|".encode())
    digest.update(listing.read_bytes())
    if listing.name == SIZES_FILE:
        files = sorted(root.glob("*.tar")) + sorted(root.glob("*.idx"))
    else:  # the tars live elsewhere; the index names them
        shards = json.loads(listing.read_bytes())["shards"]
        files = [Path(s["path"]) for s in shards] + [root / s["index"] for s in shards]
    for path in files:
        stat = path.stat()
        digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def encode_strings(values: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings → (int64 ids into the sorted distinct names, uint8 tensor of the names' UTF-8 JSON)."""
    names = sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    ids = torch.tensor([lookup[v] for v in values], dtype=torch.int64)
    blob = torch.frombuffer(bytearray(json.dumps(names).encode("utf-8")), dtype=torch.uint8)
    return ids, blob


def decode_strings(ids: torch.Tensor, blob: torch.Tensor) -> list[str]:
    """Inverse of :func:`encode_strings`."""
    names = json.loads(bytes(blob.numpy().tobytes()).decode("utf-8"))
    return [names[i] for i in ids.tolist()]


def labelled_features(
    model: nn.Module,
    shard_dir: str | os.PathLike,
    *,
    label_key: str,
    pool: str = "mean",
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Features and labels of every readable sample of a shard folder.

    Images go through ``dpcap.data.image_transform`` with the model's image size, mean and std.
    Returns ``{"features": (N, D) float32, "labels": list[str] (meta[label_key]), "split":
    list[str] (meta["split"], "" if absent), "ids": (N,) int64 global sample ids}``. Samples that
    fail to decode are skipped (the reader counts them). With ``cache_dir`` the result is cached
    under a key hashing the encoder weights, pool, transform, label key and shard contents.
    """
    if cache_dir is None:
        return _unpack(_compute_labelled(model, shard_dir, label_key, pool, batch_size, device, num_workers))
    key = _cache_key(model, shard_dir, label_key, pool)
    path = Path(cache_dir) / f"features-{key[:32]}.safetensors"
    tensors = cached_features(
        path,
        lambda: _compute_labelled(model, shard_dir, label_key, pool, batch_size, device, num_workers),
        fingerprint=key,
    )
    return _unpack(tensors)


def imagefolder_features(
    model: nn.Module,
    root: str | os.PathLike,
    *,
    pool: str = "mean",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Features of a folder of images: an ImageFolder tree (``root/<class>/<image>``, labels = class
    folder names; ImageNet's ``train/`` or a sorted ``val/``) or ImageNet's flat ``val/`` with its
    label file (Kaggle's ``LOC_val_solution.csv`` or the devkit's ground truth); see
    :mod:`dpcap.eval.imagenet` for the files looked for and where.

    Images go through dpcap's own image transform (the model's size, mean, std). Returns
    ``{"features": (N, D) float32, "labels": list[str], "split": [""] * N, "ids": arange(N),
    "files": list[str] (paths relative to root, in row order), "class_names": {label: display
    name} (from LOC_synset_mapping.txt / meta.mat; {} when none), "layout": "tree" | "flat-csv" |
    "flat-devkit", "label_source": str | None (the label file, None for a tree)}``. With
    ``cache_dir`` the features are cached under a key hashing the encoder weights, pool, transform,
    every image's path, size and mtime, and the bytes of every label file read.
    """
    from dpcap.data.reader import image_transform
    from dpcap.eval.imagenet import ImageDataset, resolve_images

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    images = resolve_images(root)

    def compute() -> dict[str, torch.Tensor]:
        dataset = ImageDataset(images.files, image_transform(*_transform_args(model)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        return {"features": extract_features(model, loader, pool=pool, device=device)}

    if cache_dir is None:
        features = compute()["features"]
    else:
        key = _imagefolder_cache_key(model, images, pool)
        path = Path(cache_dir) / f"imagefolder-{key[:32]}.safetensors"
        features = cached_features(path, compute, fingerprint=key)["features"]
    n = len(images.labels)
    return {
        "features": features,
        "labels": list(images.labels),
        "split": [""] * n,
        "ids": torch.arange(n),
        "files": images.relative_files(),
        "class_names": dict(images.class_names),
        "layout": images.layout,
        "label_source": None if images.label_source is None else str(images.label_source),
    }


def _imagefolder_cache_key(model: nn.Module, images: Any, pool: str) -> str:
    digest = hashlib.sha256(f"{images.root}|{images.layout}|".encode())
    for path in images.files:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    for source in images.sources:
        digest.update(f"{source}|".encode())
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    parts = {
        "format": CACHE_FORMAT,
        "weights": weights_fingerprint(getattr(model, "encoder", model)),
        "pool": pool,
        "transform": _transform_args(model),
        "images": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _transform_args(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    cfg = model.config
    return cfg.vision.image_size, tuple(cfg.image_mean), tuple(cfg.image_std)


def _cache_key(model: nn.Module, shard_dir: str | os.PathLike, label_key: str, pool: str) -> str:
    encoder = getattr(model, "encoder", model)
    parts = {
        "format": CACHE_FORMAT,
        "weights": weights_fingerprint(encoder),
        "pool": pool,
        "transform": _transform_args(model),
        "label_key": label_key,
        "shards": shards_fingerprint(shard_dir),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _compute_labelled(
    model: nn.Module,
    shard_dir: str | os.PathLike,
    label_key: str,
    pool: str,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
) -> dict[str, torch.Tensor]:
    from dpcap.data.reader import MicroBatchLoader, SampleReader, image_transform, split_micro_batches

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    reader = SampleReader(shard_dir, image_transform(*_transform_args(model)))
    metas: list[dict[str, Any]] = []
    loader = MicroBatchLoader(reader, split_micro_batches(np.arange(len(reader)), batch_size), num_workers)
    try:
        features = extract_features(model, _images_collecting_meta(loader, metas), pool=pool, device=device)
    finally:
        reader.close()
    labels = [_label(m, label_key, shard_dir) for m in metas]
    label_ids, label_names = encode_strings(labels)
    split_ids, split_names = encode_strings([str(m.get("split", "")) for m in metas])
    ids = torch.tensor([int(m.get("id", -1)) for m in metas], dtype=torch.int64)
    return {
        "features": features,
        "label_ids": label_ids,
        "label_names": label_names,
        "split_ids": split_ids,
        "split_names": split_names,
        "ids": ids,
    }


def _images_collecting_meta(batches: Iterable[Any], metas: list[dict[str, Any]]) -> Iterator[torch.Tensor]:
    for batch in batches:
        metas.extend(batch.meta)
        yield batch.images


def _label(meta: dict[str, Any], label_key: str, shard_dir: str | os.PathLike) -> str:
    if label_key not in meta:
        keys = ", ".join(sorted(meta)) or "none"
        raise DataError(f"sample {meta.get('id', '?')} in {shard_dir} has no label {label_key!r} (keys: {keys})")
    return str(meta[label_key])


def _unpack(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "features": tensors["features"],
        "labels": decode_strings(tensors["label_ids"], tensors["label_names"]),
        "split": decode_strings(tensors["split_ids"], tensors["split_names"]),
        "ids": tensors["ids"],
    }
