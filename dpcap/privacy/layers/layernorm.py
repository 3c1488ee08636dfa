"""nn.LayerNorm: per-sample gradients are O(D), so they are simply materialised.

With x̂ the normalised input (no affine), y = γ ⊙ x̂ + β gives ∇_γ ℓ_i = Σ_t g_t ⊙ x̂_t and
∇_β ℓ_i = Σ_t g_t (sums over every position of sample i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, trainable, upcast


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
            parts["weight"] = (g * x_hat).sum(dim=positions)
        if trainable(module, "bias"):
            parts["bias"] = g.sum(dim=positions)
        for name, value in parts.items():
            out[name] = out[name] + value if name in out else value
    return out


class LayerNormHandler(LayerHandler):
    module_types = (nn.LayerNorm,)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def prepare(self, module, captures, grads) -> dict[str, torch.Tensor]:
        return per_sample_affine_grads(module, captures, grads)

    def sq_norms(self, module, prepared):
        return sum(v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in prepared.values())

    def clipped_sums(self, module, prepared, clip):
        return {name: torch.tensordot(clip, value, dims=1) for name, value in prepared.items()}
