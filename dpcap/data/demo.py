"""The offline emoji data set: real images with real captions, built without any network access.

Images are the Noto Color Emoji glyphs (Debian ``fonts-noto-color-emoji``) rendered with Pillow; names,
groups and subgroups come from Unicode's ``emoji-test.txt`` (Debian ``unicode-data``). Each
fully-qualified emoji gives one pair: the image and the caption ``"an emoji of {name}"`` with the name
as the file spells it (e.g. ``"an emoji of waving hand: medium skin tone"``). About 3,655 pairs.

The split (train/val/test, 70/15/15) is a hash of ``(seed, base)`` where ``base`` is the name without
skin-tone qualifiers, so all skin-tone variants of one emoji fall on the same side of every split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpcap.errors import ConfigError, DataError

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",
)
EMOJI_TEST_CANDIDATES = ("/usr/share/unicode/emoji/emoji-test.txt", "/usr/share/unicode-data/emoji/emoji-test.txt")
FONT_SIZE = 109  # the only size of the font's embedded colour bitmaps (CBDT)
CANVAS = (136, 128)
SPLITS = (("train", 0.70), ("val", 0.85), ("test", 1.0))
_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+(?:\.\d+)?\s+(.+?)\s*$")


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified line of ``emoji-test.txt``."""

    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def slug(self) -> str:
        return "-".join(f"{c:x}" for c in self.codepoints)


def _first_existing(candidates: tuple[str, ...], what: str, package: str) -> Path:
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    raise DataError(f"{what} not found at {candidates[0]}: install the Debian package {package} (`make` does)")


def emoji_font_path() -> Path:
    """Path of NotoColorEmoji.ttf; DataError naming ``fonts-noto-color-emoji`` when absent."""
    return _first_existing(FONT_CANDIDATES, "the Noto Color Emoji font", "fonts-noto-color-emoji")


def emoji_test_path() -> Path:
    """Path of Unicode's emoji-test.txt; DataError naming ``unicode-data`` when absent."""
    return _first_existing(EMOJI_TEST_CANDIDATES, "emoji-test.txt", "unicode-data")


def parse_emoji_test(path: str | os.PathLike) -> list[EmojiEntry]:
    """The fully-qualified entries of ``emoji-test.txt``, in file order, with their group and subgroup."""
    entries, group, subgroup = [], "", ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := _LINE.match(line):
            codepoints = tuple(int(c, 16) for c in match.group(1).split())
            entries.append(EmojiEntry(codepoints, match.group(2), group, subgroup))
    return entries


def base_name(name: str) -> str:
    """The name without skin-tone qualifiers: ``"kiss: woman, man, dark skin tone"`` → ``"kiss: woman, man"``."""
    head, sep, tail = name.partition(": ")
    if not sep:
        return name
    kept = [part for part in tail.split(", ") if not part.endswith("skin tone")]
    return f"{head}: {', '.join(kept)}" if kept else head


def split_of(base: str, seed: int) -> str:
    """train/val/test (70/15/15) from the first 8 bytes of SHA-256(seed, base) read as a fraction of 2^64."""
    digest = hashlib.sha256(f"{seed}\0{base}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return next(name for name, upper in SPLITS if u < upper)


def render_emoji(text: str, font: Any, image_size: int) -> Any | None:
    """RGB image of one emoji (glyph cropped to a centred square on white), or None if nothing is drawn."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    rgb = square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    return None if rgb.getextrema() == ((255, 255),) * 3 else rgb


def _select(entries: list[EmojiEntry], limit: int | None) -> list[EmojiEntry]:
    """All entries, or ``limit`` of them evenly spread over the file (so every group is represented)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    if limit is None or limit >= len(entries):
        return entries
    return [entries[(i * len(entries)) // limit] for i in range(limit)]


def _rows(entries: list[EmojiEntry], out: Path, image_size: int, seed: int, stats: Counter) -> Iterator[dict]:
    from PIL import ImageFont

    font = ImageFont.truetype(str(emoji_font_path()), size=FONT_SIZE)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for entry in entries:
        image = render_emoji(entry.text, font, image_size)
        if image is None:
            stats["blank"] += 1
            continue
        rel = f"images/{entry.slug}.png"
        tmp = out / f"images/.{entry.slug}.png.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, out / rel)
        stats["rendered"] += 1
        base = base_name(entry.name)
        yield {
            "image": rel,
            "caption": f"an emoji of {entry.name}",
            "name": entry.name,
            "group": entry.group,
            "subgroup": entry.subgroup,
            "base": base,
            "split": split_of(base, seed),
            "codepoints": entry.slug,
        }


def build_emoji_source(
    out_dir: str | os.PathLike, *, image_size: int = 64, seed: int = 0, limit: int | None = None
) -> Path:
    """Render the emoji into ``out_dir/images/`` and write ``out_dir/manifest.jsonl``; return its path.

    Blank renders are skipped; counts go to ``out_dir/emoji_stats.json``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    out = Path(out_dir)
    entries = _select(parse_emoji_test(emoji_test_path()), limit)
    stats: Counter[str] = Counter(rendered=0, blank=0)
    rows = list(_rows(entries, out, image_size, seed, stats))
    manifest = out / "manifest.jsonl"
    _write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {**stats, "splits": dict(Counter(r["split"] for r in rows)), "groups": len({r["group"] for r in rows})}
    _write_text(out / "emoji_stats.json", json.dumps(summary, indent=1))
    return manifest


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Source in ``out_dir/source`` and one shard folder per split (``out_dir/train``, ``val``, ``test``)."""
    from dpcap.data.build import build_shards

    manifest = build_emoji_source(Path(out_dir) / "source", image_size=image_size, seed=seed, limit=limit)
    result: dict[str, Any] = {"source": str(manifest)}
    for split, _ in SPLITS:
        result[split] = build_shards(
            manifest,
            Path(out_dir) / split,
            samples_per_shard=samples_per_shard,
            where={"split": split},
            overwrite=overwrite,
            progress=False,
        )
    return result


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
