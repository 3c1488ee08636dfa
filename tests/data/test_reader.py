"""SampleReader, MicroBatchLoader, image_transform and the webdataset stream, on tiny shards."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpcap.data.build import build_shards
from dpcap.data.index import ShardIndex
from dpcap.data.reader import (
    MicroBatchLoader,
    SampleReader,
    StepLoader,
    image_transform,
    rank_share,
    read_all,
    split_micro_batches,
    stream_dataset,
)
from dpcap.errors import ConfigError, DataError
from tests.data.test_build import make_folder_source

N_SAMPLES = 13
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


class CharTokenizer:
    """Stand-in tokenizer: code points, zero-padded to a fixed length (picklable, module level)."""

    context_length = 24

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros((len(captions), self.context_length), dtype=torch.long)
        for i, caption in enumerate(captions):
            codes = [ord(c) for c in caption][: self.context_length]
            out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return out


def char_tokenize(captions: list[str]) -> torch.Tensor:
    """A plain function tokenizer without ``context_length`` (length found by calling it)."""
    return CharTokenizer()(captions)


def caption_of(i: int) -> str:
    return f"caption number {i}"


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    good = {f"s{i:02d}": ("PNG", caption_of(i)) for i in range(N_SAMPLES)}
    build_shards(make_folder_source(tmp_path / "src", good, bad=False), tmp_path / "out", samples_per_shard=5)
    return tmp_path / "out"


def make_reader(shard_dir: Path, tokenizer: object = None, size: int = 8) -> SampleReader:
    return SampleReader(shard_dir, image_transform(size, MEAN, STD), tokenizer or CharTokenizer())


def expected_image(shard_dir: Path, i: int, size: int = 8) -> torch.Tensor:
    return image_transform(size, MEAN, STD)(Image.open(shard_dir.parent / "src" / f"s{i:02d}.png"))


# ---------------------------------------------------------------- image_transform


def test_transform_normalises_a_solid_colour() -> None:
    out = image_transform(6, MEAN, STD)(Image.new("RGB", (30, 17), (200, 100, 50)))
    expected = (torch.tensor([200, 100, 50]) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert out.shape == (3, 6, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 6, 6), rtol=0, atol=1e-5)


def test_transform_centre_crops_to_a_square() -> None:
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # the centred 10×10 square is green
    out = image_transform(10, (0, 0, 0), (1, 1, 1))(image)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 10, 10))


def test_transform_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 200, 128))
    out = image_transform(4, (0, 0, 0), (1, 1, 1))(rgba) * 255
    a = 128 / 255  # alpha blending over white: c·a + 255·(1 - a)
    torch.testing.assert_close(out[:, 0, 2], torch.full((3,), 255.0))
    torch.testing.assert_close(out[:, 0, 0], torch.zeros(3))
    torch.testing.assert_close(
        out[:, 0, 1], torch.tensor([255 * (1 - a), 255 * (1 - a), 200 * a + 255 * (1 - a)]), atol=1.0, rtol=0
    )
    palette = rgba.convert("P")
    assert image_transform(4, (0, 0, 0), (1, 1, 1))(palette).shape == (3, 4, 4)


def test_transform_downscale_preserves_the_mean_of_a_gradient() -> None:
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1))
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1).astype(np.uint8))
    out = image_transform(16, (0, 0, 0), (1, 1, 1))(image)
    assert abs(out.mean().item() - ramp.mean() / 255) < 0.01
    assert torch.all(out[0, :, 1:] >= out[0, :, :-1] - 1e-6)  # still increasing left to right


def test_transform_arguments() -> None:
    with pytest.raises(ConfigError):
        image_transform(0, MEAN, STD)
    with pytest.raises(ConfigError):
        image_transform(8, (0.5, 0.5), STD)
    with pytest.raises(ConfigError):
        image_transform(8, MEAN, (0.2, 0.0, 0.2))


# ---------------------------------------------------------------- reader


def test_read_any_order_gives_sorted_ids_captions_images(shards: Path) -> None:
    reader = make_reader(shards)
    batch = reader.read(np.array([12, 3, 7, 0, 5]))
    assert batch.ids.tolist() == [0, 3, 5, 7, 12] and batch.ids.dtype == torch.int64
    assert batch.captions == [caption_of(i) for i in (0, 3, 5, 7, 12)]
    assert [m["id"] for m in batch.meta] == [0, 3, 5, 7, 12]
    assert torch.equal(batch.tokens, CharTokenizer()(batch.captions))
    assert batch.images.shape == (5, 3, 8, 8) and batch.skipped == {} and len(batch) == 5
    for row, i in enumerate((0, 3, 5, 7, 12)):
        torch.testing.assert_close(batch.images[row], expected_image(shards, i))


def test_empty_ids_give_empty_shaped_batch(shards: Path) -> None:
    for tokenizer in (CharTokenizer(), char_tokenize):
        batch = make_reader(shards, tokenizer, size=7).read(np.array([], dtype=np.int64))
        assert batch.images.shape == (0, 3, 7, 7) and batch.tokens.shape == (0, 24)
        assert batch.tokens.dtype == torch.int64 and batch.ids.shape == (0,) and batch.meta == []
    no_tokens = SampleReader(shards, image_transform(7, MEAN, STD)).read([1, 2])
    assert no_tokens.tokens.shape == (2, 0)


def test_out_of_range_id_raises(shards: Path) -> None:
    with pytest.raises(IndexError):
        make_reader(shards).read([0, N_SAMPLES])


def overwrite_member(shard_dir: Path, gid: int, column: int, data: bytes) -> None:
    """Corrupt sample ``gid``'s member (0 image, 1 caption) in place, after the build."""
    path, row = ShardIndex(shard_dir).locate(gid)
    offset, size = int(row[2 * column]), int(row[2 * column + 1])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data[:size].ljust(size, b"\xff"))


def test_corrupted_after_build_is_skipped_and_counted(shards: Path) -> None:
    overwrite_member(shards, 2, 0, b"\x00" * 64)  # PNG signature gone
    overwrite_member(shards, 6, 1, b"\xff\xfe")  # caption no longer UTF-8
    overwrite_member(shards, 7, 1, b" ")  # caption becomes blank
    batch = make_reader(shards).read(list(range(N_SAMPLES)))
    assert batch.skipped == {"bad_caption": 2, "corrupt_image": 1}
    assert batch.ids.tolist() == [i for i in range(N_SAMPLES) if i not in (2, 6, 7)]
    assert len(batch.captions) == len(batch.meta) == batch.images.shape[0] == batch.tokens.shape[0] == N_SAMPLES - 3


def test_truncated_shard_skips_instead_of_raising(shards: Path) -> None:
    path, row = ShardIndex(shards).locate(N_SAMPLES - 1)
    os.truncate(path, int(row[0]) + 10)  # cut inside the last sample's image
    batch = make_reader(shards).read([N_SAMPLES - 2, N_SAMPLES - 1])
    assert batch.ids.tolist() == [N_SAMPLES - 2] and batch.skipped == {"corrupt_image": 1}


def test_missing_shard_is_a_data_error(shards: Path) -> None:
    reader = make_reader(shards)
    (shards / "shard-000001.tar").unlink()
    assert reader.read([0, 1]).ids.tolist() == [0, 1]  # other shards still readable
    with pytest.raises(DataError, match="shard-000001.tar"):
        reader.read([6])


def test_reader_pickles_and_reopens(shards: Path) -> None:
    reader = make_reader(shards)
    first = reader.read([1, 8, 11])
    copy = pickle.loads(pickle.dumps(reader))
    again = copy.read([1, 8, 11])
    assert again.ids.tolist() == first.ids.tolist() and torch.equal(again.images, first.images)
    reader.close()
    assert torch.equal(reader.read([1]).images, first.images[:1])


def test_reader_with_few_open_files(shards: Path) -> None:
    reader = SampleReader(shards, image_transform(8, MEAN, STD), CharTokenizer(), max_open_files=1)
    assert reader.read(list(range(N_SAMPLES))).captions == [caption_of(i) for i in range(N_SAMPLES)]
    assert len(reader._fds) == 1


# ---------------------------------------------------------------- micro-batches


def test_split_micro_batches_and_rank_share() -> None:
    ids = np.arange(10, 33)
    chunks = split_micro_batches(ids, 7)
    assert [len(c) for c in chunks] == [7, 7, 7, 2] and np.array_equal(np.concatenate(chunks), ids)
    assert split_micro_batches(np.array([], dtype=np.int64), 4) == []
    shares = [rank_share(ids, r, 3) for r in range(3)]
    assert np.array_equal(np.sort(np.concatenate(shares)), ids)
    assert shares[1].tolist() == ids[1::3].tolist()
    with pytest.raises(ConfigError):
        split_micro_batches(ids, 0)
    with pytest.raises(ConfigError):
        rank_share(ids, 3, 3)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
        assert x.meta == y.meta and x.skipped == y.skipped and x.captions == y.captions


def test_loader_with_two_workers_matches_inline(shards: Path) -> None:
    overwrite_member(shards, 4, 0, b"broken")
    reader = make_reader(shards)
    id_lists = [np.array([9, 1, 4]), np.array([], dtype=np.int64), np.array([12]), np.arange(N_SAMPLES)]
    inline = list(MicroBatchLoader(reader, id_lists))
    assert [b.ids.tolist() for b in inline[:3]] == [[1, 9], [], [12]]
    assert inline[0].skipped == {"corrupt_image": 1}
    workers = list(MicroBatchLoader(reader, id_lists, num_workers=2))
    assert_same_batches(inline, workers)


def test_step_loader_keeps_its_workers_across_steps_and_matches_inline(shards: Path) -> None:
    overwrite_member(shards, 4, 0, b"broken")
    reader = make_reader(shards)
    steps = [[np.array([9, 1, 4]), np.array([12])], [], [np.arange(N_SAMPLES), np.array([3, 2])], [np.array([5])]]
    loader = StepLoader(reader, 2)
    pids = set()
    for id_lists in steps:
        got = list(loader.step(id_lists))
        assert_same_batches(list(MicroBatchLoader(reader, id_lists)), got)
        if id_lists:  # the same worker processes serve every step
            pids.update(w.pid for w in loader.loader._iterator._workers)
    assert len(pids) == 2
    loader.close()
    with pytest.raises(ConfigError, match="closed"):
        loader.step([np.array([1])])
    with pytest.raises(ConfigError, match="num_workers"):
        StepLoader(reader, 0)


# ---------------------------------------------------------------- sequential passes


def test_stream_dataset_matches_reader_and_skips_bad(shards: Path) -> None:
    overwrite_member(shards, 3, 0, b"broken")
    reader = make_reader(shards)
    oracle = reader.read(list(range(N_SAMPLES)))
    with pytest.warns(UserWarning, match="corrupt_image in sample 0000000003"):
        stream = list(stream_dataset(shards, image_transform(8, MEAN, STD), CharTokenizer()))
    assert [m["id"] for _, _, m in stream] == oracle.ids.tolist()
    assert torch.equal(torch.stack([t for _, t, _ in stream]), oracle.tokens)
    assert torch.equal(torch.stack([x for x, _, _ in stream]), oracle.images)
    with pytest.warns(UserWarning, match="corrupt_image"):
        captions = [c for _, c, _ in stream_dataset(shards, image_transform(8, MEAN, STD))]
    assert captions == oracle.captions


def test_read_all(shards: Path) -> None:
    images, meta = read_all(shards, image_transform(5, MEAN, STD), batch_size=4)
    assert images.shape == (N_SAMPLES, 3, 5, 5)
    assert [(m["id"], m["caption"]) for m in meta] == [(i, caption_of(i)) for i in range(N_SAMPLES)]
    torch.testing.assert_close(images[6], expected_image(shards, 6, size=5))


def test_batch_to_device(shards: Path) -> None:
    batch = make_reader(shards).read([0, 1])
    moved = batch.to("cpu", non_blocking=True)
    assert torch.equal(moved.images, batch.images) and moved.captions == batch.captions
    assert moved.tokens.dtype == torch.int64 and moved.ids.tolist() == [0, 1]


@pytest.mark.slow
def test_with_the_real_caption_tokenizer(shards: Path) -> None:
    tokenizer_module = pytest.importorskip("dpcap.data.tokenizer")
    tokenizer = tokenizer_module.CaptionTokenizer(16)
    reader = SampleReader(shards, image_transform(8, MEAN, STD), tokenizer)
    batch = reader.read([4, 2])
    assert torch.equal(batch.tokens, tokenizer([caption_of(2), caption_of(4)]))
    assert reader.read([]).tokens.shape == (0, 16)
