"""Captioner model: named sizes, the ViT encoder, the text decoder and the tokenizer factory."""

from dpcap.model.captioner import Captioner
from dpcap.model.decoder import LearnedPositions, TextDecoder
from dpcap.model.encoder import ENCODER_ARCH, create_encoder, encoder_model_args
from dpcap.model.registry import (
    SIZES,
    CaptionerConfig,
    TextConfig,
    VisionConfig,
    create_captioner,
    get_config,
    get_tokenizer,
    list_sizes,
)

__all__ = [
    "ENCODER_ARCH",
    "SIZES",
    "Captioner",
    "CaptionerConfig",
    "LearnedPositions",
    "TextConfig",
    "TextDecoder",
    "VisionConfig",
    "create_captioner",
    "create_encoder",
    "encoder_model_args",
    "get_config",
    "get_tokenizer",
    "list_sizes",
]
