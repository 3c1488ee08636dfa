"""`dpcap data index` on shards written by webdataset.TarWriter in img2dataset's layout (never by dpcap)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpcap.cli import main
from dpcap.data.index import ShardIndex, absolute_rows
from dpcap.data.reader import SampleReader, image_transform
from dpcap.data.wds_index import build_wds_index, expand_sources, index_tar
from tests.conftest import train_overrides


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def meta(key: str, caption: str | None) -> bytes:
    fields = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "width": 20, "height": 20}
    return json.dumps(fields | ({"caption": caption} if caption is not None else {})).encode()


def write_img2dataset(folder: Path) -> dict[str, int]:
    """Three shards: normal, JSON-only captions + faults, and a truncated last one. Returns expectations."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "00000.tar"), mtime=0) as sink:  # 4 ordinary samples
        for i in range(4):
            key = f"00000{i:04d}"
            sample = {"__key__": key, "jpg": jpeg(i), "txt": f"a photo number {i}", "json": meta(key, None)}
            sink.write(sample | {"cls": str(7 + i).encode()})  # a class label, as webdataset writes one
    with wds.TarWriter(str(folder / "00001.tar"), mtime=0) as sink:
        for i in range(3):  # captions only in the JSON
            key = f"00001{i:04d}"
            sink.write({"__key__": key, "jpg": jpeg(10 + i), "json": meta(key, f"json caption {i}")})
        sink.write({"__key__": "000010003", "json": meta("000010003", "no image")})  # missing_image
        sink.write({"__key__": "000010004", "jpg": jpeg(14), "json": meta("000010004", None)})  # missing_caption
        sink.write({"__key__": "000010005", "jpg": b"not a jpeg", "txt": "corrupt"})  # indexed, skipped on read
        sink.write({"__key__": "000010006", "txt": "members out of order"})  # its image comes later
        sink.write({"__key__": "000010007", "jpg": jpeg(17), "txt": "in between"})
        sink.write({"__key__": "000010006", "jpg": jpeg(16)})
    with wds.TarWriter(str(folder / "00002.tar"), mtime=0) as sink:
        for i in range(3):
            key = f"00002{i:04d}"
            sink.write({"__key__": key, "jpg": jpeg(20 + i), "txt": f"last shard {i}", "json": meta(key, None)})
    data = (folder / "00002.tar").read_bytes()
    with tarfile.open(folder / "00002.tar") as tar:  # cut inside the third sample's image data
        cut = next(m for m in tar.getmembers() if m.name == "000020002.jpg").offset_data + 10
    (folder / "00002.tar").write_bytes(data[:cut])
    (folder / "00000_stats.json").write_text("{}")  # img2dataset's side files stay untouched and unread
    return {"samples": 4 + 6 + 2, "missing_image": 1, "missing_caption": 1, "truncated": 1}


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("laion") / "wds"
    expected = write_img2dataset(folder)
    for path in folder.iterdir():
        path.chmod(0o444)
    folder.chmod(0o555)
    return folder, expected


def test_index_counts_what_it_leaves_out_and_never_touches_the_source(source, tmp_path):
    folder, expected = source
    before = tree_digest(folder)
    result = build_wds_index([str(folder)], tmp_path / "index", workers=2, progress=False)
    assert result["samples"] == expected["samples"] and result["shards"] == 3
    reasons = {k: expected[k] for k in ("missing_image", "missing_caption", "truncated")}
    assert result["skipped"] == reasons
    assert result["truncated"] == [str((folder / "00002.tar").resolve())]
    assert tree_digest(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert len(ShardIndex(tmp_path / "index")) == expected["samples"]


def test_rows_point_at_the_members_bytes(source):
    """Each row's offsets give back the exact member bytes that tarfile itself reads (independent oracle)."""
    folder, _ = source
    compact = index_tar(folder / "00001.tar", "caption")["rows"]
    assert compact.dtype.itemsize == 32 and (compact["cls"] == -1).all()
    rows = absolute_rows(compact)
    with tarfile.open(folder / "00001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    data = (folder / "00001.tar").read_bytes()
    assert data[rows[0, 0] : rows[0, 0] + rows[0, 1]] == members["000010000.jpg"]
    assert rows[0, 3] == 0 and data[rows[0, 4] : rows[0, 4] + rows[0, 5]] == members["000010000.json"]
    late = next(r for r in rows if data[r[2] : r[2] + r[3]] == b"members out of order")
    assert data[late[0] : late[0] + late[1]] == members["000010006.jpg"]


def test_reader_takes_json_captions_and_skips_the_corrupt_image(source, tmp_path):
    folder, expected = source
    build_wds_index([str(folder / "{00000..00002}.tar")], tmp_path / "index", progress=False)
    reader = SampleReader(tmp_path / "index", image_transform(16, (0.5,) * 3, (0.5,) * 3))
    batch = reader.read(np.arange(len(reader)))
    assert batch.skipped == {"corrupt_image": 1} and len(batch) == expected["samples"] - 1
    assert {"json caption 0", "json caption 2", "members out of order", "a photo number 3"} <= set(batch.captions)
    assert batch.images.shape == (expected["samples"] - 1, 3, 16, 16)
    labels = {c: m.get("cls") for c, m in zip(batch.captions, batch.meta)}
    assert labels["a photo number 0"] == 7 and labels["a photo number 3"] == 10 and labels["in between"] is None


def test_resume_reuses_finished_shards(source, tmp_path):
    folder, _ = source
    out = tmp_path / "index"
    build_wds_index([str(folder)], out, progress=False)
    first = (out / "000000.idx").stat().st_mtime_ns
    (out / "shards.json").unlink()  # as if killed before the end
    (out / "000001.json").unlink()  # and before shard 1 was recorded
    again = build_wds_index([str(folder)], out, progress=False)
    assert (out / "000000.idx").stat().st_mtime_ns == first and again["samples"] == len(ShardIndex(out))


def test_sources_as_list_file_and_errors(source, tmp_path):
    folder, _ = source
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(str(folder / f"0000{i}.tar") for i in range(3)) + "\n")
    assert [p.name for p in expand_sources([str(listing)])] == ["00000.tar", "00001.tar", "00002.tar"]
    assert main(["data", "index", str(folder / "{00000..00009}.tar"), "--out", str(tmp_path / "x")]) == 2


def test_cli_index_stats_and_train_on_the_index(source, tmp_path, capsys):
    folder, expected = source
    out = tmp_path / "index"
    assert main(["data", "index", str(folder), "--out", str(out), "--workers", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == expected["samples"] and result["shards"] == 3
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["samples"] == expected["samples"] and stats["skipped"]["missing_image"] == 1
    assert stats["index_bytes"] == 32 * expected["samples"]  # at most 32 bytes of index per sample
    overrides = train_overrides(out, tmp_path / "run", **{"train.steps": 2, "train.batch_size": 4})
    assert main(["train", *overrides, "--json"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run["num_samples"] == expected["samples"] and run["step"] == 2


def write_labelled(folder: Path, seeds: range) -> None:
    """Two-class img2dataset shards: a `.cls` member and the same class as a JSON field `"kind"`."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "00000.tar"), mtime=0) as sink:
        for i in seeds:
            key, label = f"{i:09d}", i % 2
            fields = json.loads(meta(key, f"a picture of kind {label}")) | {"kind": ["even", "odd"][label]}
            sink.write(
                {"__key__": key, "jpg": jpeg(i), "json": json.dumps(fields).encode(), "cls": str(label).encode()}
            )


def test_probe_reads_labels_of_an_in_place_index(tmp_path, capsys):
    """`dpcap probe` on indexes of webdataset shards: the `.cls` label, or a JSON field as the label."""
    for split, seeds in (("train", range(0, 24)), ("test", range(100, 112))):
        write_labelled(tmp_path / f"wds-{split}", seeds)
        build_wds_index([str(tmp_path / f"wds-{split}")], tmp_path / split, label_key="kind", progress=False)
    reports = {}
    for label in ("cls", "kind"):
        argv = ["probe", "random:nano", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
        assert main([*argv, "--label", label, "--json"]) == 0
        reports[label] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reports["cls"]["num_classes"] == reports["kind"]["num_classes"] == 2
    assert reports["cls"]["num_test"] == reports["kind"]["num_test"] == 12
    assert reports["cls"]["top1"] == reports["kind"]["top1"]  # the same labels under two names
