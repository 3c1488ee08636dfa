"""Chunked, resumable, cached feature extraction (and its split over ranks); oracle: an uncached run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dpcap.data.build import build_shards
from dpcap.errors import ConfigError
from dpcap.eval.features import imagefolder_features, labelled_features
from dpcap.model import create_captioner
from dpcap.train.world import World

GROUPS = ("animal", "food", "flag")
REPO = Path(__file__).resolve().parents[2]
MODEL_KWARGS = dict(image_size=16, patch_size=8, vision_layers=1, text_layers=1)


class Killed(RuntimeError):
    """The fake kill: raised from inside the model's forward."""


def make_model(seed: int = 0) -> torch.nn.Module:
    return create_captioner("nano", seed=seed, **MODEL_KWARGS)


def count_forwards(model: torch.nn.Module, kill_at: int | None = None) -> list[int]:
    """Wrap ``model.encode_image``: each call appends its batch size; call number ``kill_at`` raises."""
    calls: list[int] = []
    real = type(model).encode_image.__get__(model)

    def encode_image(images, **kwargs):
        if kill_at is not None and len(calls) + 1 == kill_at:
            raise Killed(f"killed in forward {kill_at}")
        calls.append(int(images.shape[0]))
        return real(images, **kwargs)

    model.encode_image = encode_image
    return calls


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 random 20×24 PNGs with group/split labels, built into 2 shards."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"picture number {i}")
        (src / f"img{i}.json").write_text(json.dumps({"group": GROUPS[i % 3], "split": "test" if i >= 6 else "train"}))
    out = tmp_path_factory.mktemp("shards") / "ds"
    assert build_shards(src, out, samples_per_shard=5)["written"] == 9
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree: 2 classes × 4 random images."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(4):
            image = rng.integers(0, 256, size=(18, 18, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{name}{i}.png")
    return root


def assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["features"], b["features"])
    assert a["labels"] == b["labels"] and a["split"] == b["split"] and torch.equal(a["ids"], b["ids"])


def test_killed_extraction_resumes_from_finished_chunks(shards: Path, tmp_path: Path) -> None:
    options = dict(label_key="group", chunk_size=4, batch_size=2)  # chunks 0–4, 4–8, 8–9: 2 + 2 + 1 forwards
    reference = labelled_features(make_model(), shards, **options)
    assert reference["features"].shape == (9, 128) and reference["ids"].tolist() == list(range(9))

    cache = tmp_path / "cache"
    killed = make_model()
    calls = count_forwards(killed, kill_at=5)  # dies in the third chunk's forward, two chunks written
    with pytest.raises(Killed):
        labelled_features(killed, shards, cache_dir=cache, **options)
    assert calls == [2, 2, 2, 2]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(
        f.endswith(("-00000-of-00003.safetensors", "-00001-of-00003.safetensors")) for f in files
    )

    resumed = make_model()
    calls = count_forwards(resumed)
    result = labelled_features(resumed, shards, cache_dir=cache, **options)
    assert calls == [1]  # only the missing chunk (row 8) is computed
    assert_same(result, reference)
    assert len(list(cache.glob("features-*.safetensors"))) == 3 and not list(cache.glob(".*"))

    again = make_model()
    calls = count_forwards(again)
    assert_same(labelled_features(again, shards, cache_dir=cache, **options), reference)
    assert calls == []  # all three chunks loaded


def test_chunk_files_hold_rows_ids_labels_and_metadata(shards: Path, tmp_path: Path) -> None:
    labelled_features(make_model(), shards, label_key="group", chunk_size=4, batch_size=3, cache_dir=tmp_path)
    paths = sorted(tmp_path.glob("features-*.safetensors"))
    assert [p.name[-27:] for p in paths] == [f"-{i:05d}-of-00003.safetensors" for i in range(3)]
    keys = set()
    for i, (path, (start, stop)) in enumerate(zip(paths, [(0, 4), (4, 8), (8, 9)])):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        keys.add(meta["fingerprint"])
        assert path.name.startswith(f"features-{meta['fingerprint'][:32]}-")
        assert meta["chunk"] == str(i) and meta["chunks"] == "3" and meta["precision"] == "float32"
        assert (meta["start"], meta["stop"], meta["rows"]) == (str(start), str(stop), str(stop - start))
        tensors = load_file(path)
        assert set(tensors) == {"features", "ids", "label_ids", "label_names", "split_ids", "split_names"}
        assert tensors["ids"].tolist() == list(range(start, stop)) and tensors["features"].shape == (stop - start, 128)
    assert len(keys) == 1


def test_changed_key_or_chunking_recomputes(shards: Path, tmp_path: Path) -> None:
    options = dict(label_key="group", batch_size=2, cache_dir=tmp_path)
    first = labelled_features(make_model(), shards, chunk_size=4, **options)
    # Same key, other chunk size: the files of the same names (3 chunks either way) hold other rows.
    model = make_model()
    calls = count_forwards(model)
    rechunked = labelled_features(model, shards, chunk_size=3, **options)
    assert calls == [2, 1] * 3
    assert rechunked["labels"] == first["labels"] and torch.equal(rechunked["ids"], first["ids"])
    torch.testing.assert_close(rechunked["features"], first["features"])  # other batches: float rounding
    # Another pool, and other weights: other keys, computed in full, beside the first key's files.
    for other, pool in ((make_model(), "cls"), (make_model(seed=1), "mean")):
        calls = count_forwards(other)
        result = labelled_features(other, shards, chunk_size=3, pool=pool, **options)
        assert sum(calls) == 9 and not torch.equal(result["features"], first["features"])
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 9
    # A damaged chunk is recomputed, alone.
    damaged = sorted(tmp_path.glob("features-*-00001-of-00003.safetensors"))
    for path in damaged:
        path.write_bytes(b"not safetensors")
    model = make_model()
    calls = count_forwards(model)
    assert_same(labelled_features(model, shards, chunk_size=3, **options), rechunked)
    assert calls == [2, 1]


def test_imagefolder_resumes_and_matches_uncached(tree: Path, tmp_path: Path) -> None:
    options = dict(chunk_size=3, batch_size=2)  # 8 images: chunks 0–3, 3–6, 6–8
    reference = imagefolder_features(make_model(), tree, **options)
    assert reference["labels"] == ["cat"] * 4 + ["dog"] * 4
    killed = make_model()
    calls = count_forwards(killed, kill_at=3)  # dies at the start of the second chunk
    with pytest.raises(Killed):
        imagefolder_features(killed, tree, cache_dir=tmp_path, **options)
    assert len(list(tmp_path.glob("imagefolder-*.safetensors"))) == 1
    resumed = make_model()
    calls = count_forwards(resumed)
    result = imagefolder_features(resumed, tree, cache_dir=tmp_path, **options)
    assert calls == [2, 1, 2]
    assert torch.equal(result["features"], reference["features"]) and result["labels"] == reference["labels"]
    assert result["files"] == reference["files"]


def test_progress_bar_on_stderr_only_when_asked(shards: Path, capsys: pytest.CaptureFixture) -> None:
    labelled_features(make_model(), shards, label_key="group", chunk_size=4)
    assert capsys.readouterr().err == ""
    labelled_features(make_model(), shards, label_key="group", chunk_size=4, progress=True, desc="train features")
    captured = capsys.readouterr()
    assert "train features" in captured.err and "/9 " in captured.err and "img/s" in captured.err
    assert captured.out == ""


def test_bf16_autocast_is_optional_and_returns_float32(shards: Path) -> None:
    exact = labelled_features(make_model(), shards, label_key="group")
    # bf16 autocast on the CPU (the CUDA default): float32 out, close to the float32 features
    cast = labelled_features(make_model(), shards, label_key="group", autocast=True)
    assert cast["features"].dtype == torch.float32
    torch.testing.assert_close(cast["features"], exact["features"], rtol=0.1, atol=0.1)


def test_distributed_needs_a_cache_folder(shards: Path) -> None:
    with pytest.raises(ConfigError, match="--cache"):
        labelled_features(make_model(), shards, label_key="group", world=World(rank=0, world_size=2))


def test_positive_chunk_size(shards: Path) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        labelled_features(make_model(), shards, label_key="group", chunk_size=0)


RANK_SCRIPT = """
import json, sys
import torch
from dpcap.eval.features import labelled_features
from dpcap.model import create_captioner
from dpcap.train.world import detect_world, init_distributed

torch.set_num_threads(1)
shards, cache, out = sys.argv[1:4]
world = detect_world()
init_distributed(world, backend="gloo")
model = create_captioner("nano", seed=0, **json.loads(sys.argv[4]))
calls = []
real = model.encode_image
def encode_image(images, **kwargs):
    calls.append(int(images.shape[0]))
    return real(images, **kwargs)
model.encode_image = encode_image
result = labelled_features(model, shards, label_key="group", cache_dir=cache, chunk_size=4, batch_size=2)
torch.save({**result, "calls": calls, "rank": world.rank}, out)
"""


def rank_env(rank: int, world_size: int, port: str) -> dict[str, str]:
    """The environment torchrun gives a rank (one thread each, this checkout on the path)."""
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_split_the_chunks_and_gather_through_the_cache(shards: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): the same reduction order, bit for bit
    try:
        reference = labelled_features(make_model(), shards, label_key="group", chunk_size=4, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, port)
        argv = [sys.executable, "-c", RANK_SCRIPT, str(shards), str(tmp_path / "cache"), str(tmp_path / f"{rank}.pt")]
        procs.append(subprocess.Popen([*argv, json.dumps(MODEL_KWARGS)], env=env, cwd=REPO, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0]["calls"] == [2, 2, 1]  # chunks 0 and 2 (rows 0–4, 8–9)
    assert results[1]["calls"] == [2, 2]  # chunk 1 (rows 4–8)
    for result in results:
        assert_same(result, reference)
    assert len(list((tmp_path / "cache").glob("features-*-of-00003.safetensors"))) == 3


def test_probe_and_fewshot_cli_cache_workers_batch_size(tree: Path, tmp_path: Path, capsys) -> None:
    from dpcap.cli import main

    cache = tmp_path / "cache"
    data = ["--train", str(tree), "--test", str(tree)]
    extraction = ["--cache", str(cache), "--batch-size", "3", "--workers", "1", "--device", "cpu"]
    assert main(["probe", "random:nano", *data, *extraction, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_test"] == 8
    (chunk,) = cache.glob("imagefolder-*-00000-of-00001.safetensors")  # train and test: one key, one file
    stamp = chunk.stat().st_mtime_ns
    assert main(["fewshot", "random:nano", *data, *extraction, "--shots", "1", "--seeds", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert "train features" in captured.err  # the CLI shows the extraction's bar
    assert chunk.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1  # read, not rewritten


@pytest.mark.slow
def test_two_rank_probe_fits_once_on_rank_0(tree: Path, tmp_path: Path) -> None:
    """`dpcap probe` under a 2-rank launch: both ranks extract (through the shared cache), only rank 0
    fits and prints the report; rank 1 prints nothing on stdout."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, port)
        argv = [sys.executable, "-m", "dpcap", "probe", "random:nano", "--train", str(tree), "--test", str(tree)]
        argv += ["--cache", str(tmp_path / "cache"), "--device", "cpu", "--json"]
        procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        outputs.append((out.decode(), err.decode()))
    report = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert report["num_test"] == 8 and report["fit_device"] == "cpu" and 0.0 <= report["top1"] <= 1.0
    assert outputs[1][0] == "" and "rank 1: features extracted; rank 0 fits" in outputs[1][1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_and_fewshot_fit_on_the_gpu_like_on_the_cpu(tree: Path) -> None:
    from dpcap.pipeline import fewshot_encoder, probe_encoder

    data = dict(train_dir=str(tree), test_dir=str(tree))
    cpu = probe_encoder("random:nano", device="cpu", **data)
    gpu = probe_encoder("random:nano", device="auto", **data)
    assert cpu["fit_device"] == "cpu" and gpu["fit_device"].startswith("cuda")
    assert abs(gpu["top1"] - cpu["top1"]) <= 1 / 8  # bf16 features on the GPU: at most one image flips
    shots = fewshot_encoder("random:nano", device="cuda", label=None, shots=(1,), seeds=(0,), **data)
    assert shots["fit_device"].startswith("cuda") and 0.0 <= shots["shots"][1]["mean"] <= 1.0
