"""The registry of named captioner sizes (``nano`` … ``large``), and the captioner and tokenizer of a size.

Sizes are registered by decorated functions, as timm's ``@register_model``; each returns a frozen
`CaptionerConfig` (``dpcap.model.configs``) made of one dataclass per tower, as open_clip's
``CLIPVisionCfg``/``CLIPTextCfg``.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator

import torch

from dpcap.data.tokenizer import CaptionTokenizer
from dpcap.errors import ConfigError
from dpcap.model.captioner import Captioner
from dpcap.model.configs import CaptionerConfig, TextConfig, VisionConfig


class SizeRegistry:
    """Named sizes, filled by the `register` decorator at import and read-only afterwards."""

    def __init__(self) -> None:
        self._builders: dict[str, Callable[[], CaptionerConfig]] = {}

    def register(self, fn: Callable[[], CaptionerConfig]) -> Callable[[], CaptionerConfig]:
        """Register `fn` under its function name (decorator)."""
        if fn.__name__ in self._builders:
            raise ValueError(f"size {fn.__name__!r} registered twice")
        self._builders[fn.__name__] = fn
        return fn

    def names(self) -> list[str]:
        """Registered size names, in registration order (smallest first)."""
        return list(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def config(self, name: str) -> CaptionerConfig:
        """The config of size `name`; ConfigError listing the valid names otherwise."""
        if name not in self._builders:
            raise ConfigError(f"unknown model size {name!r}; valid sizes: {', '.join(self._builders)}")
        return self._builders[name]()


SIZES = SizeRegistry()


@SIZES.register
def nano() -> CaptionerConfig:
    """CPU demo size: 32 px images, 4×4 patches, 4-layer ViT and 2-layer decoder, width 128."""
    return CaptionerConfig("nano", VisionConfig(32, 4, 128, 4, 4), TextConfig(32, 128, 2, 4))


@SIZES.register
def tiny() -> CaptionerConfig:
    """64 px, patch 8, 6-layer ViT of width 192; 2-layer decoder."""
    return CaptionerConfig("tiny", VisionConfig(64, 8, 192, 6, 3), TextConfig(32, 192, 2, 3))


@SIZES.register
def small() -> CaptionerConfig:
    """ViT-S/16 at 224 px; 6-layer decoder of width 384, 40 tokens."""
    return CaptionerConfig("small", VisionConfig(224, 16, 384, 12, 6), TextConfig(40, 384, 6, 6))


@SIZES.register
def base() -> CaptionerConfig:
    """DP-Cap: ViT-B/16 at 224 px; 6-layer decoder of width 768 (FFN 3072), 40 tokens."""
    return CaptionerConfig("base", VisionConfig(224, 16, 768, 12, 12), TextConfig(40, 768, 6, 12))


@SIZES.register
def large() -> CaptionerConfig:
    """ViT-L/16 at 224 px; 6-layer decoder of width 1024, 40 tokens."""
    return CaptionerConfig("large", VisionConfig(224, 16, 1024, 24, 16), TextConfig(40, 1024, 6, 16))


# flat override key -> (section, field, expected type)
_OVERRIDES: dict[str, tuple[str, str, type]] = {
    "image_size": ("vision", "image_size", int),
    "patch_size": ("vision", "patch_size", int),
    "vision_width": ("vision", "width", int),
    "vision_layers": ("vision", "layers", int),
    "vision_heads": ("vision", "heads", int),
    "text_width": ("text", "width", int),
    "text_layers": ("text", "layers", int),
    "text_heads": ("text", "heads", int),
    "context_length": ("text", "context_length", int),
    "vocab": ("text", "vocab", str),
    "mlp_ratio": ("both", "mlp_ratio", float),
    "bias": ("top", "bias", bool),
}


def _typed(key: str, value: object, kind: type) -> object:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise ConfigError(f"model override {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")


def list_sizes() -> list[str]:
    """Names of the registered sizes, smallest first."""
    return SIZES.names()


def get_config(name: str, **overrides: object) -> CaptionerConfig:
    """Config of size `name` with flat `overrides` (see the keys of ``_OVERRIDES``) applied and re-validated."""
    cfg = SIZES.config(name)
    vision: dict[str, object] = {}
    text: dict[str, object] = {}
    top: dict[str, object] = {}
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            raise ConfigError(f"unknown model override {key!r}; valid keys: {', '.join(_OVERRIDES)}")
        section, field, kind = _OVERRIDES[key]
        value = _typed(key, value, kind)
        targets = {"vision": (vision,), "text": (text,), "both": (vision, text), "top": (top,)}[section]
        for target in targets:
            target[field] = value
    if "vocab" in text:  # the head and embedding follow the vocabulary
        text["vocab_size"] = None
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, **vision),
        text=dataclasses.replace(cfg.text, **text),
        **top,
    )


def create_captioner(name: str, *, seed: int | None = None, **overrides: object) -> Captioner:
    """Build the captioner of size `name` (with `overrides`, see `get_config`) on the CPU.

    Initialisation draws from a forked copy of torch's CPU generator seeded with `seed` (a fresh
    random seed when None), so the same seed gives identical weights and the caller's global RNG
    state is left untouched.
    """
    cfg = get_config(name, **overrides)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an int or None, got {seed!r}")
    init_seed = secrets.randbits(63) if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return Captioner(cfg)


def get_tokenizer(name: str, **overrides: object) -> CaptionTokenizer:
    """Tokenizer whose rows have the context length of size `name` (as ``open_clip.get_tokenizer``).

    Accepts the same `overrides` as `get_config`, so ``context_length=…`` and ``vocab=…`` match the model's.
    """
    text = get_config(name, **overrides).text
    return CaptionTokenizer(text.context_length, vocab=text.vocab)
