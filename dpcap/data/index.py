"""Global sample id → (shard, member offsets), from ``sizes.json`` and the per-shard ``.idx`` files.

The layout is documented in :mod:`dpcap.data.build`. Global id ``g`` lives in shard ``s`` with
``starts[s] <= g < starts[s + 1]``, where ``starts`` is the running sum of the shard sizes taken in
sorted shard-name order, at row ``g - starts[s]`` of that shard's index. Index files are memory-mapped
on first use and kept in a small per-instance LRU cache (a data set of 10^5 shards would otherwise
exceed the process's limit on memory maps); pickling drops the maps, so a copy sent to a DataLoader
worker maps its own.

A shard's rows are checked against its tar when they are first mapped, before anything is read
through them (opening an index of many shards stays one ``stat`` per shard): every member present
must start at or after byte 512 (after its header) and end within the tar file. A row that does not
raises :class:`DataError` naming the shard, the row and the numbers. The one exception is a tar cut
short after it was indexed (it lacks the two zero blocks that end every complete tar, e.g. a partial
copy): its rows past the cut are kept, with a warning, and the reader skips those samples (its reads
stop at the end of the file).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dpcap.data.layout import (
    INDEX_COLUMNS,
    INDEX_DTYPE,
    ROW_BYTES,
    SIZES_FILE,
    TAR_BLOCK,
    WDS_INDEX_FILE,
    WDS_ROW_DTYPE,
    index_path,
)
from dpcap.errors import DataError

ACCEPTED = (
    f"a folder written by `dpcap data build` ({SIZES_FILE} + its .tar shards and .idx files), or an index "
    "folder written by `dpcap data index SRC… --out DIR` for existing WebDataset shards"
)

# Sources WebDataset would take but a ShardIndex cannot (it needs sizes.json and the .idx offsets of
# local files): named precisely, so the user learns what to give instead of "sizes.json not found".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BRACE = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def absolute_rows(raw: np.ndarray) -> np.ndarray:
    """``(k, 6)`` uint64 rows of :data:`dpcap.data.layout.INDEX_COLUMNS` from compact `WDS_ROW_DTYPE` rows."""
    image = raw["image_offset"].astype(np.int64)
    columns = (
        image,
        raw["image_size"],
        np.where(raw["txt_size"] > 0, image + raw["txt_delta"], 0),
        raw["txt_size"],
        np.where(raw["json_size"] > 0, image + raw["json_delta"], 0),
        raw["json_size"],
    )
    return np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=-1).astype(INDEX_DTYPE)


class ShardGroup(NamedTuple):
    """The requested ids that live in one shard, sorted, with their index rows ``(k, 6)``.

    `labels` holds the `.cls` label of each (-1 where none) for an in-place index, else None.
    """

    shard: int
    path: Path
    ids: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None = None


class ShardIndex:
    """Read-only view of a shard folder's ``sizes.json`` and member offsets.

    ``len(index)`` is the number of samples N; ``locate(g)`` gives ``(shard_path, row)`` with ``row`` the
    six ``uint64`` of :data:`dpcap.data.layout.INDEX_COLUMNS`.
    """

    def __init__(self, shard_dir: str | os.PathLike, *, max_open: int = 1024) -> None:
        _check_source(os.fspath(shard_dir))
        self.dir = Path(shard_dir)
        # A caption stored only in the JSON member (txt size 0) is read from this field (in-place indexes).
        self.caption_key: str | None = None
        self.in_place = (self.dir / WDS_INDEX_FILE).is_file()  # rows are WDS_ROW_DTYPE, shards live elsewhere
        if self.in_place:
            self._load_wds_index(self.dir / WDS_INDEX_FILE)
        else:
            sizes = _read_sizes(self.dir / SIZES_FILE)
            self.names = sorted(sizes)
            self.counts = np.array([sizes[n] for n in self.names], dtype=np.int64)
            self.shard_paths = [self.dir / n for n in self.names]
            self.index_paths = [index_path(p) for p in self.shard_paths]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.max_open = max_open
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._checked: set[int] = set()  # shards whose rows were checked against their tar (kept when pickled)
        row_bytes = WDS_ROW_DTYPE.itemsize if self.in_place else ROW_BYTES
        for path, idx, count in zip(self.shard_paths, self.index_paths, self.counts):
            _check_shard(path, idx, int(count), row_bytes)

    def _load_wds_index(self, path: Path) -> None:
        """Shards, counts and index files of an in-place index of existing tars (`dpcap data index`)."""
        try:
            data = json.loads(path.read_bytes())
            shards = data["shards"]
            self.shard_paths = [Path(s["path"]) for s in shards]
            self.index_paths = [self.dir / s["index"] for s in shards]
            self.counts = np.array([int(s["samples"]) for s in shards], dtype=np.int64)
            self.caption_key = data.get("caption_key")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not an index written by `dpcap data index`: {exc!r}") from None
        if not shards:
            raise DataError(f"{path} lists no shards")
        self.names = [p.name for p in self.shard_paths]

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}

    def raw_rows(self, shard: int) -> np.ndarray:
        """One shard's index as stored, memory-mapped (read-only): ``(n, 6)`` uint64, or ``(n,)`` `WDS_ROW_DTYPE`."""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        n, path = int(self.counts[shard]), self.index_paths[shard]
        dtype, shape = (WDS_ROW_DTYPE, (n,)) if self.in_place else (INDEX_DTYPE, (n, len(INDEX_COLUMNS)))
        rows = np.memmap(path, dtype=dtype, mode="r", shape=shape) if n else np.empty(shape, dtype=dtype)
        if shard not in self._checked:
            self._check_rows(shard, absolute_rows(rows) if self.in_place else rows)
            self._checked.add(shard)
        self._maps[shard] = rows
        if len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return rows

    def _check_rows(self, shard: int, rows: np.ndarray) -> None:
        """DataError unless every present member of ``rows`` ``(n, 6)`` lies in the shard's tar (see module doc)."""
        path = self.shard_paths[shard]
        try:
            file_size = os.stat(path).st_size
        except FileNotFoundError:
            raise DataError(f"shard {path} has disappeared (listed in {self.dir})") from None
        if not len(rows):
            return
        offsets, sizes = rows[:, 0::2], rows[:, 1::2]  # (n, 3) uint64: image, txt, json
        present = sizes > 0
        before = present & (offsets < TAR_BLOCK)
        limit = np.uint64(file_size + 1)  # clipped: the sum cannot overflow, and stays > file_size when either is
        past = present & (np.minimum(offsets, limit) + np.minimum(sizes, limit) > np.uint64(file_size))
        if before.any():
            self._raise_bad_row(shard, rows, before, file_size)
        if not past.any():
            return
        if _tar_is_complete(path, file_size):
            self._raise_bad_row(shard, rows, past, file_size)
        cut = int(past.any(axis=1).sum())
        warnings.warn(
            f"shard {path} is cut short at {file_size} bytes (no end-of-archive blocks: a partial copy?): "
            f"{cut} of its {len(rows)} samples lie past the cut and will be skipped",
            stacklevel=3,
        )

    def _raise_bad_row(self, shard: int, rows: np.ndarray, bad: np.ndarray, file_size: int) -> None:
        """DataError naming the first bad member of ``rows`` (``bad``: (n, 3) mask) and how many rows are bad."""
        row, column = (int(i) for i in np.argwhere(bad)[0])
        member = INDEX_COLUMNS[2 * column].removesuffix("_offset")
        offset, size = int(rows[row, 2 * column]), int(rows[row, 2 * column + 1])
        if offset < TAR_BLOCK:
            what = f"which starts inside the tar's first header (data starts at byte {TAR_BLOCK} or later)"
        else:
            what = f"which ends at byte {offset + size}, past the end of the {file_size}-byte tar"
        others = int(bad.any(axis=1).sum()) - 1
        raise DataError(
            f"index {self.index_paths[shard]} of shard {self.shard_paths[shard]} is corrupt: sample row {row} "
            f"(global id {int(self.starts[shard]) + row}) puts its {member} member at offset {offset} with "
            f"{size} bytes, {what}" + (f"; {others} more rows are bad" if others else "") + "; rebuild the "
            "shards (`dpcap data build`) or re-index them (`dpcap data index`)"
        )

    def rows(self, shard: int) -> np.ndarray:
        """The ``(n, 6)`` uint64 rows (:data:`dpcap.data.layout.INDEX_COLUMNS`) of one shard."""
        raw = self.raw_rows(shard)
        return absolute_rows(raw) if self.in_place else raw

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """Shard number of each global id (ids must be in range)."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def locate(self, global_id: int) -> tuple[Path, np.ndarray]:
        """``(shard_path, row)`` of one global id; ``IndexError`` when out of range."""
        group = self.locate_many([global_id])[0]
        return group.path, np.array(group.rows[0])

    def locate_many(self, ids: np.ndarray | list[int]) -> list[ShardGroup]:
        """Group ids by shard (shard order), each group sorted by id, which is also offset order."""
        ids = np.sort(self._check_ids(np.asarray(ids)))
        shards = self.shard_of(ids)
        cuts = np.flatnonzero(np.diff(shards)) + 1
        groups = []
        for part in np.split(np.arange(len(ids)), cuts) if len(ids) else []:
            s = int(shards[part[0]])
            raw = np.asarray(self.raw_rows(s)[ids[part] - self.starts[s]])
            if self.in_place:  # convert only the rows asked for
                groups.append(ShardGroup(s, self.shard_paths[s], ids[part], absolute_rows(raw), raw["cls"]))
            else:
                groups.append(ShardGroup(s, self.shard_paths[s], ids[part], raw))
        return groups

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"sample ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= len(self))]
        if bad.size:
            raise IndexError(f"sample id {int(bad[0])} out of range for {len(self)} samples in {self.dir}")
        return ids


def _check_source(source: str) -> None:
    """DataError for a URL, a brace pattern or a tar file given where a shard folder belongs."""
    if _URL.match(source):
        form = "a URL"
    elif source.startswith("pipe:"):
        form = "a pipe: command"
    elif _BRACE.search(source):
        form = "a brace pattern"
    elif source.lower().endswith(_TAR_SUFFIXES):
        form = "a tar file"
    else:
        return
    if (Path(source) / SIZES_FILE).is_file():  # a shard folder after all, whatever its name looks like
        return
    raise DataError(f"{source} is {form}, which dpcap cannot read as shards: give {ACCEPTED}")


def _read_sizes(path: Path) -> dict[str, int]:
    try:
        sizes = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: not a shard folder (build one with `dpcap data build`, or index existing "
            "WebDataset shards with `dpcap data index SRC… --out DIR`)"
        ) from None
    except NotADirectoryError:
        raise DataError(f"{path.parent} is a file, not a shard folder: give {ACCEPTED}") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(sizes, dict) or not sizes:
        raise DataError(f"{path} must be a non-empty JSON object {{shard name: sample count}}")
    for name, n in sizes.items():
        if not name.endswith(".tar") or "/" in name or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{path}: bad entry {name!r}: {n!r} (want 'NAME.tar': count >= 0)")
    return sizes


def _tar_is_complete(path: Path, file_size: int) -> bool:
    """Whether the tar ends like every complete tar does: a whole number of blocks, the last two all zero."""
    if file_size < 2 * TAR_BLOCK or file_size % TAR_BLOCK:
        return False
    with open(path, "rb") as handle:
        handle.seek(file_size - 2 * TAR_BLOCK)
        return not any(handle.read(2 * TAR_BLOCK))


def _check_shard(path: Path, idx: Path, count: int, row_bytes: int) -> None:
    if not path.is_file():
        raise DataError(f"shard {path} listed in {idx.parent} is missing")
    try:
        size = idx.stat().st_size
    except FileNotFoundError:
        raise DataError(f"index file {idx} for shard {path.name} is missing") from None
    if size != count * row_bytes:
        raise DataError(f"index file {idx} holds {size} bytes, expected {count * row_bytes} for {count} samples")
