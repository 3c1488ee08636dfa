"""Synthetic WebDataset shards for smoke runs: random JPEGs with English captions, written by
``webdataset.TarWriter`` (the tool LAION-style pipelines use), so the result is indexed in place with
``dpcap data index`` exactly as a user's own shards would be.

    python benchmarks/synthetic_shards.py OUT_DIR --samples 2048 --per-shard 512 --image-size 64
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

WORDS = ("a", "red", "small", "dog", "cat", "house", "on", "the", "beach", "tree", "with", "two", "blue", "car")


def write_shards(out: Path, samples: int, per_shard: int, image_size: int, seed: int = 0) -> list[Path]:
    """``samples`` pairs in shards of ``per_shard``: ``{key}.jpg``, ``{key}.txt`` and ``{key}.json``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range((samples + per_shard - 1) // per_shard):
        path = out / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
                sink.write({"__key__": f"{i:09d}", "jpg": jpeg.getvalue(), "txt": caption,
                            "json": json.dumps({"caption": caption, "label": int(i % 10)})})  # fmt: skip
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--per-shard", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.samples, args.per_shard, args.image_size) < 1:
        parser.error("--samples, --per-shard and --image-size must be >= 1")
    paths = write_shards(args.out, args.samples, args.per_shard, args.image_size, args.seed)
    print(json.dumps({"out": str(args.out), "shards": len(paths), "samples": args.samples}))


if __name__ == "__main__":
    main()
