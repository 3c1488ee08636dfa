"""Image encoder: a stock timm VisionTransformer, so that export is ``timm.models.save_for_hf``.

What the privacy engine relies on (checked by tests/model/test_captioner.py): no BatchNorm, no
dropout, no patch dropout, no pre-norm, no register tokens, no LayerScale, fixed image size; every
trainable parameter sits in an nn.Linear, nn.LayerNorm, the patch-embedding nn.Conv2d, or is the
VisionTransformer's own ``cls_token`` / ``pos_embed``.

Bias: with ``cfg.bias`` False the qkv, attention-output and MLP Linear layers have no bias. The
patch-embedding Conv2d keeps its bias (timm only drops it together with ``pre_norm=True``, which
adds a LayerNorm we do not want) and LayerNorms keep their affine bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import timm
from torch import nn

if TYPE_CHECKING:
    from dpcap.model.configs import CaptionerConfig

ENCODER_ARCH = "vit_base_patch16_224"


def encoder_model_args(cfg: CaptionerConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(ENCODER_ARCH, pretrained=False, num_classes=0, **args)``.

    ``num_classes`` is deliberately absent: transformers' TimmWrapper passes it itself. ``fc_norm``
    is False so that the final LayerNorm is applied to every token in ``forward_features`` (timm
    otherwise moves it after the average pool when ``global_pool="avg"``, leaving the token sequence
    the decoder sees un-normalised and the norm untrained); the exported pooled feature is then the
    mean of the normalised patch tokens, i.e. ``Captioner.encode_image(pool="mean")``.
    """
    v = cfg.vision
    return {
        "img_size": v.image_size,
        "patch_size": v.patch_size,
        "embed_dim": v.width,
        "depth": v.layers,
        "num_heads": v.heads,
        "mlp_ratio": float(v.mlp_ratio),
        "qkv_bias": cfg.bias,
        "proj_bias": cfg.bias,
        "global_pool": "avg",
        "fc_norm": False,
        "class_token": True,
    }


def create_encoder(cfg: CaptionerConfig) -> nn.Module:
    """A randomly initialised timm VisionTransformer without classifier head (never downloads)."""
    return timm.create_model(ENCODER_ARCH, pretrained=False, num_classes=0, **encoder_model_args(cfg))
