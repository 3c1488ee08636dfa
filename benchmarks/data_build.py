"""`dpcap data build` throughput at 1 and 2 workers, and its memory against the size of the source folder.

The source is a folder of ``--folders`` sub-folders (as an img2dataset or ImageNet download is laid
out) of ``--per-folder`` JPEGs (random noise, ``--pixels`` px) with same-stem ``.txt`` captions. Builds
with 1 and 2 workers alternate (``--rounds`` each, medians reported) so machine noise hits both
alike. Memory: the peak of Python allocations (tracemalloc) of a one-worker build of the first
sub-folder alone and of the whole source: a streaming build holds one folder's listing at a time,
so the two peaks are close however many folders there are.

Prints one JSON object (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from dpcap.data.build import build_shards


def write_source(root: Path, folders: int, per_folder: int, pixels: int) -> int:
    rng = np.random.default_rng(0)
    for f in range(folders):
        folder = root / f"{f:05d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (pixels, pixels, 3), dtype=np.uint8)).save(buf, "JPEG")
            (folder / f"{f:05d}{i:04d}.jpg").write_bytes(buf.getvalue())
            (folder / f"{f:05d}{i:04d}.txt").write_text(f"a photo number {i} of folder {f}")
    return folders * per_folder


def time_build(src: Path, out: Path, workers: int) -> float:
    started = time.perf_counter()
    build_shards(src, out, workers=workers, overwrite=True, progress=False)
    return time.perf_counter() - started


def peak_bytes(src: Path, out: Path) -> int:
    tracemalloc.start()
    build_shards(src, out, overwrite=True, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folders", type=int, default=8)
    parser.add_argument("--per-folder", type=int, default=500)
    parser.add_argument("--pixels", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        samples = write_source(src, args.folders, args.per_folder, args.pixels)
        time_build(src, out, 1)  # warm the page cache and the imports
        seconds: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                seconds[workers].append(time_build(src, out, workers))
        memory = {"one_folder": peak_bytes(src / "00000", out), "whole_source": peak_bytes(src, out)}
    rate = {w: samples / statistics.median(s) for w, s in seconds.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": vars(args) | {"samples": samples},
        "build_workers1_samples_per_s": rate[1],
        "build_workers2_samples_per_s": rate[2],
        "workers2_over_1": rate[2] / rate[1],
        "seconds_all": {str(w): s for w, s in seconds.items()},
        "peak_python_bytes": memory,
        "peak_whole_over_one_folder": memory["whole_source"] / memory["one_folder"],
        "cpu_ms_per_sample_workers1": 1000 / rate[1],
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
