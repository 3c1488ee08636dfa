"""On-disk names and row formats of shard folders and in-place indexes, shared by their writers and readers.

``dpcap.data.build`` writes shard folders, ``dpcap.data.wds_index`` writes in-place indexes of
existing WebDataset tars, ``dpcap.data.index`` reads both: they all import from here (and never
each other) so that the format has one definition.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SIZES_FILE = "sizes.json"  # a shard folder (`dpcap data build`): {shard name: sample count}, written last
WDS_INDEX_FILE = "shards.json"  # an in-place index of existing tars (`dpcap data index`), written last
SHARD_PREFIX = "shard-"
TAR_BLOCK = 512  # a tar member's data starts after its 512-byte header: no offset in an index is smaller

# Images with more pixels than this are skipped, by `dpcap data build` and by the reader, from the size in
# their header, before anything is decoded. The value is Pillow's own `Image.MAX_IMAGE_PIXELS` default
# (Pillow only warns above it, and refuses only above twice that).
MAX_IMAGE_PIXELS = 89_478_485

# A built shard's ``.idx``: ``(n, 6)`` little-endian uint64 rows, one per sample.
INDEX_DTYPE = np.dtype("<u8")
INDEX_COLUMNS = ("image_offset", "image_size", "txt_offset", "txt_size", "json_offset", "json_size")
ROW_BYTES = INDEX_DTYPE.itemsize * len(INDEX_COLUMNS)

# The in-place index's row (`dpcap data index`): 32 bytes per sample. Text and JSON members are
# located relative to the image (deltas fit: members of one sample lie within 2 GiB of each other in
# any real shard), a size of 0 means "absent", and a `.cls` label is stored as its value (-1: none).
WDS_ROW_DTYPE = np.dtype(
    [
        ("image_offset", "<u8"),
        ("image_size", "<u4"),
        ("txt_delta", "<i4"),
        ("txt_size", "<u4"),
        ("json_delta", "<i4"),
        ("json_size", "<u4"),
        ("cls", "<i4"),
    ]
)


def shard_name(i: int) -> str:
    """The file name of shard ``i`` (``shard-000000.tar``)."""
    return f"{SHARD_PREFIX}{i:06d}.tar"


def index_path(shard_path: Path) -> Path:
    """The index file that belongs to a shard (``shard-000000.tar`` → ``shard-000000.idx``)."""
    return shard_path.with_suffix(".idx")


def is_shard_folder(path: str | os.PathLike) -> bool:
    """A finished shard folder or in-place index (what ``data.shards`` and the probes read)."""
    return (Path(path) / SIZES_FILE).is_file() or (Path(path) / WDS_INDEX_FILE).is_file()
