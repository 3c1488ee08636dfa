"""build_shards: validation and skip counts, shard layout, index offsets (oracle: tarfile, webdataset)."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpcap.data.build import INDEX_DTYPE, build_shards, dataset_stats
from dpcap.errors import ConfigError, DataError

GOOD = {  # stem -> (format, caption)
    "a01": ("PNG", "a red square"),
    "a02": ("JPEG", "a green square"),
    "a03": ("WEBP", "a blue square"),
    "a04": ("BMP", "a bitmap"),
    "a05": ("PNG", "  padded caption \n"),
    "a06": ("PNG", "ünïcödé caption ✓"),
    "a07": ("PNG", "seventh"),
}
SUFFIX = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


def image_bytes(fmt: str, seed: int, size: tuple[int, int] = (12, 9)) -> bytes:
    """A small image with pseudo-random pixels, encoded in ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_folder_source(root: Path, good: dict[str, tuple[str, str]] = GOOD, bad: bool = True) -> Path:
    """Folder of images + same-stem captions; with ``bad``, one sample per skip reason."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (stem, (fmt, caption)) in enumerate(good.items()):
        (root / f"{stem}.{SUFFIX[fmt]}").write_bytes(image_bytes(fmt, i))
        (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    if bad:
        (root / "b_corrupt.png").write_bytes(image_bytes("PNG", 99)[:40])  # truncated PNG
        (root / "b_corrupt.txt").write_text("corrupt image")
        (root / "b_empty.png").write_bytes(image_bytes("PNG", 98))
        (root / "b_empty.txt").write_text("  \n\t")
        (root / "b_latin1.png").write_bytes(image_bytes("PNG", 97))
        (root / "b_latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        (root / "b_nocaption.png").write_bytes(image_bytes("PNG", 96))
        (root / "b_long.png").write_bytes(image_bytes("PNG", 95))
        (root / "b_long.txt").write_text("x" * 61)
        (root / "b_orphan.txt").write_text("caption without image")
    return root


EXPECTED_SKIPS = {
    "corrupt_image": 1,
    "empty_caption": 1,
    "non_utf8_caption": 1,
    "missing_caption": 1,
    "caption_too_long": 1,
    "missing_image": 1,
}


def read_tar_samples(shard: Path) -> list[tuple[str, dict[str, bytes], dict[str, tarfile.TarInfo]]]:
    """Oracle: (key, {ext: bytes}, {ext: TarInfo}) per sample, read with the standard library."""
    samples: dict[str, tuple[dict, dict]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            data, infos = samples.setdefault(key, ({}, {}))
            data[ext] = tar.extractfile(member).read()
            infos[ext] = member
    return [(k, *samples[k]) for k in sorted(samples)]


def test_folder_build_counts_every_skip_reason(tmp_path: Path) -> None:
    src = make_folder_source(tmp_path / "src")
    result = build_shards(src, tmp_path / "out", samples_per_shard=3, max_caption_chars=60)
    assert result["written"] == len(GOOD)
    assert result["skipped"] == EXPECTED_SKIPS
    assert result["shards"] == 3
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    assert sum(sizes.values()) == result["written"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*sizes, *(n.replace(".tar", ".idx") for n in sizes), "sizes.json"]
    )


def test_shards_hold_the_samples_in_sorted_order(tmp_path: Path) -> None:
    src = make_folder_source(tmp_path / "src")
    build_shards(src, tmp_path / "out", samples_per_shard=3, max_caption_chars=60)
    samples = [s for shard in sorted((tmp_path / "out").glob("*.tar")) for s in read_tar_samples(shard)]
    assert [k for k, _, _ in samples] == [f"{i:010d}" for i in range(len(GOOD))]
    assert [d["txt"].decode() for _, d, _ in samples] == [c.strip() for _, c in GOOD.values()]
    exts = [next(e for e in d if e not in ("txt", "json")) for _, d, _ in samples]
    assert exts == ["png", "jpg", "webp", "png", "png", "png", "png"]  # BMP re-encoded losslessly as PNG
    metas = [json.loads(d["json"]) for _, d, _ in samples]
    assert metas == [{"id": i, "source": f"{stem}.{SUFFIX[f]}"} for i, (stem, (f, _)) in enumerate(GOOD.items())]
    original = np.asarray(Image.open(src / "a04.bmp").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[3][1]["png"])).convert("RGB")), original)
    assert samples[0][1]["png"] == (src / "a01.png").read_bytes()  # PNG/JPEG/WebP kept byte for byte


def test_members_are_plain_ustar_with_integer_mtime(tmp_path: Path) -> None:
    build_shards(make_folder_source(tmp_path / "src", bad=False), tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 3 * len(GOOD)
    assert all(m.mtime == 0 and not m.pax_headers and m.isfile() for m in members)
    shard_bytes = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    assert b"PaxHeader" not in shard_bytes and b"ustar" in shard_bytes[:512]


def test_index_offsets_point_at_member_bytes(tmp_path: Path) -> None:
    build_shards(make_folder_source(tmp_path / "src"), tmp_path / "out", samples_per_shard=4, max_caption_chars=60)
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        raw = shard.with_suffix(".idx").read_bytes()
        rows = np.frombuffer(raw, dtype=INDEX_DTYPE).reshape(-1, 6)
        blob = shard.read_bytes()
        samples = read_tar_samples(shard)
        assert len(raw) == 48 * len(samples) and rows.shape[0] == len(samples)
        for row, (_, data, infos) in zip(rows, samples):
            image_ext = next(e for e in data if e not in ("txt", "json"))
            for (offset, size), ext in zip(row.reshape(3, 2), (image_ext, "txt", "json")):
                assert offset == infos[ext].offset_data and size == infos[ext].size
                assert blob[offset : offset + size] == data[ext]


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    import webdataset as wds

    build_shards(make_folder_source(tmp_path / "src"), tmp_path / "out", samples_per_shard=3, max_caption_chars=60)
    urls = [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    stream = list(wds.WebDataset(urls, shardshuffle=False))
    oracle = [s for u in urls for s in read_tar_samples(Path(u))]
    assert [s["__key__"] for s in stream] == [k for k, _, _ in oracle]
    assert [s["txt"] for s in stream] == [d["txt"] for _, d, _ in oracle]
    assert [json.loads(s["json"])["id"] for s in stream] == list(range(len(GOOD)))


def test_build_is_deterministic(tmp_path: Path) -> None:
    src = make_folder_source(tmp_path / "src")
    build_shards(src, tmp_path / "one", max_caption_chars=60)
    build_shards(src, tmp_path / "two", max_caption_chars=60)
    for name in ("shard-000000.tar", "shard-000000.idx", "sizes.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def write_images(root: Path, n: int) -> list[str]:
    (root / "img").mkdir(parents=True)
    names = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(image_bytes("PNG", i))
        names.append(f"img/{i}.png")
    return names


def test_jsonl_manifest_with_where_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = write_images(src, 6)
    rows = [
        {"image": names[0], "caption": "zero", "split": "train", "label": 3},
        {"image": str(src / names[1]), "caption": "one (absolute path)", "split": "train", "id": "x1"},
        {"image": names[2], "caption": "two", "split": "test"},
        {"image": "img/missing.png", "caption": "gone", "split": "train"},
        {"image": names[3], "caption": "", "split": "train"},
        {"image": names[4], "caption": "\ud800 lone surrogate", "split": "train"},
        {"image": names[5], "split": "train"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "", json.dumps([1, 2])]
    (src / "m.jsonl").write_text("\n".join(lines) + "\n")
    result = build_shards(src / "m.jsonl", tmp_path / "out", where={"split": "train"})
    assert result["written"] == 2
    assert result["skipped"] == {
        "missing_image": 1,
        "empty_caption": 1,
        "non_utf8_caption": 1,
        "missing_caption": 1,
        "bad_manifest_row": 2,
    }
    samples = read_tar_samples(tmp_path / "out" / "shard-000000.tar")
    assert [d["txt"].decode() for _, d, _ in samples] == ["zero", "one (absolute path)"]
    metas = [json.loads(d["json"]) for _, d, _ in samples]
    assert metas == [{"split": "train", "label": 3, "id": 0}, {"split": "train", "source_id": "x1", "id": 1}]
    assert samples[0][1]["png"] == (src / names[0]).read_bytes()


def test_csv_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = write_images(src, 4)
    with open(src / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "group"])
        writer.writerows([[names[0], "a, quoted caption", "g1"], [names[1], "b", "g2"], [names[2], "", "g1"]])
    with open(src / "m.csv", "ab") as f:
        f.write(names[3].encode() + b",caf\xe9,g2\n")  # latin-1 byte: not UTF-8
    result = build_shards(src / "m.csv", tmp_path / "out")
    assert result["written"] == 2 and result["skipped"] == {"empty_caption": 1, "non_utf8_caption": 1}
    samples = read_tar_samples(tmp_path / "out" / "shard-000000.tar")
    assert [(d["txt"].decode(), json.loads(d["json"])) for _, d, _ in samples] == [
        ("a, quoted caption", {"group": "g1", "id": 0}),
        ("b", {"group": "g2", "id": 1}),
    ]
    assert build_shards(src / "m.csv", tmp_path / "g2", where={"group": "g2"})["written"] == 1


def test_csv_without_required_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,text\na.png,hello\n")
    with pytest.raises(DataError, match="'image' and 'caption'"):
        build_shards(tmp_path / "m.csv", tmp_path / "out")


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="notes.md"):
        build_shards(tmp_path / "notes.md", tmp_path / "out")
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "x.png").write_bytes(b"garbage")
    (bad_only / "x.txt").write_text("caption")
    with pytest.raises(DataError, match="no valid samples.*corrupt_image"):
        build_shards(bad_only, tmp_path / "out")
    with pytest.raises(ConfigError, match="samples_per_shard"):
        build_shards(bad_only, tmp_path / "out", samples_per_shard=0)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = make_folder_source(tmp_path / "src", bad=False)
    out = tmp_path / "out"
    assert build_shards(src, out, samples_per_shard=2)["shards"] == 4
    with pytest.raises(DataError, match="already holds shards .*; pass --overwrite to replace them"):
        build_shards(src, out)
    (out / "notes.txt").write_text("kept")
    result = build_shards(src, out, overwrite=True)
    assert result["shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.idx", "shard-000000.tar", "sizes.json"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_dataset_stats(tmp_path: Path) -> None:
    build_shards(make_folder_source(tmp_path / "src"), tmp_path / "out", samples_per_shard=3, max_caption_chars=60)
    stats = dataset_stats(tmp_path / "out")
    tars = sorted((tmp_path / "out").glob("*.tar"))
    assert stats["samples"] == len(GOOD) and stats["shards"] == 3
    assert stats["bytes"] == sum(os.path.getsize(p) for p in tars)
    assert stats["caption_bytes"] == sum(len(c.strip().encode()) for _, c in GOOD.values())
    assert stats["index_bytes"] == 48 * len(GOOD)


def test_folder_sidecar_metadata_and_where(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, (stem, meta) in enumerate([("sub/a", '{"label": "cat", "split": "train"}'), ("b", "[1]"), ("c", "{")]):
        (src / f"{stem}.png").write_bytes(image_bytes("PNG", i))
        (src / f"{stem}.txt").write_text(f"caption {stem}")
        (src / f"{stem}.json").write_text(meta)
    (src / "d.png").write_bytes(image_bytes("PNG", 5))
    (src / "d.txt").write_text("caption d")
    (src / "d.json").write_text('{"split": "val"}')
    result = build_shards(src, tmp_path / "out", where={"split": "train"})
    assert result["written"] == 1 and result["skipped"] == {"bad_metadata": 2}
    [(_, data, _)] = read_tar_samples(tmp_path / "out" / "shard-000000.tar")
    assert json.loads(data["json"]) == {"label": "cat", "split": "train", "source": "sub/a.png", "id": 0}


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_folder_is_walked_depth_first_folder_files_before_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, stem in enumerate(["b", "z", "a/y", "a/c/x", "a/b", "c/w"]):
        (src / stem).parent.mkdir(parents=True, exist_ok=True)
        (src / f"{stem}.png").write_bytes(image_bytes("PNG", i))
        (src / f"{stem}.txt").write_text(f"caption {stem}")
    build_shards(src, tmp_path / "out", progress=False)
    sources = [json.loads(d["json"])["source"] for _, d, _ in read_tar_samples(tmp_path / "out" / "shard-000000.tar")]
    assert sources == ["b.png", "z.png", "a/b.png", "a/y.png", "a/c/x.png", "c/w.png"]


def test_workers_write_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    src = make_folder_source(tmp_path / "src")
    make_folder_source(tmp_path / "src" / "more", {f"m{i:02d}": ("PNG", f"more {i}") for i in range(40)}, bad=False)
    one = build_shards(src, tmp_path / "one", samples_per_shard=9, max_caption_chars=60, progress=False)
    two = build_shards(src, tmp_path / "two", samples_per_shard=9, max_caption_chars=60, workers=2, progress=False)
    assert one == {**two, "out": one["out"]} and one["skipped"] == EXPECTED_SKIPS
    assert _folder_bytes(tmp_path / "one") == _folder_bytes(tmp_path / "two")
    with pytest.raises(ConfigError, match="workers"):
        build_shards(src, tmp_path / "three", workers=0)


class _Killed(Exception):
    """Stands in for SIGKILL in the middle of a build."""


def test_killed_build_resumes_after_its_last_shard_with_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    import dpcap.data.build as build

    rows = [{"image": f"i{i}.png", "caption": f"caption {i}", "split": "train" if i % 3 else "val"} for i in range(30)]
    rows.insert(7, {"image": "missing.png", "caption": "gone", "split": "train"})
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"i{i}.png").write_bytes(image_bytes("PNG", i))
    manifest = src / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"samples_per_shard": 4, "where": {"split": "train"}, "progress": False}
    reference = build_shards(manifest, tmp_path / "reference", **options)

    real_validate, seen = build._validate, []

    def validate_then_die(cand, *limits):
        seen.append(cand.image.name)
        if len(seen) == 15:  # the 15th candidate kept by `where`: 3 shards are in place by then
            raise _Killed
        return real_validate(cand, *limits)

    monkeypatch.setattr(build, "_validate", validate_then_die)
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        build_shards(manifest, out, **options)
    assert not (out / "sizes.json").exists()  # unfinished: readers refuse it
    state = json.loads((out / ".build-state.json").read_text())
    assert sorted(state["sizes"]) == [f"shard-00000{i}.tar" for i in range(3)] and state["skipped"] == {
        "missing_image": 1
    }

    with pytest.raises(DataError, match="unfinished build of another source or with other options.*--overwrite"):
        build_shards(manifest, out, **{**options, "samples_per_shard": 5})
    seen.clear()
    resumed = build_shards(manifest, out, **options)
    assert resumed == {**reference, "out": str(out), "resumed_shards": 3}
    assert seen == [f"i{i}.png" for i in (19, 20, 22, 23, 25, 26, 28, 29)]  # only what the 3 shards had not consumed
    assert _folder_bytes(out) == _folder_bytes(tmp_path / "reference")  # and no state file left behind


def test_cli_data_build_with_workers(tmp_path: Path, capsys) -> None:
    """`dpcap data build SRC --out DIR --workers 2 --json`, as the README shows it."""
    from dpcap.cli import main

    src = make_folder_source(tmp_path / "src")
    assert main(["data", "build", str(src), "--out", str(tmp_path / "out"), "--workers", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == len(GOOD) + 1  # b_long is within the default 1,000 characters
    assert report["skipped"] == {k: v for k, v in EXPECTED_SKIPS.items() if k != "caption_too_long"}
    assert report["resumed_shards"] == 0
