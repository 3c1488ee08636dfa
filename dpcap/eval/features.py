"""Frozen-encoder features: extract once, cache as safetensors, reuse for every probe.

A cache file is a safetensors file whose header metadata holds a ``fingerprint`` (a SHA-256 over
everything the features depend on: the encoder weights, the pooling, the image transform, the
shard folder's contents and the label key). A file whose fingerprint differs, or that cannot be
read, is recomputed and replaced atomically (temporary name, then ``os.replace``). String columns
(labels, splits) are stored as int64 ids plus the UTF-8 JSON list of names as a uint8 tensor, so the
file holds tensors only and is never unpickled.

`labelled_features` and `imagefolder_features` extract in chunks of ``chunk_size`` samples (rows
``[start, stop)`` of the data, in order). With a cache folder each finished chunk is its own file,
``<features|imagefolder>-<key[:32]>-<i:05d>-of-<n:05d>.safetensors``, holding ``features``,
``ids``, ``label_ids``/``label_names`` (and, for shard folders, ``split_ids``/``split_names``) with
metadata ``fingerprint`` (the cache key), ``chunk``, ``chunks``, ``start``, ``stop``, ``rows``
(samples kept) and ``precision``. A re-run with the same key loads the finished chunks and computes
only the missing ones, so a killed extraction resumes; a chunk whose key or row range differs, or
that cannot be read, is recomputed and replaced. Under torchrun/srun (``WORLD_SIZE > 1``) chunk
``i`` is computed by rank ``i % world_size`` and written to the (required, shared) cache folder;
after a barrier every rank loads all chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
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

DEFAULT_CHUNK_SIZE = 16_384
"""Samples per cache chunk: 16,384 × 768 float32 features are 48 MiB a file; ImageNet-1K train is 79 files."""


def extract_features(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    pool: str = "mean",
    device: str | torch.device = "cpu",
    autocast: bool | None = None,
) -> torch.Tensor:
    """Stack ``model.encode_image(images, pool=pool)`` over ``batches`` → (N, D) float32 on the CPU.

    The model is moved to ``device`` (in place) and run in eval mode under ``torch.no_grad()``; its
    previous train/eval mode is restored afterwards. ``autocast`` (default: on for a CUDA device)
    runs the forward under bf16 autocast; the features are returned in float32 either way. Empty
    batches are skipped; no batches at all give a (0, D) tensor, D read from
    ``model.encoder.num_features`` when available.
    """
    device = torch.device(device)
    use_bf16 = _use_bf16(device, autocast)
    was_training = model.training
    model.to(device).eval()
    out: list[torch.Tensor] = []
    try:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with torch.no_grad(), amp:
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    desc: str | None = None,
    autocast: bool | None = None,
    world: Any = None,
) -> dict[str, Any]:
    """Features and labels of every readable sample of a shard folder.

    Images go through ``dpcap.data.image_transform`` with the model's image size, mean and std.
    Returns ``{"features": (N, D) float32, "labels": list[str] (meta[label_key]), "split":
    list[str] (meta["split"], "" if absent), "ids": (N,) int64 global sample ids}``. Samples that
    fail to decode are skipped (the reader counts them). With ``cache_dir`` the result is cached,
    one file per chunk of ``chunk_size`` samples (see the module docstring), under a key hashing the
    encoder weights, pool, transform, precision, label key and shard contents. ``progress`` shows a
    bar over the images (stderr, titled ``desc``); ``device`` may be ``"auto"`` (this rank's GPU if
    any); ``world`` (default: :func:`dpcap.train.world.detect_world`) splits the chunks over ranks.
    """
    from dpcap.data.reader import MicroBatchLoader, SampleReader, image_transform, split_micro_batches

    _check_positive("batch_size", batch_size)
    _check_positive("chunk_size", chunk_size)
    world, device = _world_and_device(world, device, cache_dir)
    key = None
    if cache_dir is not None:
        key = _cache_key(model, shard_dir, label_key, pool, _precision(device, autocast))
    reader = SampleReader(shard_dir, image_transform(*_transform_args(model)))

    def compute(start: int, stop: int, bar: Any) -> dict[str, torch.Tensor]:
        metas: list[dict[str, Any]] = []
        ids = split_micro_batches(np.arange(start, stop), batch_size)
        loader = MicroBatchLoader(reader, ids, num_workers, pin_memory=device.type == "cuda")
        images = _counting(_images_collecting_meta(loader, metas, bar), bar)
        features = extract_features(model, images, pool=pool, device=device, autocast=autocast)
        return _labelled_tensors(features, metas, label_key, shard_dir)

    try:
        chunks = _chunked(
            compute,
            len(reader),
            chunk_size=chunk_size,
            cache_dir=cache_dir,
            prefix="features",
            key=key,
            world=world,
            progress=progress,
            desc=desc or f"features {Path(shard_dir).name}",
            precision=_precision(device, autocast),
        )
    finally:
        reader.close()
    return {
        "features": torch.cat([c["features"] for c in chunks]),
        "labels": [v for c in chunks for v in decode_strings(c["label_ids"], c["label_names"])],
        "split": [v for c in chunks for v in decode_strings(c["split_ids"], c["split_names"])],
        "ids": torch.cat([c["ids"] for c in chunks]),
    }


def imagefolder_features(
    model: nn.Module,
    root: str | os.PathLike,
    *,
    pool: str = "mean",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    desc: str | None = None,
    autocast: bool | None = None,
    world: Any = None,
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
    ``cache_dir`` the features are cached, one file per chunk of ``chunk_size`` images, under a key
    hashing the encoder weights, pool, transform, precision, every image's path, size and mtime, and
    the bytes of every label file read. ``progress``, ``desc``, ``device``, ``world``: as
    :func:`labelled_features`.
    """
    from dpcap.data.reader import image_transform
    from dpcap.eval.imagenet import ImageDataset, resolve_images

    _check_positive("batch_size", batch_size)
    _check_positive("chunk_size", chunk_size)
    world, device = _world_and_device(world, device, cache_dir)
    images = resolve_images(root)
    transform = image_transform(*_transform_args(model))

    def compute(start: int, stop: int, bar: Any) -> dict[str, torch.Tensor]:
        dataset = ImageDataset(images.files[start:stop], transform)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers if len(dataset) else 0,
            pin_memory=device.type == "cuda",
        )
        features = extract_features(model, _counting(loader, bar), pool=pool, device=device, autocast=autocast)
        label_ids, label_names = encode_strings(images.labels[start:stop])
        ids = torch.arange(start, stop, dtype=torch.int64)
        return {"features": features, "ids": ids, "label_ids": label_ids, "label_names": label_names}

    key = None
    if cache_dir is not None:
        key = _imagefolder_cache_key(model, images, pool, _precision(device, autocast))
    chunks = _chunked(
        compute,
        len(images.files),
        chunk_size=chunk_size,
        cache_dir=cache_dir,
        prefix="imagefolder",
        key=key,
        world=world,
        progress=progress,
        desc=desc or f"features {Path(root).name}",
        precision=_precision(device, autocast),
    )
    features = torch.cat([c["features"] for c in chunks])
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


def chunk_path(cache_dir: str | os.PathLike, prefix: str, key: str, index: int, chunks: int) -> Path:
    """The cache file of chunk ``index`` of ``chunks``: ``<prefix>-<key[:32]>-<index>-of-<chunks>.safetensors``."""
    return Path(cache_dir) / f"{prefix}-{key[:32]}-{index:05d}-of-{chunks:05d}.safetensors"


def _chunked(
    compute: Callable[[int, int, Any], dict[str, torch.Tensor]],
    n: int,
    *,
    chunk_size: int,
    cache_dir: str | os.PathLike | None,
    prefix: str,
    key: str | None,
    world: Any,
    progress: bool,
    desc: str,
    precision: str,
) -> list[dict[str, torch.Tensor]]:
    """The chunks ``[start, stop)`` of ``range(n)`` in order: loaded from the cache when finished
    there, else ``compute(start, stop, bar)`` and (with a cache) saved atomically. In a multi-rank
    world this rank computes chunks ``rank, rank + world_size, …``, then waits at a barrier and loads
    the others' chunks from the shared cache folder."""
    from tqdm.auto import tqdm

    bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    if not bounds:  # no samples: one empty computation gives the (0, D) shapes; nothing to cache
        return [compute(0, 0, None)]
    paths = [chunk_path(cache_dir, prefix, key, i, len(bounds)) for i in range(len(bounds))] if key else None
    mine = [i for i in range(len(bounds)) if i % world.world_size == world.rank]
    done: dict[int, dict[str, torch.Tensor]] = {}
    if paths is not None:
        for i in mine:
            loaded = _load_chunk(paths[i], key, i, *bounds[i])
            if loaded is not None:
                done[i] = loaded
    total = sum(bounds[i][1] - bounds[i][0] for i in mine)
    rank = f" (rank {world.rank}/{world.world_size})" if world.distributed else ""
    bar = tqdm(
        total=total,
        initial=sum(bounds[i][1] - bounds[i][0] for i in done),
        desc=desc + rank,
        unit="img",
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        if done:
            bar.set_postfix(cached=f"{len(done)}/{len(mine)} chunks")
        for i in mine:
            if i in done:
                continue
            start, stop = bounds[i]
            tensors = compute(start, stop, bar)
            if paths is not None:
                metadata = {
                    "fingerprint": key,
                    "format": "pt",
                    "dpcap": CACHE_FORMAT,
                    "chunk": str(i),
                    "chunks": str(len(bounds)),
                    "start": str(start),
                    "stop": str(stop),
                    "rows": str(int(tensors["features"].shape[0])),
                    "precision": precision,
                }
                _atomic_save(paths[i], tensors, metadata)
            done[i] = tensors
    finally:
        bar.close()
    if world.distributed:
        from dpcap.train.world import barrier

        barrier(world)
        for i in range(len(bounds)):
            if i in done:
                continue
            loaded = _load_chunk(paths[i], key, i, *bounds[i])
            if loaded is None:
                raise DataError(
                    f"{paths[i]}: chunk {i} (rows {bounds[i][0]}–{bounds[i][1]}) missing or stale after rank "
                    f"{i % world.world_size} finished: is {cache_dir} one folder shared by every rank?"
                )
            done[i] = loaded
    return [done[i] for i in range(len(bounds))]


def _load_chunk(path: Path, key: str, index: int, start: int, stop: int) -> dict[str, torch.Tensor] | None:
    """The tensors of a finished chunk file, or None when absent, unreadable or not this key's chunk."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            expected = {"fingerprint": key, "chunk": str(index), "start": str(start), "stop": str(stop)}
            if any(meta.get(k) != v for k, v in expected.items()):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _counting(batches: Iterable[torch.Tensor], bar: Any) -> Iterator[torch.Tensor]:
    """``batches`` as they are, advancing ``bar`` by each batch's images once it has been consumed."""
    for images in batches:
        yield images
        if bar is not None:
            bar.update(int(images.shape[0]))


def _world_and_device(world: Any, device: str | torch.device, cache_dir: Any) -> tuple[Any, torch.device]:
    """The launcher's world (joined when multi-rank; a cache folder is then required) and the device
    (``"auto"``: this rank's GPU, else the CPU)."""
    from dpcap.train.world import detect_world, device_for, init_distributed

    world = detect_world() if world is None else world
    if world.distributed:
        if cache_dir is None:
            raise ConfigError(
                f"distributed feature extraction ({world.world_size} ranks) needs a cache folder shared by all "
                "ranks (--cache DIR): each rank writes its chunks there, then reads the others'"
            )
        init_distributed(world)
    return world, device_for(world, str(device)) if str(device) == "auto" else torch.device(device)


def _use_bf16(device: torch.device, autocast: bool | None) -> bool:
    return device.type == "cuda" if autocast is None else bool(autocast)


def _precision(device: torch.device, autocast: bool | None) -> str:
    return "bfloat16-autocast" if _use_bf16(device, autocast) else "float32"


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _imagefolder_cache_key(model: nn.Module, images: Any, pool: str, precision: str = "float32") -> str:
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
        "precision": precision,
        "images": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _transform_args(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    cfg = model.config
    return cfg.vision.image_size, tuple(cfg.image_mean), tuple(cfg.image_std)


def _cache_key(
    model: nn.Module, shard_dir: str | os.PathLike, label_key: str, pool: str, precision: str = "float32"
) -> str:
    encoder = getattr(model, "encoder", model)
    parts = {
        "format": CACHE_FORMAT,
        "weights": weights_fingerprint(encoder),
        "pool": pool,
        "transform": _transform_args(model),
        "precision": precision,
        "label_key": label_key,
        "shards": shards_fingerprint(shard_dir),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _labelled_tensors(
    features: torch.Tensor, metas: list[dict[str, Any]], label_key: str, shard_dir: str | os.PathLike
) -> dict[str, torch.Tensor]:
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


def _images_collecting_meta(
    batches: Iterable[Any], metas: list[dict[str, Any]], bar: Any = None
) -> Iterator[torch.Tensor]:
    for batch in batches:
        metas.extend(batch.meta)
        if bar is not None and sum(batch.skipped.values()):
            bar.update(sum(batch.skipped.values()))  # the bar counts samples read, kept or not
        yield batch.images


def _label(meta: dict[str, Any], label_key: str, shard_dir: str | os.PathLike) -> str:
    if label_key not in meta:
        keys = ", ".join(sorted(meta)) or "none"
        raise DataError(f"sample {meta.get('id', '?')} in {shard_dir} has no label {label_key!r} (keys: {keys})")
    return str(meta[label_key])
