"""Existing WebDataset shards: `dpcap data index` throughput, and the Poisson reader against webdataset's stream.

Shards are written by ``webdataset.TarWriter`` in img2dataset's layout (``00000.tar``: ``<key>.jpg``,
``<key>.txt``, ``<key>.json``; JPEGs of random-noise images, so the bytes per sample are realistic for
their pixel count). Measured side by side in one run, page cache warm (every shard is read once first):

* indexing: samples/s of `build_wds_index` at 1 and 2 workers, and of ``tar tf`` over the same shards
  (reading headers only is the floor for any indexer);
* reading: samples/s of the training reader (`PoissonSampler` draws at rate q, `MicroBatchLoader` over
  an in-place index, DataLoader workers 0, 2, 4 kept for the whole run as `train` does it),
  against webdataset's own sequential stream of the same shards (``WebDataset(...).decode("pil")``,
  same workers), both decoding JPEG and applying the same transform. Goal: ratio ≥ 1.2.

Prints one JSON object (and writes it with ``--out``), with the index size per sample and an
extrapolation to DP-Cap's step (1,310,720 samples out of 233,804,767 over 128 GPUs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpcap.data.layout import WDS_ROW_DTYPE
from dpcap.data.reader import MicroBatchLoader, SampleReader, StepLoader, image_transform, split_micro_batches
from dpcap.data.sampler import PoissonSampler
from dpcap.data.wds_index import build_wds_index

DPCAP_N, DPCAP_BATCH, DPCAP_GPUS = 233_804_767, 1_310_720, 128


def write_shards(folder: Path, shards: int, per_shard: int, pixels: int) -> int:
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar"), mtime=0) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (pixels, pixels, 3), dtype=np.uint8)).save(buf, "JPEG")
                meta = {"key": key, "status": "success", "width": pixels, "height": pixels}
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"a photo {key}", "json": json.dumps(meta)})
    return shards * per_shard


def time_index(src: Path, out: Path, workers: int, samples: int) -> float:
    started = time.perf_counter()
    build_wds_index([str(src)], out, workers=workers, progress=False)
    return samples / (time.perf_counter() - started)


def time_tar_tf(src: Path, samples: int) -> float:
    started = time.perf_counter()
    for tar in sorted(src.glob("*.tar")):
        subprocess.run(["tar", "tf", str(tar)], check=True, stdout=subprocess.DEVNULL)
    return samples / (time.perf_counter() - started)


def time_poisson(index: Path, q: float, steps: int, workers: int, micro: int, transform) -> float:
    reader = SampleReader(index, transform)
    sampler = PoissonSampler(len(reader), q, seed=1)
    loader = StepLoader(reader, workers) if workers else None  # as `train` reads: one worker pool a run
    read, started = 0, time.perf_counter()
    for step in range(steps):
        micro_batches = split_micro_batches(sampler.indices(step), micro)
        for batch in loader.step(micro_batches) if loader else MicroBatchLoader(reader, micro_batches):
            read += len(batch)
    seconds = time.perf_counter() - started
    if loader:
        loader.close()
    return read / seconds


def time_stream(src: Path, limit: int, workers: int, micro: int, transform) -> float:
    import webdataset as wds

    urls = [str(p) for p in sorted(src.glob("*.tar"))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda t: t)
        .batched(micro, collation_fn=lambda rows: torch.stack([r[0] for r in rows]))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    read, started = 0, time.perf_counter()
    for images in loader:
        read += len(images)
        if read >= limit:
            break
    return read / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--pixels", type=int, default=64, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="side after the transform")
    parser.add_argument("--sample-rate", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = image_transform(args.image_size, (0.5,) * 3, (0.5,) * 3)
    with tempfile.TemporaryDirectory() as tmp:
        src, index = Path(tmp) / "wds", Path(tmp) / "index"
        samples = write_shards(src, args.shards, args.per_shard, args.pixels)
        tar_bytes = sum(p.stat().st_size for p in src.glob("*.tar"))
        time_tar_tf(src, samples)  # warm the page cache
        indexing = {
            "tar_tf_samples_per_s": time_tar_tf(src, samples),
            **{f"index_workers{w}_samples_per_s": time_index(src, Path(f"{index}{w}"), w, samples) for w in (1, 2)},
        }
        index = Path(f"{index}1")
        index_bytes = sum(p.stat().st_size for p in index.glob("*.idx"))
        reading = {}
        for w in args.workers:
            poisson = time_poisson(index, args.sample_rate, args.steps, w, args.micro_batch, transform)
            stream = time_stream(src, int(samples * args.sample_rate * args.steps), w, args.micro_batch, transform)
            reading[f"workers{w}"] = {
                "poisson_samples_per_s": poisson,
                "stream_samples_per_s": stream,
                "ratio": poisson / stream,
            }
    per_rank = DPCAP_BATCH / DPCAP_GPUS
    best = max(r["poisson_samples_per_s"] for r in reading.values())
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "setup": vars(args) | {"samples": samples, "bytes_per_sample": tar_bytes / samples},
        "indexing": indexing
        | {
            "index_workers2_over_1": indexing["index_workers2_samples_per_s"] / indexing["index_workers1_samples_per_s"]
        },
        "index_bytes_per_sample": index_bytes / samples,
        "row_bytes": WDS_ROW_DTYPE.itemsize,
        "reading": reading,
        "dpcap_extrapolation": {
            "index_bytes_total": DPCAP_N * WDS_ROW_DTYPE.itemsize,
            "samples_per_rank_per_step": per_rank,
            "seconds_per_step_per_rank_at_best_measured_rate": per_rank / best,
            "indexing_cpu_hours_at_1_worker": DPCAP_N / indexing["index_workers1_samples_per_s"] / 3600,
        },
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
