"""The data layer: shards with a member index, Poisson sampling, random-access reading, the emoji demo.

Names are imported lazily (PEP 562), so ``import dpcap.data`` loads neither torch nor webdataset;
``from dpcap.data import PoissonSampler`` loads only numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_shards": "build",
    "dataset_stats": "build",
    "ShardIndex": "index",
    "PoissonSampler": "sampler",
    "Batch": "reader",
    "ImageTransform": "reader",
    "image_transform": "reader",
    "SampleReader": "reader",
    "MicroBatchLoader": "reader",
    "split_micro_batches": "reader",
    "rank_share": "reader",
    "stream_dataset": "reader",
    "read_all": "reader",
    "build_emoji_source": "demo",
    "build_emoji_dataset": "demo",
    "emoji_font_path": "demo",
    "emoji_test_path": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
