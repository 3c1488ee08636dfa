"""Greedy captions of a few samples of a shard folder, side by side for several captioners, and a PNG of them.

A qualitative check that sits next to the linear probes: the probe says how good the encoder's
features are, the captions show what the whole captioner learnt (a caption that names the right
emoji, or the same sentence for every image). Samples are chosen deterministically, spread evenly
over the folder's global ids, so two runs show the same images.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpcap.errors import ConfigError, DataError


@dataclass
class CaptionedSample:
    """One sample with its true caption and each captioner's greedy caption.

    ``pixels`` (H, W, 3) float in [0, 1] is the image as the first captioner saw it (its transform,
    un-normalised), kept for plotting and left out of `to_json`.
    """

    id: int
    image: str
    true: str
    captions: dict[str, str]
    pixels: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """``{"id", "image", "true", <captioner name>: caption, …}``."""
        return {"id": self.id, "image": self.image, "true": self.true, **self.captions}


def spread_ids(num_samples: int, count: int) -> list[int]:
    """``count`` ids evenly spread over ``range(num_samples)``: the centres of ``count`` equal slices."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count!r}")
    count = min(count, num_samples)
    return [(2 * i + 1) * num_samples // (2 * count) for i in range(count)]


def caption_samples(
    models: Mapping[str, nn.Module],
    shard_dir: str | os.PathLike,
    *,
    count: int = 8,
    ids: Sequence[int] | None = None,
    tokenizer: Any = None,
    image_key: str | None = None,
    device: str | torch.device = "cpu",
) -> list[CaptionedSample]:
    """Greedy captions (``model.generate``) of ``count`` samples of ``shard_dir`` from each of ``models``.

    ``ids`` (global sample ids) overrides the default choice, `spread_ids` over the folder. Each
    model reads the images through its own transform (size, mean, std), so captioners of different
    image sizes can be compared. ``tokenizer`` decodes the token rows (``tokenizer.decode``); None
    uses each model's own (context length and vocabulary of ``model.config.text``). The sample's
    ``image`` is ``meta[image_key]`` when given and present, else its id. Samples that fail to
    decode are skipped by the reader, so fewer than ``count`` may come back; none at all is an error.
    """
    from dpcap.data.reader import SampleReader, image_transform
    from dpcap.data.tokenizer import CaptionTokenizer
    from dpcap.eval.features import _transform_args

    if not models:
        raise ConfigError("caption_samples needs at least one captioner")
    reserved = {"id", "image", "true"} & set(models)
    if reserved:
        raise ConfigError(f"captioner names {sorted(reserved)} collide with the sample's own keys")
    first = None
    captions: dict[str, list[str]] = {}
    for name, model in models.items():
        size, mean, std = _transform_args(model)
        reader = SampleReader(shard_dir, image_transform(size, mean, std))
        try:
            wanted = spread_ids(len(reader), count) if ids is None else [int(i) for i in ids]
            batch = reader.read(np.asarray(wanted, dtype=np.int64))
        finally:
            reader.close()
        if len(batch) == 0:
            raise DataError(f"none of the samples {wanted} of {shard_dir} could be read ({batch.skipped})")
        decode = tokenizer or CaptionTokenizer(model.config.text.context_length, vocab=model.config.text.vocab)
        captions[name] = decode.decode(_generate(model, batch.images, device))
        if first is None:
            first = (batch, torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1))
    batch, mean, std = first
    pixels = (batch.images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [
        CaptionedSample(
            id=gid,
            image=str(meta.get(image_key, gid)) if image_key else str(gid),
            true=true,
            captions={name: rows[row] for name, rows in captions.items()},
            pixels=pixels[row],
        )
        for row, (gid, meta, true) in enumerate(zip(batch.ids.tolist(), batch.meta, batch.captions))
    ]


def _generate(model: nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``model.generate`` in eval mode without gradients; the model's train/eval mode is restored."""
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            return model.generate(images.to(device)).cpu()
    finally:
        model.train(was_training)


_IMAGE_INCHES = 2.2  # each sample's image, upscaled (nearest neighbour) to this square
_COLUMN_INCHES = 3.3  # room for a wrapped line of wide glyphs (m, w) beside the image
_FONT_POINTS = 8
_LINE_POINTS = 10.5  # one text line at 8 pt (matplotlib's 1.2 line spacing plus a little air)
_WRAP = 32  # characters per text line: ~2.4 inches of average 8 pt DejaVu Sans


def save_captions_png(
    samples: Sequence[CaptionedSample],
    path: str | os.PathLike,
    *,
    labels: Mapping[str, str] | None = None,
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """A grid of the samples: each image upscaled (nearest neighbour), its true caption and each
    captioner's under it (``labels`` maps a captioner's name to its display name). Written atomically.

    Text is laid out in points below each image and the figure is sized in inches from the longest
    wrapped caption block, so long captions never run into the next row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dpcap.eval.probe import save_figure_atomically

    if not samples:
        raise ConfigError("save_captions_png needs at least one sample")
    labels = dict(labels or {})
    lines = [("true", "true")] + [(name, labels.get(name, name)) for name in samples[0].captions]
    colours = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    blocks = [
        [textwrap.wrap(f"{label}: {_caption(sample, name)}", _WRAP) or [f"{label}:"] for name, label in lines]
        for sample in samples
    ]
    text_inches = (max(sum(len(b) for b in block) for block in blocks) * _LINE_POINTS + 6) / 72
    columns = max(1, min(columns, len(samples)))
    rows = -(-len(samples) // columns)
    head, gap = (0.6 if title else 0.3), text_inches + 0.3  # 0.3 in: the next row's image title
    height = head + rows * _IMAGE_INCHES + (rows - 1) * gap + text_inches + 0.1
    fig = Figure(figsize=(_COLUMN_INCHES * columns, height))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        rows,
        columns,
        left=0.1 / columns,
        right=1 - 0.1 / columns,
        top=1 - head / height,
        bottom=(text_inches + 0.1) / height,
        hspace=gap / _IMAGE_INCHES,
        wspace=0.1,
    )
    for k, (sample, block) in enumerate(zip(samples, blocks)):
        ax = fig.add_subplot(grid[divmod(k, columns)])
        ax.imshow(sample.pixels, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(sample.image, fontsize=_FONT_POINTS, color="dimgray")
        offset = -4.0
        for i, wrapped in enumerate(block):
            ax.annotate(
                "\n".join(wrapped),
                xy=(0, 0),
                xycoords="axes fraction",
                xytext=(0, offset),
                textcoords="offset points",
                va="top",
                ha="left",
                fontsize=_FONT_POINTS,
                color=colours[i % len(colours)],
                annotation_clip=False,
            )
            offset -= len(wrapped) * _LINE_POINTS
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.15 / height)
    with warnings.catch_warnings():
        # An untrained captioner emits arbitrary BPE tokens (Thai, CJK, …) that DejaVu Sans lacks;
        # they draw as boxes, which is the faithful picture of such a caption, not a fault to report.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        return save_figure_atomically(fig, Path(path))


def _caption(sample: CaptionedSample, name: str) -> str:
    return sample.true if name == "true" else sample.captions.get(name, "")
