"""nn.LayerNorm: per-sample gradients are O(D), so they are simply materialised.

With x̂ the normalised input (no affine), y = γ ⊙ x̂ + β gives ∇_γ ℓ_i = Σ_t g_t ⊙ x̂_t and
∇_β ℓ_i = Σ_t g_t (sums over every position of sample i). A (B, D) input (timm's `fc_norm` after
average pooling) has no positions: the per-sample gradients are g ⊙ x̂ and g themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.norm import LayerNorm as TimmLayerNorm
from timm.layers.norm import LayerNormFp32 as TimmLayerNormFp32
from torch import nn

from .base import LayerHandler, WeightedSum, check_batched_input, trainable, upcast


def _sum_positions(value: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    # `sum(dim=())` would reduce every dimension, the batch included.
    return value.sum(dim=positions) if positions else value


def per_sample_affine_grads(module: nn.LayerNorm, captures, grads) -> dict[str, torch.Tensor]:
    """{'weight': (B, *shape), 'bias': (B, *shape)} for the trainable affine parameters."""
    shape = module.normalized_shape
    out: dict[str, torch.Tensor] = {}
    for capture, g in zip(captures, grads):
        g = upcast(g)
        positions = tuple(range(1, g.dim() - len(shape)))  # every dim but the batch and the features
        parts = {}
        if trainable(module, "weight"):
            x_hat = F.layer_norm(upcast(capture.inputs[0]), shape, eps=module.eps)
            parts["weight"] = _sum_positions(x_hat.mul_(g), positions)  # x̂ is ours: g ⊙ x̂ in its place
        if trainable(module, "bias"):
            parts["bias"] = _sum_positions(g, positions)
        for name, value in parts.items():
            out[name] = out[name] + value if name in out else value
    return out


class LayerNormHandler(LayerHandler):
    module_types = (nn.LayerNorm,)
    # F.layer_norm over the last dims (timm's fast-norm path and fp32 variant compute the same function).
    equivalent_forwards = (TimmLayerNorm.forward, TimmLayerNormFp32.forward)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def check_call(self, module, inputs, output) -> str | None:
        shape = tuple(module.normalized_shape)
        return check_batched_input(inputs, len(shape) + 1, f"(batch, ..., {', '.join(map(str, shape))})")

    def prepare(self, module, captures, grads) -> dict[str, torch.Tensor]:
        return per_sample_affine_grads(module, captures, grads)

    def sq_norms(self, module, prepared):
        return sum(v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in prepared.values())

    def clipped_sums(self, module, prepared, clip):
        return {name: WeightedSum(clip, value) for name, value in prepared.items()}
