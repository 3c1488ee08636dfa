"""Issue 12, data hardening: symlinks out of a build's source, pixel caps, index rows checked against the tar."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dpcap.data.build import SKIP_REASONS, build_shards
from dpcap.data.index import ShardIndex
from dpcap.data.layout import MAX_IMAGE_PIXELS, WDS_ROW_DTYPE
from dpcap.data.reader import SampleReader, _BadSample, decode_image, image_transform
from dpcap.data.wds_index import build_wds_index
from dpcap.errors import DataError
from tests.data.test_build import image_bytes, read_tar_samples

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_reader(shard_dir: Path, **kwargs) -> SampleReader:
    return SampleReader(shard_dir, image_transform(8, MEAN, STD), **kwargs)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels but whose data is one 1-bit pixel (~70 bytes).

    Opening it costs nothing; decoding it would fail (corrupt_image), so ``too_many_pixels`` proves the
    size was checked before any decoding.
    """
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def just_above_default_cap() -> bytes:
    """A real, valid 9500 × 9500 1-bit PNG (90.25 Mpx > 89,478,485): ~30 KB on disk, 90 MB once decoded."""
    buf = io.BytesIO()
    Image.new("1", (9500, 9500), 1).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def loads(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image PIL decodes (``ImageFile.load``, called again by convert/resize) while the test runs."""
    seen: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        seen.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


# ---------------------------------------------------------------- symlinks (data build from a folder)


def test_build_never_follows_symlinks_out_of_the_source(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET outside the source folder")
    (outside / "secret.json").write_text('{"leak": "TOP SECRET json"}')
    (outside / "far.png").write_bytes(image_bytes("PNG", 1))
    (outside / "far.txt").write_text("TOP SECRET from a linked folder")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "good.png").write_bytes(image_bytes("PNG", 2))
    (src / "good.txt").write_text("a good sample")
    (src / "a.png").write_bytes(image_bytes("PNG", 3))
    (src / "a.txt").symlink_to(outside / "secret.txt")  # caption linked out: skipped, never read
    (src / "b.png").symlink_to(outside / "far.png")  # image linked out
    (src / "b.txt").write_text("image linked out")
    (src / "c.png").write_bytes(image_bytes("PNG", 4))
    (src / "c.txt").write_text("sidecar linked out")
    (src / "c.json").symlink_to(outside / "secret.json")
    (src / "linked").symlink_to(outside, target_is_directory=True)  # folder linked out: counted once
    (src / "sub" / "real.png").write_bytes(image_bytes("PNG", 5))
    (src / "sub" / "real.txt").write_text("caption in a subfolder")
    (src / "d.png").symlink_to(src / "sub" / "real.png")  # inside the source: read through its target
    (src / "d.txt").symlink_to(Path("sub") / "real.txt")  # relative, inside
    (src / "loop").symlink_to(src, target_is_directory=True)  # inside: not walked (it would never end)
    (src / "sub" / "up").symlink_to(src / "sub", target_is_directory=True)

    result = build_shards(src, tmp_path / "out", progress=False)

    assert "symlink_outside_source" in SKIP_REASONS
    assert result["skipped"] == {"symlink_outside_source": 4} and result["written"] == 3
    samples = [s for p in sorted((tmp_path / "out").glob("*.tar")) for s in read_tar_samples(p)]
    captions = [d["txt"].decode() for _, d, _ in samples]
    assert captions == ["caption in a subfolder", "a good sample", "caption in a subfolder"]
    assert [d["json"] for _, d, _ in samples][0].startswith(b'{"id": 0, "source": "d.png"')
    for shard in (tmp_path / "out").glob("*.tar"):
        assert b"TOP SECRET" not in shard.read_bytes()


def test_a_source_folder_given_through_a_symlink_still_builds(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "x.png").write_bytes(image_bytes("PNG", 1))
    (real / "x.txt").write_text("via a linked source folder")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    result = build_shards(tmp_path / "alias", tmp_path / "out", progress=False)
    assert result["written"] == 1 and result["skipped"] == {}


def test_symlinked_samples_out_of_the_source_are_counted_even_with_where(tmp_path: Path) -> None:
    """Their metadata is never read, so `where` cannot filter them out: they are counted, like broken rows."""
    (tmp_path / "elsewhere.txt").write_text("outside")
    src = tmp_path / "src"
    src.mkdir()
    for stem, split in (("k", "train"), ("v", "val")):
        (src / f"{stem}.png").write_bytes(image_bytes("PNG", 1))
        (src / f"{stem}.txt").write_text(f"caption {stem}")
        (src / f"{stem}.json").write_text(f'{{"split": "{split}"}}')
    (src / "o.png").write_bytes(image_bytes("PNG", 2))
    (src / "o.txt").symlink_to(tmp_path / "elsewhere.txt")
    result = build_shards(src, tmp_path / "out", where={"split": "train"}, progress=False)
    assert result["written"] == 1 and result["skipped"] == {"symlink_outside_source": 1}


# ---------------------------------------------------------------- pixel cap


def test_build_skips_images_over_the_cap_from_their_header(tmp_path: Path, loads) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "claims.png").write_bytes(png_claiming(100_000, 100_000))  # 10^10 px claimed, 1 px of data
    (src / "claims.txt").write_text("header claims a huge size")
    (src / "big.png").write_bytes(image_bytes("PNG", 1, size=(60, 50)))  # 3000 px, real
    (src / "big.txt").write_text("above the lowered cap")
    (src / "small.png").write_bytes(image_bytes("PNG", 2, size=(50, 40)))  # 2000 px
    (src / "small.txt").write_text("at the cap")
    result = build_shards(src, tmp_path / "out", max_image_pixels=2000, progress=False)
    assert result["skipped"] == {"too_many_pixels": 2} and result["written"] == 1
    assert set(loads) == {(50, 40)}  # only the image within the cap was decoded
    assert "too_many_pixels" in SKIP_REASONS


def test_build_at_the_default_cap_never_decodes_an_image_just_above_it(
    tmp_path: Path, just_above_default_cap: bytes, loads
) -> None:
    assert 9500 * 9500 > MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    src = tmp_path / "src"
    src.mkdir()
    (src / "huge.png").write_bytes(just_above_default_cap)
    (src / "huge.txt").write_text("90.25 Mpx")
    (src / "ok.png").write_bytes(image_bytes("PNG", 1))
    (src / "ok.txt").write_text("fine")
    started = time.perf_counter()
    with _no_bomb_warning():
        result = build_shards(src, tmp_path / "out", progress=False)
    assert result["skipped"] == {"too_many_pixels": 1} and result["written"] == 1
    assert (9500, 9500) not in loads and time.perf_counter() - started < 5  # decoding it alone takes ~0.3 s


def test_decode_image_checks_the_header_before_decoding(loads) -> None:
    with pytest.raises(_BadSample, match="too_many_pixels"):
        decode_image(png_claiming(10_000, 9_000), max_pixels=10**6)
    with pytest.raises(_BadSample, match="too_many_pixels"), _no_bomb_warning():  # Pillow's 2× limit is below
        decode_image(png_claiming(20_000, 20_000), max_pixels=10**12)  # the cap: its error counts the same way
    with pytest.raises(_BadSample, match="corrupt_image"):  # within the cap: decoded, and its data is a lie
        decode_image(png_claiming(300, 300), max_pixels=10**6)
    assert loads == [(300, 300)]
    assert decode_image(image_bytes("PNG", 1, size=(20, 10)), max_pixels=200).size == (20, 10)


def write_wds_tar(path: Path, images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data in images.items():
            for name, member in ((f"{key}.png", data), (f"{key}.txt", f"caption of {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))


def test_reader_skips_an_image_above_the_default_cap_without_decoding_it(
    tmp_path: Path, just_above_default_cap: bytes, loads
) -> None:
    """An in-place index takes tar headers only, so the big image reaches the reader, which must refuse it."""
    (tmp_path / "wds").mkdir()
    write_wds_tar(tmp_path / "wds" / "000.tar", {"a": image_bytes("PNG", 1), "b": just_above_default_cap})
    build_wds_index([str(tmp_path / "wds")], tmp_path / "index", progress=False)
    started = time.perf_counter()
    with _no_bomb_warning():
        batch = make_reader(tmp_path / "index").read([0, 1])
    assert batch.ids.tolist() == [0] and batch.skipped == {"too_many_pixels": 1}
    assert (9500, 9500) not in loads and time.perf_counter() - started < 5


def test_reader_pixel_cap_is_a_keyword(tmp_path: Path, loads) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([(12, 9), (40, 30), (12, 9)]):
        (src / f"s{i}.png").write_bytes(image_bytes("PNG", i, size=size))
        (src / f"s{i}.txt").write_text(f"caption {i}")
    build_shards(src, tmp_path / "out", progress=False)
    loads.clear()
    batch = make_reader(tmp_path / "out", max_image_pixels=500).read([0, 1, 2])
    assert batch.ids.tolist() == [0, 2] and batch.skipped == {"too_many_pixels": 1}
    assert set(loads) == {(12, 9)}
    assert make_reader(tmp_path / "out").read([0, 1, 2]).ids.tolist() == [0, 1, 2]


class _no_bomb_warning:
    """Fail if Pillow's DecompressionBombWarning escapes (the cap decides; the warning is silenced)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


# ---------------------------------------------------------------- index rows checked against the tar


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        (src / f"s{i}.png").write_bytes(image_bytes("PNG", i))
        (src / f"s{i}.txt").write_text(f"caption {i}")
    build_shards(src, tmp_path / "out", samples_per_shard=3, progress=False)
    return tmp_path / "out"


def set_row(idx: Path, row: int, column: int, value: int) -> None:
    rows = np.fromfile(idx, dtype="<u8").reshape(-1, 6)
    rows[row, column] = value
    rows.tofile(idx)


def test_a_row_claiming_2_to_the_40_bytes_is_a_data_error_not_a_memory_error(shards: Path) -> None:
    set_row(shards / "shard-000001.idx", 1, 1, 2**40)  # global id 4's image size
    reader = make_reader(shards)  # opening stays cheap: rows are checked when a shard is first mapped
    assert reader.read([0, 1, 6]).ids.tolist() == [0, 1, 6]  # the other shards read as before
    with pytest.raises(DataError) as err:
        reader.read([3])  # the same shard, another row: nothing is read through a bad index
    message = str(err.value)
    expected = ("shard-000001.idx", "shard-000001.tar", "sample row 1", "global id 4", "image member", "1099511627776")
    for part in (*expected, "-byte tar", "rebuild"):
        assert part in message, (part, message)
    with pytest.raises(DataError, match="sample row 1"):
        ShardIndex(shards).locate(4)


def test_an_offset_inside_the_first_header_is_a_data_error(shards: Path) -> None:
    set_row(shards / "shard-000000.idx", 2, 2, 100)  # the caption "starts" at byte 100
    with pytest.raises(DataError, match=r"sample row 2 \(global id 2\) puts its txt member at offset 100.*header"):
        make_reader(shards).read([0])


def test_a_corrupt_last_row_of_a_complete_tar_is_not_taken_for_a_truncation(shards: Path) -> None:
    rows = np.fromfile(shards / "shard-000002.idx", dtype="<u8").reshape(-1, 6)
    set_row(shards / "shard-000002.idx", len(rows) - 1, 5, 2**33)  # the last member of the shard
    with pytest.raises(DataError, match="json member .* 8589934592 bytes"):
        make_reader(shards).read([6])


def test_a_tar_cut_short_warns_and_its_rows_past_the_cut_are_skipped(shards: Path) -> None:
    index = ShardIndex(shards)
    path, row = index.locate(5)  # shard 1 holds ids 3, 4, 5
    os.truncate(path, int(row[0]) + 10)
    set_row(shards / "shard-000001.idx", 2, 1, 2**40)  # and past the cut, a lie: still never allocated
    with pytest.warns(UserWarning, match="shard-000001.tar is cut short.*1 of its 3 samples"):
        batch = make_reader(shards).read([3, 4, 5])
    assert batch.ids.tolist() == [3, 4] and batch.skipped == {"corrupt_image": 1}


def test_in_place_index_rows_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "wds").mkdir()
    write_wds_tar(tmp_path / "wds" / "000.tar", {f"k{i}": image_bytes("PNG", i) for i in range(3)})
    build_wds_index([str(tmp_path / "wds")], tmp_path / "index", progress=False)
    assert make_reader(tmp_path / "index").read([0, 1, 2]).ids.tolist() == [0, 1, 2]
    idx = tmp_path / "index" / "000000.idx"
    rows = np.fromfile(idx, dtype=WDS_ROW_DTYPE)
    rows[1]["image_size"] = 2**32 - 1
    rows.tofile(idx)
    with pytest.raises(DataError, match=r"000.tar is corrupt: sample row 1 \(global id 1\).*4294967295 bytes"):
        make_reader(tmp_path / "index").read([0])


def test_opening_an_index_maps_no_rows(shards: Path) -> None:
    """Rows are checked lazily: opening an index maps nothing, the first read maps only its own shards."""
    index = ShardIndex(shards)
    assert index._maps == {} and index._checked == set()
    index.locate_many([0, 6])
    assert index._checked == {0, 2}
