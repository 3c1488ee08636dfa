"""Per-layer per-sample gradient maths, one file per layer kind (opacus `grad_sample/` style)."""

from .base import Capture, LayerHandler, LayerRegistry
from .conv import Conv2dHandler
from .embedding import EmbeddingHandler
from .layernorm import LayerNormHandler
from .linear import LinearHandler
from .parameter import LearnedPositionsHandler, VisionTransformerTokensHandler


def default_registry() -> LayerRegistry:
    """A fresh registry with every supported layer kind (each Clipper owns its own)."""
    return LayerRegistry(
        [
            LinearHandler(),
            EmbeddingHandler(),
            LayerNormHandler(),
            Conv2dHandler(),
            LearnedPositionsHandler(),
            VisionTransformerTokensHandler(),
        ]
    )


__all__ = ["Capture", "LayerHandler", "LayerRegistry", "default_registry"]
