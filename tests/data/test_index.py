"""ShardIndex: id → (shard, offsets), checked against tarfile extraction; errors name the file."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpcap.data.build import build_shards
from dpcap.data.index import ShardIndex
from dpcap.data.sampler import PoissonSampler
from dpcap.errors import DataError
from tests.data.test_build import make_folder_source, read_tar_samples

N_SAMPLES = 11


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    good = {f"s{i:02d}": ("PNG", f"caption number {i}") for i in range(N_SAMPLES)}
    build_shards(make_folder_source(tmp_path / "src", good, bad=False), tmp_path / "out", samples_per_shard=4)
    return tmp_path / "out"


def oracle_captions(shard_dir: Path) -> list[tuple[Path, bytes]]:
    """(shard path, caption bytes) of every sample in global order, read with tarfile."""
    return [(p, d["txt"]) for p in sorted(shard_dir.glob("*.tar")) for _, d, _ in read_tar_samples(p)]


def test_len_and_locate_match_tarfile(shards: Path) -> None:
    index = ShardIndex(shards)
    assert len(index) == N_SAMPLES and index.num_shards == 3
    for gid, (path, caption) in enumerate(oracle_captions(shards)):
        shard, row = index.locate(gid)
        assert shard == path and row.dtype == np.uint64 and row.shape == (6,)
        assert path.read_bytes()[int(row[2]) : int(row[2] + row[3])] == caption


def test_locate_many_groups_by_shard_in_order(shards: Path) -> None:
    index = ShardIndex(shards)
    ids = [10, 0, 5, 3, 4, 9]
    groups = index.locate_many(ids)
    assert [g.shard for g in groups] == [0, 1, 2]
    assert [g.ids.tolist() for g in groups] == [[0, 3], [4, 5], [9, 10]]
    for g in groups:
        assert all(np.array_equal(row, index.locate(int(i))[1]) for i, row in zip(g.ids, g.rows))
        assert np.all(np.diff(g.rows[:, 0].astype(np.int64)) > 0)  # offset order
    assert index.locate_many([]) == []


@pytest.mark.parametrize("bad", [-1, N_SAMPLES, 10**12])
def test_out_of_range_ids(shards: Path, bad: int) -> None:
    index = ShardIndex(shards)
    with pytest.raises(IndexError, match=str(bad)):
        index.locate(bad)
    with pytest.raises(IndexError):
        index.locate_many([0, bad])


def test_missing_files_are_named(shards: Path) -> None:
    (shards / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match="shard-000002.tar"):
        ShardIndex(shards)
    (shards / "shard-000001.idx").unlink()
    with pytest.raises(DataError, match="shard-000001.idx"):
        ShardIndex(shards)
    (shards / "sizes.json").unlink()
    with pytest.raises(DataError, match="sizes.json"):
        ShardIndex(shards)


def test_a_shard_folder_may_look_like_a_tar_or_a_pattern(shards: Path, tmp_path: Path) -> None:
    for name in ("set.tar", "set-{a,b}"):
        renamed = shards.rename(tmp_path / name)
        assert len(ShardIndex(renamed)) == N_SAMPLES
        shards = renamed


def test_a_file_is_not_a_shard_folder(shards: Path) -> None:
    with pytest.raises(DataError, match="is a file, not a shard folder: give a folder written by `dpcap data build`"):
        ShardIndex(shards / "sizes.json")


def test_inconsistent_sizes_are_rejected(shards: Path) -> None:
    sizes = json.loads((shards / "sizes.json").read_text())
    (shards / "sizes.json").write_text(json.dumps({**sizes, "shard-000000.tar": 5}))
    with pytest.raises(DataError, match="shard-000000.idx"):
        ShardIndex(shards)
    (shards / "sizes.json").write_text(json.dumps({"shard-000000.tar": -1}))
    with pytest.raises(DataError, match="bad entry"):
        ShardIndex(shards)
    (shards / "sizes.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        ShardIndex(shards)


def test_small_map_cache_and_pickle(shards: Path) -> None:
    index = ShardIndex(shards, max_open=1)
    expected = [index.locate(i)[1] for i in range(N_SAMPLES)]
    assert len(index._maps) == 1
    copy = pickle.loads(pickle.dumps(index))
    assert len(copy._maps) == 0
    assert all(np.array_equal(copy.locate(i)[1], row) for i, row in enumerate(expected))


def test_importing_the_data_layer_is_light() -> None:
    code = (
        "import sys, dpcap.data\n"
        "from dpcap.data import PoissonSampler, ShardIndex, build_shards\n"
        "print(sorted(m for m in ('torch', 'webdataset', 'open_clip') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    import dpcap.data

    assert dpcap.data.PoissonSampler is PoissonSampler and "SampleReader" in dir(dpcap.data)
    with pytest.raises(AttributeError):
        _ = dpcap.data.no_such_name
