"""Fetch samples by global id, decode, transform and tokenize them; skip and count bad ones.

Random access uses the member offsets of the ``.idx`` files (layout in :mod:`dpcap.data.build`): for
each sample one ``os.pread`` covers its three adjacent members (image, caption, metadata), so a read
costs one system call instead of parsing tar headers, and never asks for more bytes than the shard
file holds. A sample that fails to decode is skipped and counted (it contributes zero to the step,
which never changes N, q or the step count), never raised. So is an image whose header declares more
than ``max_image_pixels`` pixels (:data:`dpcap.data.layout.MAX_IMAGE_PIXELS` by default): it is
counted as ``too_many_pixels`` and never decoded.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dpcap.data.index import ShardIndex
from dpcap.data.layout import MAX_IMAGE_PIXELS
from dpcap.errors import ConfigError, DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# What `Batch.skipped` counts a sample under (a fixed list: ranks sum their counts in this order).
SKIP_REASONS = ("corrupt_image", "too_many_pixels", "bad_caption", "bad_meta")
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class Batch:
    """Decoded samples of one micro-batch, sorted by global id.

    ``images`` (b, 3, H, W) float32, ``tokens`` (b, L) int64 (L = 0 without a tokenizer), ``ids`` (b,)
    int64, ``meta`` the samples' metadata dicts, ``skipped`` {reason: count} of the requested ids that
    were dropped, ``captions`` the b caption strings.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    ids: torch.Tensor
    meta: list[dict]
    skipped: dict[str, int]
    captions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on ``device``."""
        move = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in ("images", "tokens", "ids")}
        return replace(self, **move)

    def pin_memory(self) -> Batch:
        """Pinned copy (called by ``DataLoader(pin_memory=True)``)."""
        return replace(self, **{k: getattr(self, k).pin_memory() for k in ("images", "tokens", "ids")})


class _BadSample(Exception):
    """A sample that cannot be used; ``args[0]`` is the reason counted in ``Batch.skipped``."""


# ---------------------------------------------------------------- image transform


class ImageTransform:
    """PIL image → normalised float tensor (3, S, S); see :func:`image_transform`."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std need 3 values each and std > 0, got mean={mean!r} std={std!r}")
        self.image_size = image_size
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        square = center_crop_square(to_rgb(image))
        resized = square.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def __repr__(self) -> str:
        return (
            f"ImageTransform({self.image_size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
        )


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """RGB (alpha composited on white) → centre crop to a square → bicubic resize → [0, 1] → (x - mean) / std.

    Deterministic (no augmentation); picklable, so it can travel to DataLoader workers.
    """
    return ImageTransform(image_size, mean, std)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited over white (alpha blending)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centred square of ``image``."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


# ---------------------------------------------------------------- decoding one sample


def decode_caption(data: bytes) -> str:
    """UTF-8 caption, stripped; raises ``_BadSample("bad_caption")`` if invalid or empty."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _BadSample("bad_caption") from None
    if not text:
        raise _BadSample("bad_caption")
    return text


def decode_meta(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        raise _BadSample("bad_meta") from None
    if not isinstance(meta, dict):
        raise _BadSample("bad_meta")
    return meta


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decoded PIL image; raises ``_BadSample("corrupt_image")`` on any decoder failure.

    The size in the header is checked before decoding: above ``max_pixels`` pixels it raises
    ``_BadSample("too_many_pixels")`` without decoding (so does Pillow's DecompressionBombError, above
    twice ``PIL.Image.MAX_IMAGE_PIXELS``; its DecompressionBombWarning is silenced, the cap here decides).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise _BadSample("too_many_pixels")
            image.load()
        except _BadSample:
            raise
        except Image.DecompressionBombError:
            raise _BadSample("too_many_pixels") from None
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise _BadSample("corrupt_image") from None
    return image


# ---------------------------------------------------------------- reader


class SampleReader:
    """Reads samples of a shard folder by global id (``read(ids) -> Batch``).

    File descriptors are opened lazily, kept in a small per-process LRU cache and reopened after a fork
    or unpickling, so one reader can be handed to DataLoader workers.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Tokenizer | None = None,
        *,
        max_open_files: int = 128,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        self.index = ShardIndex(shard_dir)
        self.transform, self.tokenizer = transform, tokenizer
        self.max_open_files = max_open_files
        self.max_image_pixels = max_image_pixels
        self._fds: OrderedDict[int, tuple[int, int]] = OrderedDict()  # shard → (descriptor, file size)
        self._pid = os.getpid()
        self._empty_shapes: tuple[tuple[int, ...], int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's file descriptors (the reader reopens them on the next read)."""
        fds = getattr(self, "_fds", {})
        if getattr(self, "_pid", None) == os.getpid():
            for fd, _ in fds.values():
                os.close(fd)
        fds.clear()

    def read(self, ids: np.ndarray | Sequence[int]) -> Batch:
        """Decode the samples ``ids`` (any order, in range) into a :class:`Batch` sorted by id."""
        kept: list[tuple[int, torch.Tensor, str, dict]] = []
        skipped: Counter[str] = Counter()
        for group in self.index.locate_many(np.asarray(ids)):
            fd, file_size = self._fd(group.shard)
            labels = group.labels.tolist() if group.labels is not None else [-1] * len(group.ids)
            for gid, row, label in zip(group.ids.tolist(), group.rows.tolist(), labels):
                try:
                    image, caption, meta = self._decode(fd, row, file_size)
                except _BadSample as bad:
                    skipped[bad.args[0]] += 1
                    continue
                if label >= 0:  # a webdataset `.cls` member, indexed in place
                    meta = {**meta, "cls": label}
                kept.append((gid, image, caption, meta))
        return self._assemble(kept, dict(sorted(skipped.items())))

    def _decode(self, fd: int, row: list[int], file_size: int) -> tuple[torch.Tensor, str, dict]:
        """One pread for the sample's three members, then caption → meta → image (cheapest first).

        The read stops at the end of the file: members past it (a shard cut short after indexing, see
        `ShardIndex`) come back short and make the sample bad, and no buffer is ever larger than the file.
        """
        img_off, img_len, txt_off, txt_len, meta_off, meta_len = row
        present = [(off, size) for off, size in ((img_off, img_len), (txt_off, txt_len), (meta_off, meta_len)) if size]
        if not present:
            raise _BadSample("corrupt_image")
        start = min(off for off, _ in present)  # size 0: the member is absent (in-place indexes)
        end = min(max(off + size for off, size in present), file_size)
        buf = os.pread(fd, end - start, start) if end > start else b""
        image, text, meta = (
            _member(buf, off - start, size, reason) if size else b""
            for off, size, reason in (
                (img_off, img_len, "corrupt_image"),
                (txt_off, txt_len, "bad_caption"),
                (meta_off, meta_len, "bad_meta"),
            )
        )
        meta_dict = decode_meta(meta) if meta_len else {}
        if txt_len:
            caption = decode_caption(text)
        else:  # an in-place index whose caption lives in the JSON member
            value = meta_dict.get(self.index.caption_key or "caption")
            caption = decode_caption(value.encode("utf-8") if isinstance(value, str) else b"")
        return self.transform(decode_image(image, self.max_image_pixels)), caption, meta_dict

    def _assemble(self, kept: list[tuple[int, torch.Tensor, str, dict]], skipped: dict[str, int]) -> Batch:
        ids = torch.tensor([k[0] for k in kept], dtype=torch.int64)
        captions = [k[2] for k in kept]
        if kept:
            images = torch.stack([k[1] for k in kept])
            tokens = self._tokenize(captions)
        else:
            image_shape, length = self._shapes()
            images, tokens = torch.empty((0, *image_shape)), torch.empty((0, length), dtype=torch.int64)
        return Batch(images, tokens, ids, [k[3] for k in kept], skipped, captions)

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            return torch.empty((len(captions), 0), dtype=torch.int64)
        return torch.as_tensor(self.tokenizer(captions), dtype=torch.int64)

    def _shapes(self) -> tuple[tuple[int, ...], int]:
        """Image shape (3, H, W) and token length L, for empty batches."""
        if self._empty_shapes is None:
            size = getattr(self.transform, "image_size", None)
            shape = (3, size, size) if size else tuple(self.transform(Image.new("RGB", (8, 8))).shape)
            length = getattr(self.tokenizer, "context_length", None)
            if length is None:
                length = self._tokenize([""]).shape[1]
            self._empty_shapes = (shape, int(length))
        return self._empty_shapes

    def _fd(self, shard: int) -> tuple[int, int]:
        """``(descriptor, size in bytes)`` of a shard's tar, opened on first use."""
        if self._pid != os.getpid():  # forked or unpickled: the inherited descriptors belong to the parent
            self._fds, self._pid = OrderedDict(), os.getpid()
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        path = self.index.shard_paths[shard]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DataError(f"shard {path} has disappeared (listed in {self.index.dir / 'sizes.json'})") from None
        self._fds[shard] = (fd, os.fstat(fd).st_size)
        if len(self._fds) > self.max_open_files:
            os.close(self._fds.popitem(last=False)[1][0])
        return self._fds[shard]


def _member(buf: bytes, start: int, size: int, reason: str) -> bytes:
    """``buf[start:start + size]``; a short read (truncated shard) makes the sample bad for ``reason``."""
    data = buf[start : start + size]
    if len(data) != size:
        raise _BadSample(reason)
    return data


# ---------------------------------------------------------------- micro-batches


def split_micro_batches(ids: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks of at most ``micro_batch_size`` ids; an empty id array gives ``[]``."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    ids = np.asarray(ids, dtype=np.int64)
    return [ids[i : i + micro_batch_size] for i in range(0, len(ids), micro_batch_size)]


def rank_share(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's disjoint share ``ids[rank::world]``; the shares of all ranks partition ``ids``."""
    if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
        raise ConfigError(f"need 0 <= rank < world, got rank={rank!r} world={world!r}")
    return np.asarray(ids)[rank::world]


class _IdLists(Dataset):
    def __init__(self, reader: SampleReader, id_lists: Sequence[np.ndarray]) -> None:
        self.reader, self.id_lists = reader, id_lists

    def __len__(self) -> int:
        return len(self.id_lists)

    def __getitem__(self, i: int) -> Batch:
        return self.reader.read(self.id_lists[i])


def _keep(batch: Batch) -> Batch:
    return batch


class MicroBatchLoader:
    """Iterates over one :class:`Batch` per id list, in order; workers > 0 prefetch via a DataLoader."""

    def __init__(
        self,
        reader: SampleReader,
        id_lists: Sequence[np.ndarray],
        num_workers: int = 0,
        *,
        pin_memory: bool = False,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.reader, self.id_lists = reader, list(id_lists)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.id_lists)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0 or not self.id_lists:
            return (self.reader.read(ids) for ids in self.id_lists)
        loader = DataLoader(
            _IdLists(self.reader, self.id_lists),
            batch_size=None,
            shuffle=False,
            num_workers=min(self.num_workers, len(self.id_lists)),
            collate_fn=_keep,
            pin_memory=self.pin_memory,
        )
        return iter(loader)


class _ReadIds(Dataset):
    """A map-style dataset whose index is the id array itself: a worker reads whatever list it is sent."""

    def __init__(self, reader: SampleReader) -> None:
        self.reader = reader

    def __getitem__(self, ids: np.ndarray) -> Batch:
        return self.reader.read(ids)

    def __len__(self) -> int:  # never used for sampling: the id lists come from `_StepIdLists`
        return len(self.reader)


class _StepIdLists:
    """The current step's micro-batch id lists, iterated (in the main process) by a persistent DataLoader."""

    def __init__(self) -> None:
        self.id_lists: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.id_lists)

    def __len__(self) -> int:
        return len(self.id_lists)


class StepLoader:
    """Micro-batches of one logical step after another, read by worker processes started once per run.

    `MicroBatchLoader` starts its workers for every id list it is given; a training run asks for a
    new step's micro-batches thousands of times, and at a few hundred samples a step the start-up
    dominates (benchmarks/data_index.py). Here the workers persist: each step only sends them its id
    lists, in order, and receives the batches in that order. `close()` stops them.
    """

    def __init__(self, reader: SampleReader, num_workers: int, *, pin_memory: bool = False) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"StepLoader needs num_workers >= 1, got {num_workers!r}")
        self.reader = reader
        self._lists = _StepIdLists()
        self.loader = DataLoader(
            _ReadIds(reader),
            batch_size=None,
            sampler=self._lists,
            num_workers=num_workers,
            collate_fn=_keep,
            pin_memory=pin_memory,
            persistent_workers=True,
        )

    def step(self, id_lists: Sequence[np.ndarray]) -> Iterator[Batch]:
        """The batches of `id_lists`, in order (an empty step reads nothing and wakes no worker)."""
        if self.loader is None:
            raise ConfigError("this StepLoader is closed")
        self._lists.id_lists = list(id_lists)
        if not self._lists.id_lists:
            return iter(())
        return iter(self.loader)

    def close(self) -> None:
        """Drop the loader: its iterator stops the worker processes when it is collected."""
        self.loader = None


# ---------------------------------------------------------------- sequential passes


def read_all(
    shard_dir: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int = 256
) -> tuple[torch.Tensor, list[dict]]:
    """All valid samples of a (small) shard folder: images (n, 3, H, W) and metadata dicts.

    Each metadata dict also carries the sample's ``"caption"`` (and, as always, its ``"id"``).
    """
    reader = SampleReader(shard_dir, transform)
    images, meta = [], []
    for batch in MicroBatchLoader(reader, split_micro_batches(np.arange(len(reader)), batch_size)):
        images.append(batch.images)
        meta += [dict(m, caption=c) for m, c in zip(batch.meta, batch.captions)]
    reader.close()
    return torch.cat(images) if images else reader.read([]).images, meta


class _StreamDecoder:
    """webdataset sample dict → (image tensor, tokens or caption, meta dict)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], tokenizer: Tokenizer | None) -> None:
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, Any, dict]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "txt" not in sample or "json" not in sample:
            raise _BadSample(f"incomplete sample {sample.get('__key__')!r} in {sample.get('__url__')}")
        try:
            caption, meta = decode_caption(sample["txt"]), decode_meta(sample["json"])
            image = self.transform(decode_image(sample[ext]))
        except _BadSample as bad:
            raise _BadSample(f"{bad.args[0]} in sample {sample['__key__']} of {sample.get('__url__')}") from None
        text = caption if self.tokenizer is None else torch.as_tensor(self.tokenizer([caption]))[0]
        return image, text, meta


def _skip_bad_sample(exn: Exception) -> bool:
    """webdataset handler: warn about and skip samples that fail to decode; re-raise anything else."""
    if isinstance(exn, _BadSample):
        warnings.warn(f"skipping sample: {exn.args[0]}", stacklevel=2)
        return True
    raise exn


def stream_dataset(
    shard_dir: str | os.PathLike,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Tokenizer | None = None,
) -> Any:
    """A webdataset pipeline over the shards in order, split by node and worker, for sequential passes.

    Yields ``(image tensor, tokens (L,) or caption str, meta dict)``; bad samples are skipped with a
    warning. Use it with ``DataLoader(dataset, batch_size=…, num_workers=…)``.
    """
    import webdataset as wds

    urls = [str(p) for p in ShardIndex(Path(shard_dir)).shard_paths]
    dataset = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        handler=wds.warn_and_continue,
        shardshuffle=False,
        empty_check=False,
    )
    return dataset.map(_StreamDecoder(transform, tokenizer), handler=_skip_bad_sample)
