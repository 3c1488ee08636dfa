"""The captioner's typed configs: one frozen dataclass per tower and the captioner made of both.

They sit below everything else in ``dpcap.model`` (the registry of named sizes builds them, the
encoder, decoder and captioner are built from them), so no module there imports the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpcap.data.vocab import VOCABS, get_vocabulary
from dpcap.errors import ConfigError


def _check_positive_int(owner: str, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{key} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ConfigError(f"{owner}.{key} must be > 0, got {value}")


def _check_ratio(owner: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{owner}.mlp_ratio must be a positive number, got {value!r}")


def _check_heads(owner: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{owner}.width ({width}) must be divisible by {owner}.heads ({heads})")


@dataclass(frozen=True)
class VisionConfig:
    """ViT encoder: square images of `image_size` px cut into `patch_size` px patches."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for key in ("image_size", "patch_size", "width", "layers", "heads"):
            _check_positive_int("vision", key, getattr(self, key))
        _check_ratio("vision", self.mlp_ratio)
        _check_heads("vision", self.width, self.heads)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")

    @property
    def num_tokens(self) -> int:
        """CLS + patch tokens the decoder cross-attends to: ``1 + (image_size / patch_size)²``."""
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Causal text decoder over `context_length` tokens of the vocabulary `vocab` (see dpcap.data.vocab).

    `vocab_size` defaults to the vocabulary's size (49,408 for ``clip``).
    """

    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    vocab_size: int | None = None
    vocab: str = "clip"

    def __post_init__(self) -> None:
        if self.vocab not in VOCABS:
            raise ConfigError(f"text.vocab must be one of {', '.join(VOCABS)}, got {self.vocab!r}")
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", get_vocabulary(self.vocab).size)
        for key in ("context_length", "width", "layers", "heads", "vocab_size"):
            _check_positive_int("text", key, getattr(self, key))
        _check_ratio("text", self.mlp_ratio)
        _check_heads("text", self.width, self.heads)
        if self.context_length < 2:
            raise ConfigError(f"context_length must be >= 2 (SOT and EOT), got {self.context_length}")


@dataclass(frozen=True)
class CaptionerConfig:
    """A named captioner: both towers, whether Linear layers carry a bias, and the pixel normalisation."""

    name: str
    vision: VisionConfig
    text: TextConfig
    bias: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be a bool, got {type(self.bias).__name__} {self.bias!r}")
