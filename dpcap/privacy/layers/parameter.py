"""Raw parameters added to the token stream: a ViT's cls_token / pos_embed, a decoder's positions.

Such a parameter P (shape (1, T, D)) enters as x + P broadcast over the batch (the cls token is
concatenated, then the positions are added), so for the token stream z after the addition,
∇_P ℓ_i = ∂ℓ_i/∂z_i and ∇_cls ℓ_i = ∂ℓ_i/∂z_{i,0}. Tapping z's gradient gives both exactly, without
touching the model's code. Each is (T·D) per sample, so it is materialised.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dpcap.model.decoder import LearnedPositions

from .base import LayerHandler, WeightedSum, trainable, upcast


class LearnedPositionsHandler(LayerHandler):
    """`LearnedPositions.forward(x) = x + weight[:, :T]`: the output gradient is the per-sample gradient."""

    module_types = (LearnedPositions,)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight"}

    def check_call(self, module, inputs, output) -> str | None:
        if output.dim() != 3:
            return f"output of shape {tuple(output.shape)} is not (batch, positions, width)"
        return None

    def prepare(self, module, captures, grads) -> list[torch.Tensor]:
        if not trainable(module, "weight"):
            return []
        grads = [upcast(g) for g in grads]
        if len(grads) == 1:
            return grads
        # Several forward calls (e.g. K augmented views) share P: ∇_P ℓ_i = Σ_c g_{c,i}, summed before the norm.
        summed = grads[0].new_zeros((grads[0].shape[0], max(g.shape[1] for g in grads), *grads[0].shape[2:]))
        for g in grads:
            summed[:, : g.shape[1]] += g
        return [summed]

    def sq_norms(self, module, prepared):
        return sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in prepared)

    def clipped_sums(self, module, prepared, clip):
        if not prepared:
            return {}
        summed = clip.new_zeros(module.weight.shape)
        for g in prepared:
            summed[:, : g.shape[1]] += torch.tensordot(clip, g, dims=1)
        return {"weight": summed}


class VisionTransformerTokensHandler(LayerHandler):
    """timm VisionTransformer's own `cls_token` and `pos_embed`, read off the token stream at `norm_pre`."""

    module_types = (VisionTransformer,)
    requires_known_forward = False  # the token stream is read at `norm_pre`; what matters is `_pos_embed`

    def covers(self, module: nn.Module) -> set[str]:
        return {"cls_token", "pos_embed"}

    def check_call(self, module, inputs, output) -> str | None:
        if output.dim() != 3:
            return f"token stream at norm_pre of shape {tuple(output.shape)} is not (batch, tokens, width)"
        return None

    def check(self, module: nn.Module) -> str | None:
        if type(module)._pos_embed is not VisionTransformer._pos_embed:
            return f"{type(module).__qualname__} overrides _pos_embed (cls_token/pos_embed are read off its output)"
        pos_drop = getattr(module.pos_drop, "p", 0.0)
        if module.reg_token is not None or getattr(module, "dynamic_img_size", False):
            return "register tokens and dynamic image size are not supported"
        if pos_drop or not isinstance(module.patch_drop, nn.Identity) or not isinstance(module.norm_pre, nn.Identity):
            return "pos_drop, patch_drop and norm_pre must be identities (the token stream is read at norm_pre)"
        return None

    def tap(self, module: nn.Module) -> nn.Module:
        return module.norm_pre

    def prepare(self, module, captures, grads) -> dict[str, torch.Tensor]:
        g = upcast(grads[0] if len(grads) == 1 else torch.stack(list(grads)).sum(0))
        out = {}
        if trainable(module, "cls_token"):
            out["cls_token"] = g[:, :1]
        if trainable(module, "pos_embed"):
            out["pos_embed"] = g[:, 1:] if module.no_embed_class else g
        return out

    def sq_norms(self, module, prepared):
        return sum(v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in prepared.values())

    def clipped_sums(self, module, prepared, clip):
        return {name: WeightedSum(clip, v) for name, v in prepared.items()}
