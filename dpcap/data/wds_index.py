"""Index existing WebDataset shards (e.g. img2dataset's) in place: tar headers only, nothing copied.

``dpcap data index SRC… --out INDEX_DIR`` writes, into INDEX_DIR only (sources may be read-only)::

    000000.idx  000000.json     per shard: n rows of dpcap.data.layout.WDS_ROW_DTYPE (32 bytes a sample:
    000001.idx  000001.json     member offsets and sizes, the .cls label) and a record of what was
                                indexed (path, size, mtime, counts)
    shards.json                 {"format", "caption_key", "label_key", "shards": [{"path", "index",
                                 "samples"}], "skipped": {reason: count}, "truncated": [paths]}

``shards.json`` is written last, so a folder without it is an unfinished index; a re-run reuses every
shard whose record still matches the tar's size and mtime, so a killed run resumes where it stopped.

A sample is the members sharing a key (the path up to the first dot of the base name, as
webdataset groups them), in any order. Image: the first present of jpg, jpeg, png, webp. Caption:
``.txt``, else the JSON member's `caption_key` field (then the row's txt size is 0 and the reader
takes the caption from the JSON). A sample without an image or a caption is counted by reason and
never enters N. A truncated tar (a partial download) is indexed up to the sample the cut goes
through, which is counted as ``truncated`` (when the cut falls inside a header, that is the last
sample seen, whose remaining members cannot be known). Decoding problems are found, skipped and counted at
read time, as for built shards.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dpcap.data.layout import WDS_INDEX_FILE, WDS_ROW_DTYPE
from dpcap.errors import ConfigError, DataError

WDS_INDEX_FORMAT = "dpcap-wds-index-1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_I32_MIN, _I32_MAX, _U32_MAX = -(2**31), 2**31 - 1, 2**32 - 1
_BRACE_CHARS = ("{", "}")


def expand_sources(sources: Iterable[str]) -> list[Path]:
    """Tar paths of each source: a folder (its ``*.tar``), a brace pattern, a tar, or a text file listing tars."""
    from braceexpand import braceexpand

    paths: list[Path] = []
    for source in sources:
        if any(c in source for c in _BRACE_CHARS):
            paths += [Path(p) for p in braceexpand(source)]
        elif Path(source).is_dir():
            found = sorted(Path(source).glob("*.tar"))
            if not found:
                raise DataError(f"{source} holds no .tar shards")
            paths += found
        elif source.endswith(".tar"):
            paths.append(Path(source))
        elif Path(source).is_file():
            lines = Path(source).read_text(encoding="utf-8").splitlines()
            paths += [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            raise DataError(f"{source}: not a folder of .tar shards, a brace pattern, a .tar or a file listing tars")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of {len(paths)} listed shards missing)")
    if not paths:
        raise DataError("no shards to index")
    return [p.resolve() for p in paths]


def index_tar(path: Path, caption_key: str) -> dict[str, Any]:
    """Rows (n, 6) of one tar's samples in first-seen key order, and what was left out, from headers only."""
    size = path.stat().st_size
    members: dict[str, dict[str, tuple[int, int]]] = {}
    truncated, cut_key = False, None  # cut_key: the sample whose member the end of a truncated file cuts
    with open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, base = os.path.split(info.name)
                    stem, _, ext = base.partition(".")
                    key = f"{folder}/{stem}"
                    if info.offset_data + info.size > size:
                        truncated, cut_key = True, key
                        break
                    members.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
        except tarfile.ReadError:  # a partial download that ends inside a header: the last sample seen
            truncated, cut_key = True, next(reversed(members), None)
        rows, skipped = [], Counter()
        if cut_key is not None and cut_key not in members:
            skipped["truncated"] += 1
        for key, parts in members.items():
            image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
            txt, meta = parts.get("txt"), parts.get("json")
            has_caption = txt is not None and txt[1] > 0 or _json_has(handle, meta, caption_key)
            if key == cut_key:  # part of it may be lost: never index half a sample
                skipped["truncated"] += 1
                continue
            if image is None or not has_caption:
                skipped["missing_image" if image is None else "missing_caption"] += 1
                continue
            row = _compact_row(image, txt if txt is not None and txt[1] > 0 else None, meta, _cls(handle, parts))
            if row is None:
                skipped["members_too_far"] += 1
                continue
            rows.append(row)
    return {"rows": np.array(rows, dtype=WDS_ROW_DTYPE), "skipped": dict(skipped), "truncated": truncated}


def _compact_row(image: tuple[int, int], txt: tuple[int, int] | None, meta: tuple[int, int] | None, cls: int):
    """One `WDS_ROW_DTYPE` record, or None when a member lies more than 2 GiB from the image."""
    deltas = [(m[0] - image[0], m[1]) if m is not None and m[1] > 0 else (0, 0) for m in (txt, meta)]
    if any(not _I32_MIN <= d <= _I32_MAX for d, _ in deltas) or max(image[1], *(n for _, n in deltas)) > _U32_MAX:
        return None
    return (image[0], image[1], *deltas[0], *deltas[1], cls)


def _cls(handle: Any, parts: dict[str, tuple[int, int]]) -> int:
    """The integer in a `.cls` member (webdataset's class label), or -1 when absent or not a 32-bit integer."""
    member = parts.get("cls")
    if member is None or not 0 < member[1] <= 32:
        return -1
    try:
        value = int(os.pread(handle.fileno(), member[1], member[0]).decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return -1
    return value if 0 <= value <= _I32_MAX else -1


def _json_has(handle: Any, member: tuple[int, int] | None, key: str) -> bool:
    """Whether a JSON member holds a non-empty string under `key` (one small read)."""
    if member is None or member[1] == 0:
        return False
    try:
        value = json.loads(os.pread(handle.fileno(), member[1], member[0]).decode("utf-8")).get(key)
    except (ValueError, AttributeError):
        return False
    return isinstance(value, str) and bool(value.strip())


def _index_one(job: tuple[int, str, str, str]) -> dict[str, Any]:
    """Index shard `number` into `out` unless its record is current; returns the record (worker entry point)."""
    number, tar, out, caption_key = job
    path, out_dir = Path(tar), Path(out)
    record_path = out_dir / f"{number:06d}.json"
    stat = path.stat()
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if (record["path"], record["bytes"], record["mtime_ns"]) == (str(path), stat.st_size, stat.st_mtime_ns):
            return record
    result = index_tar(path, caption_key)
    index_name = f"{number:06d}.idx"  # rows as bytes: a memory-mappable array of WDS_ROW_DTYPE
    _atomic_write(out_dir / index_name, result["rows"].tobytes())
    record = {
        "path": str(path),
        "index": index_name,
        "samples": int(result["rows"].shape[0]),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "skipped": result["skipped"],
        "truncated": result["truncated"],
    }
    _atomic_write(record_path, json.dumps(record).encode())
    return record


def build_wds_index(
    sources: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    caption_key: str = "caption",
    label_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Index the shards of `sources` into `out_dir` (resumable); returns ``{"samples", "shards", "skipped", …}``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    tars = expand_sources(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / WDS_INDEX_FILE).unlink(missing_ok=True)  # unfinished until rewritten below
    jobs = [(i, str(p), str(out), caption_key) for i, p in enumerate(tars)]
    records = _run(jobs, workers, progress)
    skipped: Counter[str] = Counter()
    for record in records:
        skipped.update(record["skipped"])
    summary = {
        "format": WDS_INDEX_FORMAT,
        "caption_key": caption_key,
        "label_key": label_key,
        "shards": [{"path": r["path"], "index": r["index"], "samples": r["samples"]} for r in records],
        "skipped": dict(sorted(skipped.items())),
        "truncated": [r["path"] for r in records if r["truncated"]],
    }
    _atomic_write(out / WDS_INDEX_FILE, json.dumps(summary, indent=1).encode())
    samples = sum(r["samples"] for r in records)
    return {
        "samples": samples,
        "shards": len(records),
        "skipped": summary["skipped"],
        "truncated": summary["truncated"],
    }


def _run(jobs: list[tuple[int, str, str, str]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="indexing shards", unit="shard", disable=not progress)
    try:
        if workers == 1:
            return [_tracked(_index_one(job), bar) for job in jobs]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return [_tracked(record, bar) for record in pool.map(_index_one, jobs, chunksize=4)]
    finally:
        bar.close()


def _tracked(record: dict[str, Any], bar: Any) -> dict[str, Any]:
    bar.update(1)
    return record


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
