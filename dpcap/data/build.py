"""Build validated tar shards, their member index and ``sizes.json`` from images and captions.

Sources
-------
* a folder of images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff``, searched recursively) with a
  same-stem ``.txt`` caption and an optional same-stem ``.json`` metadata object. Symbolic links are
  never followed out of the folder: a linked image, caption or ``.json`` whose target (fully resolved)
  lies outside the source folder makes its sample skipped as ``symlink_outside_source`` (the target is
  never read), and so does each linked subfolder that resolves outside (counted once, not descended
  into). A linked file whose target stays inside the folder is read through its resolved path; a
  linked subfolder that stays inside is not descended into either (its files are reached through their
  real folder, so following it would only duplicate them, or loop forever);
* a ``.jsonl`` or ``.csv`` manifest with an ``image`` field (a path relative to the manifest's folder, or
  absolute), a ``caption`` field and any other fields, which become the sample's metadata. Image paths
  are taken as the manifest names them, symlinks included: whoever writes the manifest chooses the files
  (absolute paths are legitimate), and a caption is always the manifest's own text, never a file's.

Every sample is validated before it is written: the image's header must declare at most
``max_image_pixels`` pixels (:data:`dpcap.data.layout.MAX_IMAGE_PIXELS` by default; checked before
anything is decoded, skipped as ``too_many_pixels``), the image must decode fully with PIL (``load()``,
then ``convert("RGB")``) and the caption must be valid UTF-8, non-empty after ``strip()`` and at most
``max_caption_chars`` characters. Bad samples are skipped and counted by reason (:data:`SKIP_REASONS`).
Samples are visited in a deterministic order: a folder depth-first, names sorted at each level (a
folder's own files, grouped by stem, before its subfolders); a manifest in row order. Both are
streamed: memory grows with the largest single folder, never with the data set.

``workers > 1`` decodes and validates in that many processes; the output is the same bytes as with
one. A killed build resumes: each finished shard is recorded in ``.build-state.json`` with the
number of source entries it consumed, and a new run with the same source and options continues
after the last recorded shard (``overwrite`` starts again from nothing).

Shard format
------------
A dataset folder holds::

    shard-000000.tar  shard-000000.idx
    shard-000001.tar  shard-000001.idx
    ...
    sizes.json        {"shard-000000.tar": n0, "shard-000001.tar": n1, ...}   (open_clip convention)

* ``shard-NNNNNN.tar`` is a plain USTAR tar readable by ``webdataset.WebDataset``. Sample ``i`` of the
  data set has the key ``f"{i:010d}"`` and three consecutive members, in this order:
  ``{key}.{png|jpg|webp}`` (the original encoded bytes when the source is PNG/JPEG/WebP, else a lossless
  PNG re-encoding; the extension follows the decoded format, not the source file name), ``{key}.txt``
  (the stripped caption, UTF-8) and ``{key}.json`` (a UTF-8 JSON object: the manifest's extra fields, or
  for a folder source the sidecar ``.json`` fields and ``"source"`` = the image's relative path, plus
  ``"id"`` = the global sample id; a source field called ``"id"`` is kept as ``"source_id"``). Every
  member has ``mtime = 0``, mode ``0o644`` and empty owner names, so builds are byte-for-byte
  reproducible and carry no PAX headers.
* ``shard-NNNNNN.idx`` is a headerless, memory-mappable array of little-endian ``uint64`` (numpy
  ``"<u8"``) of shape ``(n, 6)`` in row-major order -- exactly ``48 * n`` bytes. Row ``j`` describes the
  shard's ``j``-th sample: ``[image_offset, image_size, txt_offset, txt_size, json_offset, json_size]``,
  where an offset is the byte position of the member's *data* (after its 512-byte header) from the
  start of the ``.tar`` and a size is the member's data length in bytes.
* The global sample id is the position in the concatenation of the shards in sorted name order.

Every file is written under a temporary name and moved into place with ``os.replace``; ``sizes.json``
is written last, so a folder without it is an unfinished build.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpcap.data.layout import (
    INDEX_COLUMNS,
    INDEX_DTYPE,
    MAX_IMAGE_PIXELS,
    SHARD_PREFIX,
    SIZES_FILE,
    WDS_INDEX_FILE,
    index_path,
    shard_name,
)
from dpcap.errors import ConfigError, DataError

BUILD_STATE_FILE = ".build-state.json"
BUILD_STATE_FORMAT = 1
_CHUNK_PER_WORKER = 64  # candidates validated per worker per round: bounds memory, keeps workers busy
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "missing_caption",
    "empty_caption",
    "non_utf8_caption",
    "caption_too_long",
    "bad_metadata",
    "bad_manifest_row",
    "symlink_outside_source",
    "too_many_pixels",
)


@dataclass
class _Candidate:
    """One sample as found in the source, before validation."""

    image: Path | None
    caption: str | bytes | None
    meta: dict[str, Any] | None = field(default_factory=dict)  # None: unparseable row (never filtered out)
    error: str | None = None


class _Skip(Exception):
    """A sample fails validation; ``args[0]`` is the reason."""


def build_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    max_caption_chars: int = 1000,
    where: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Validate every sample of ``src`` and write the valid ones as shards into ``out_dir``.

    ``where`` keeps only samples whose metadata field equals the given value (compared as given, or
    as strings); filtered-out samples are neither written nor counted as skipped (rows too broken to
    filter are counted as ``bad_manifest_row``). An unfinished build of the same source and options
    in ``out_dir`` is resumed after its last whole shard. Images whose header declares more than
    ``max_image_pixels`` pixels are skipped undecoded (``too_many_pixels``); Pillow's own limit (it
    refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS``) still applies above that.
    Returns ``{"written", "skipped": {reason: count}, "shards", "out", "resumed_shards"}``.
    """
    _check_positive("samples_per_shard", samples_per_shard)
    _check_positive("max_caption_chars", max_caption_chars)
    _check_positive("workers", workers)
    _check_positive("max_image_pixels", max_image_pixels)
    src, out = Path(src), Path(out_dir)
    candidates = _source_candidates(src)
    identity = _build_identity(src, samples_per_shard, max_caption_chars, where, max_image_pixels)
    state = _prepare_out(out, overwrite, identity)
    skipped: Counter[str] = Counter(state["skipped"])
    consumed = state["consumed"]
    with _ShardWriter(out, samples_per_shard, state["sizes"]) as writer, _progress_bar(progress, consumed) as bar:
        kept = _kept(candidates, consumed, where, bar)
        for position, result in _validated(kept, _ValidateOrReason(max_caption_chars, max_image_pixels), workers):
            bar.update(1)
            if isinstance(result, str):
                skipped[result] += 1
            elif writer.add(*result):
                _write_state(out, identity, position, writer.sizes, skipped)
        sizes = writer.finish()
        bar.set_postfix(written=writer.next_id, skipped=sum(skipped.values()))
    if not sizes:
        raise DataError(f"no valid samples in {src} (skipped: {dict(sorted(skipped.items()))})")
    _atomic_write_bytes(out / SIZES_FILE, json.dumps(sizes, indent=1).encode("utf-8"))
    (out / BUILD_STATE_FILE).unlink(missing_ok=True)
    return {
        "written": sum(sizes.values()),
        "skipped": dict(sorted(skipped.items())),
        "shards": len(sizes),
        "out": str(out),
        "resumed_shards": len(state["sizes"]),
    }


def _kept(candidates: Iterator[_Candidate], start: int, where: Any, bar: Any) -> Iterator[tuple[int, _Candidate]]:
    """``(position, candidate)`` after the first ``start`` entries (position counts every source entry,
    filtered or not, from 1), without those ``where`` filters out."""
    for position, cand in enumerate(itertools.islice(candidates, start, None), start=start + 1):
        if cand.meta is not None and not _matches(cand.meta, where):
            bar.update(1)
            continue
        yield position, cand


def _progress_bar(enabled: bool, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc="building shards", unit=" samples", initial=initial, disable=not enabled)


def _validated(
    candidates: Iterator[tuple[int, _Candidate]], check: _ValidateOrReason, workers: int
) -> Iterator[tuple[int, tuple[str, bytes, bytes, dict[str, Any]] | str]]:
    """``(position, validated sample or skip reason)`` in source order, decoded by ``workers`` processes.

    Candidates go to the pool one bounded chunk at a time (``Executor.map`` would submit the whole
    source at once, which for a LAION-sized manifest does not fit in memory).
    """
    if workers == 1:
        yield from ((i, check(c)) for i, c in candidates)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while chunk := list(itertools.islice(candidates, workers * _CHUNK_PER_WORKER)):
            positions, cands = zip(*chunk, strict=True)
            yield from zip(positions, pool.map(check, cands, chunksize=_CHUNK_PER_WORKER // 4), strict=True)


@dataclass(frozen=True)
class _ValidateOrReason:
    """`_validate` as a picklable callable that returns the skip reason instead of raising it."""

    max_caption_chars: int
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __call__(self, cand: _Candidate) -> tuple[str, bytes, bytes, dict[str, Any]] | str:
        try:
            return _validate(cand, self.max_caption_chars, self.max_image_pixels)
        except _Skip as skip:
            return skip.args[0]


def _build_identity(
    src: Path, samples_per_shard: int, max_caption_chars: int, where: Any, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    """What a resumed build must share with the one it continues (a changed manifest is a new build).

    The pixel cap is part of it only when it is not the default, so that a build left unfinished
    before the cap existed still resumes.
    """
    identity: dict[str, Any] = {
        "format": BUILD_STATE_FORMAT,
        "source": str(src.resolve()),
        "samples_per_shard": samples_per_shard,
        "max_caption_chars": max_caption_chars,
        "where": sorted([str(k), str(v)] for k, v in (where or {}).items()),
    }
    if max_image_pixels != MAX_IMAGE_PIXELS:
        identity["max_image_pixels"] = max_image_pixels
    if src.is_file():
        stat = src.stat()
        identity["source_bytes"], identity["source_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return identity


def _write_state(out: Path, identity: dict[str, Any], consumed: int, sizes: dict[str, int], skipped: Counter) -> None:
    """Record the shards written so far and how many source entries they consumed (after each shard)."""
    state = {"identity": identity, "consumed": consumed, "sizes": sizes, "skipped": dict(skipped)}
    _atomic_write_bytes(out / BUILD_STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))


def dataset_stats(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Size summary of a shard folder: samples, shards, bytes on disk and per-member byte totals."""
    from dpcap.data.index import ShardIndex

    index = ShardIndex(shard_dir)
    tar_bytes = sum(p.stat().st_size for p in index.shard_paths)
    idx_bytes = sum(p.stat().st_size for p in index.index_paths)
    totals = np.zeros(len(INDEX_COLUMNS), dtype=np.int64)
    for i in range(index.num_shards):
        totals += index.rows(i).sum(axis=0, dtype=np.int64) if index.counts[i] else 0
    n = len(index)
    return {
        "samples": n,
        "shards": index.num_shards,
        "bytes": tar_bytes,
        "index_bytes": idx_bytes,
        "image_bytes": int(totals[1]),
        "caption_bytes": int(totals[3]),
        "bytes_per_sample": tar_bytes / n if n else 0.0,
        "dir": str(index.dir),
        **_index_report(index.dir),
    }


def _index_report(folder: Path) -> dict[str, Any]:
    """What `dpcap data index` left out (per reason) and which tars were truncated; {} for built folders."""

    path = Path(folder) / WDS_INDEX_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_bytes())
    return {
        "skipped": data.get("skipped", {}),
        "truncated": data.get("truncated", []),
        "caption_key": data["caption_key"],
    }


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _matches(meta: Mapping[str, Any], where: Mapping[str, Any] | None) -> bool:
    if not where:
        return True
    return all(k in meta and (meta[k] == v or str(meta[k]) == str(v)) for k, v in where.items())


# ---------------------------------------------------------------- sources


def _source_candidates(src: Path) -> Iterator[_Candidate]:
    if src.is_dir():
        return _folder_candidates(src)
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_candidates(src)
    if suffix == ".csv":
        return _csv_candidates(src)
    raise DataError(f"source {src} is neither a folder nor a .jsonl/.csv manifest")


def _folder_candidates(src: Path) -> Iterator[_Candidate]:
    """Each image is one sample (a caption without an image: a missing one), walked folder by folder."""
    walk = _folder_iter(src)
    first = next(walk, None)
    if first is None:
        raise DataError(f"source folder {src} holds no images or captions")
    return itertools.chain([first], walk)


_OUTSIDE = "symlink_outside_source"


def _folder_iter(src: Path) -> Iterator[_Candidate]:
    """Depth-first, names sorted; only one folder's listing is held at a time (plus the folders to visit).

    Symbolic links: see the module docstring (never followed out of ``src``; linked folders never walked).
    """
    root = Path(os.path.realpath(src))
    pending = [src]
    while pending:
        folder = pending.pop()
        groups: dict[str, dict[str, list[tuple[Path, Path | None]]]] = {}
        subfolders, linked_out = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_dir():
                    if not entry.is_symlink():
                        subfolders.append(path)
                    elif not _inside(path, root):
                        linked_out.append(path.name)
                    continue
                suffix = path.suffix.lower()
                kind = "image" if suffix in IMAGE_SUFFIXES else suffix.lstrip(".")
                if kind in ("image", "txt", "json") and entry.is_file():
                    groups.setdefault(path.stem, {}).setdefault(kind, []).append((path, _readable(entry, root)))
        for stem in sorted(groups):
            yield from _group_candidates(src, groups[stem])
        for _ in linked_out:  # one skipped entry per linked folder outside the source (never descended into)
            yield _Candidate(None, None, None, _OUTSIDE)
        pending.extend(sorted(subfolders, reverse=True))  # popped in sorted order


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies in the (resolved) folder ``root``."""
    return Path(os.path.realpath(path)).is_relative_to(root)


def _readable(entry: os.DirEntry, root: Path) -> Path | None:
    """The path to read a found file through: itself, its resolved target when a link into ``root``, or
    None when it is a link whose target lies outside ``root`` (never read)."""
    path = Path(entry.path)
    if not entry.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    return target if target.is_relative_to(root) else None


def _group_candidates(src: Path, files: dict[str, list[tuple[Path, Path | None]]]) -> Iterator[_Candidate]:
    """The samples of one stem: every image with the stem's caption and sidecar metadata.

    ``files`` maps a kind to ``(found path, path to read or None for a link out of the source)``; a
    caption or sidecar linked out of the source skips every image of the stem, unread.
    """
    txt, side = files.get("txt", [None])[0], files.get("json", [None])[0]
    if (txt is not None and txt[1] is None) or (side is not None and side[1] is None):
        caption, meta, error = None, None, _OUTSIDE
    else:
        caption = txt[1].read_bytes() if txt is not None else None
        meta = _sidecar_meta(side[1]) if side is not None else {}
        error = "bad_metadata" if meta is None else None
    for image, readable in sorted(files.get("image", []), key=lambda pair: pair[0]):
        if readable is None or meta is None:  # unfiltered by `where` (like an unparseable row): counted
            yield _Candidate(readable, caption, None, _OUTSIDE if readable is None else error)
            continue
        yield _Candidate(readable, caption, {"source": image.relative_to(src).as_posix(), **meta}, error)
    if "image" not in files and txt is not None:
        yield _Candidate(None, caption, meta, error)


def _sidecar_meta(path: Path) -> dict[str, Any] | None:
    """The sidecar JSON object, or None when it is not a UTF-8 JSON object."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _row_candidate(row: Any, base: Path) -> _Candidate:
    """A manifest row → candidate; ``image``/``caption`` are taken out, other fields are metadata."""
    if not isinstance(row, dict):
        return _Candidate(None, None, None, "bad_manifest_row")
    meta = {k: v for k, v in row.items() if k not in ("image", "caption")}
    image, caption = row.get("image"), row.get("caption")
    if caption is not None and not isinstance(caption, str):
        return _Candidate(None, None, meta, "bad_manifest_row")
    if not isinstance(image, str) or not image:
        return _Candidate(None, caption, meta, "missing_image")
    path = Path(image) if Path(image).is_absolute() else base / image
    return _Candidate(path, caption, meta)


def _jsonl_candidates(src: Path) -> Iterator[_Candidate]:
    base = src.parent
    with open(src, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                yield _Candidate(None, None, None, "bad_manifest_row")
                continue
            yield _row_candidate(row, base)


def _csv_candidates(src: Path) -> Iterator[_Candidate]:
    with open(src, encoding="utf-8", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), None)
    if header is None or "image" not in header or "caption" not in header:
        raise DataError(f"manifest {src} needs the columns 'image' and 'caption', found {header}")
    return _csv_iter(src)


def _csv_iter(src: Path) -> Iterator[_Candidate]:
    with open(src, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for row in csv.DictReader(f):
            if None in row:  # more fields than the header
                yield _Candidate(None, None, None, "bad_manifest_row")
                continue
            yield _row_candidate(row, src.parent)


# ---------------------------------------------------------------- validation


def _validate(
    cand: _Candidate, max_caption_chars: int, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[str, bytes, bytes, dict[str, Any]]:
    """Return ``(image_ext, image_bytes, caption_utf8, meta)`` or raise :class:`_Skip` with the reason."""
    if cand.error is not None:
        raise _Skip(cand.error)
    caption = _validate_caption(cand.caption, max_caption_chars)
    ext, data = _validate_image(cand.image, max_image_pixels)
    meta = dict(cand.meta)
    if "id" in meta:
        meta["source_id"] = meta.pop("id")
    return ext, data, caption, meta


def _validate_caption(caption: str | bytes | None, max_chars: int) -> bytes:
    if caption is None:
        raise _Skip("missing_caption")
    try:
        text = caption.decode("utf-8") if isinstance(caption, bytes) else caption
        text.encode("utf-8")
    except UnicodeError:
        raise _Skip("non_utf8_caption") from None
    text = text.strip()
    if not text:
        raise _Skip("empty_caption")
    if len(text) > max_chars:
        raise _Skip("caption_too_long")
    return text.encode("utf-8")


def _validate_image(path: Path | None, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, bytes]:
    """Check the header's size, then decode fully; keep PNG/JPEG/WebP bytes as they are, re-encode others as PNG.

    ``Image.open`` reads only the header, so an image above ``max_pixels`` is refused before any pixel is
    decoded. Pillow's DecompressionBombWarning is silenced (the cap here is the policy; Pillow's
    DecompressionBombError, above twice its own limit, is counted as ``too_many_pixels`` too).
    """
    from PIL import Image

    try:
        data = path.read_bytes() if path is not None else None
    except OSError:
        data = None
    if data is None:
        raise _Skip("missing_image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise _Skip("too_many_pixels") from None
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            raise _Skip("corrupt_image") from None
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise _Skip("too_many_pixels")
            try:
                im.load()
                fmt = im.format
                im.convert("RGB")
                if fmt in KEPT_FORMATS:
                    return KEPT_FORMATS[fmt], data
                return "png", _png_bytes(im)
            except Image.DecompressionBombError:
                raise _Skip("too_many_pixels") from None
            except Exception:
                raise _Skip("corrupt_image") from None


def _png_bytes(im: Any) -> bytes:
    keep = "RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB"
    buf = io.BytesIO()
    im.convert(keep).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- output


def _prepare_out(out: Path, overwrite: bool, identity: dict[str, Any]) -> dict[str, Any]:
    """Make ``out`` ready; return the state to start from (empty, or the unfinished build to resume).

    A finished build (``sizes.json``) is replaced only with ``overwrite``; an unfinished one is resumed
    when its ``.build-state.json`` has the same identity, and refused otherwise.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fresh = {"consumed": 0, "sizes": {}, "skipped": {}}
    old = sorted(p for p in out.iterdir() if p.name == SIZES_FILE or p.name.startswith(SHARD_PREFIX))
    state = None if overwrite else _read_state(out)
    if state is not None and state["identity"] != identity:
        raise DataError(
            f"output folder {out} holds an unfinished build of another source or with other options "
            f"({state['identity']['source']}); pass --overwrite to replace it"
        )
    if old and state is None and not overwrite:
        raise DataError(
            f"output folder {out} already holds shards (e.g. {old[0].name}); pass --overwrite to replace them"
        )
    kept = set() if state is None else {n for s in state["sizes"] for n in (s, index_path(Path(s)).name)}
    leftovers = [p for p in out.iterdir() if p.name.startswith(f".{SHARD_PREFIX}") and p.name.endswith(".tmp")]
    stale = [p for p in old if p.name not in kept]  # with a state: shards written after its last record
    for p in sorted(stale, key=lambda p: p.name != SIZES_FILE) + leftovers:  # sizes.json first: no stale set
        p.unlink()
    if state is None:
        (out / BUILD_STATE_FILE).unlink(missing_ok=True)
        return fresh
    missing = [n for n in sorted(kept) if not (out / n).is_file()]
    if missing:
        raise DataError(f"cannot resume the build in {out}: {missing[0]} is gone; pass --overwrite to start again")
    return state


def _read_state(out: Path) -> dict[str, Any] | None:
    path = out / BUILD_STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
        if not isinstance(state, dict) or not {"identity", "consumed", "sizes", "skipped"} <= state.keys():
            raise ValueError("missing keys")
    except ValueError as exc:
        raise DataError(f"{path} is unreadable ({exc}); pass --overwrite to start the build again") from None
    return state


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Streams samples into ``shard-NNNNNN.tar`` + ``.idx`` pairs, each moved into place when full."""

    def __init__(self, out: Path, samples_per_shard: int, sizes: Mapping[str, int] | None = None) -> None:
        self.out, self.per_shard = out, samples_per_shard
        self.sizes: dict[str, int] = dict(sizes or {})  # the shards already in place (a resumed build)
        self.next_id = sum(self.sizes.values())
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._rows: list[list[int]] = []

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self._abort()

    def add(self, ext: str, image: bytes, caption: bytes, meta: dict[str, Any]) -> bool:
        """Append one sample; True when it completed a shard (now in place)."""
        if self._tar is None:
            self._open()
        key = f"{self.next_id:010d}"
        meta_bytes = _meta_bytes(dict(meta, id=self.next_id))
        row: list[int] = []
        for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.json", meta_bytes)):
            row += [self._add_member(name, data), len(data)]
        self._rows.append(row)
        self.next_id += 1
        if len(self._rows) == self.per_shard:
            self._close_shard()
            return True
        return False

    def finish(self) -> dict[str, int]:
        if self._tar is not None:
            self._close_shard()
        return self.sizes

    def _tmp(self, suffix: str) -> Path:
        return self.out / f".{shard_name(len(self.sizes))}{suffix}.tmp"

    def _open(self) -> None:
        self._file = open(self._tmp(""), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _add_member(self, name: str, data: bytes) -> int:
        """Append one member; return the offset of its data (just after its 512-byte header)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        start = self._file.tell()
        self._tar.addfile(info, io.BytesIO(data))
        return start + tarfile.BLOCKSIZE

    def _close_shard(self) -> None:
        name = shard_name(len(self.sizes))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        rows = np.asarray(self._rows, dtype=INDEX_DTYPE).reshape(-1, len(INDEX_COLUMNS))
        _atomic_write_bytes(index_path(self.out / name), rows.tobytes())
        os.replace(self._tmp(""), self.out / name)
        self.sizes[name] = len(self._rows)
        self._tar, self._file, self._rows = None, None, []

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp("").unlink(missing_ok=True)


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    try:
        return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError, UnicodeError):
        raise _Skip("bad_metadata") from None
