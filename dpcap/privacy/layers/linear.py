"""nn.Linear: per-sample norms by the ghost trick or by instantiation, whichever is cheaper.

For y_t = W x_t + b over T positions, sample i's weight gradient is G_i = Σ_t g_t x_tᵀ (p × d) and

    ‖G_i‖²_F = Σ_{t,s} (x_t·x_s)(g_t·g_s)          (ghost norm, Goodfellow 2015; Li et al. 2022)

which costs O(T²(d+p)) and 2T² memory per sample, against O(T·p·d) and p·d to form G_i. We take the
ghost form when 2T² ≤ p·d. The bias gradient is Σ_t g_t. The clipped sum is one matmul,
Σ_i c_i G_i = gᵀ (c ⊙ x) with all samples' positions stacked (scaling the narrower of x and g).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import Linear as TimmLinear
from torch import nn

from .base import LayerHandler, check_batched_input, trainable, upcast


def stack_tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, *, F) tensors of several calls → one (B, T, F) tensor of at least float32 (positions concatenated)."""
    flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tensors]
    return upcast(torch.cat(flat, dim=1)) if len(flat) > 1 else upcast(flat[0])


def matrix_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t x_tᵀ‖²_F per sample for x (B,T,d), g (B,T,p); ghost or instantiated by cost."""
    _, positions, d = x.shape
    p = g.shape[-1]
    if 2 * positions * positions <= p * d:
        return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
    return (g.transpose(1, 2) @ x).pow(2).sum(dim=(1, 2))


def matrix_clipped_sum(x: torch.Tensor, g: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i Σ_t g_{i,t} x_{i,t}ᵀ as one (p × d) matmul, the clip factors applied to the narrower side."""
    if x.shape[-1] <= g.shape[-1]:
        x = x * clip[:, None, None]
    else:
        g = g * clip[:, None, None]
    return g.reshape(-1, g.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])


@dataclass
class MatrixLayer:
    """A layer seen as y = W x + b on (B, T, ·) tensors: inputs, output grads, per-sample bias grads."""

    x: torch.Tensor
    g: torch.Tensor
    bias_grads: torch.Tensor | None  # (B, p) = Σ_t g_t, when the bias is trainable

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> MatrixLayer:
        return cls(x, g, g.sum(dim=1) if trainable(module, "bias") else None)

    def sq_norms(self, module: nn.Module) -> torch.Tensor:
        total = self.x.new_zeros(self.x.shape[0])
        if trainable(module, "weight"):
            total += matrix_sq_norms(self.x, self.g)
        if self.bias_grads is not None:
            total += self.bias_grads.pow(2).sum(dim=1)
        return total

    def clipped_sums(self, module: nn.Module, clip: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = {}
        if trainable(module, "weight"):
            sums["weight"] = matrix_clipped_sum(self.x, self.g, clip).reshape(module.weight.shape)
        if self.bias_grads is not None:
            sums["bias"] = clip @ self.bias_grads
        return sums


class LinearHandler(LayerHandler):
    module_types = (nn.Linear,)
    equivalent_forwards = (TimmLinear.forward,)  # F.linear, with a cast only under torchscript

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def check_call(self, module, inputs, output) -> str | None:
        return check_batched_input(inputs, 2, f"(batch, ..., {module.in_features})")

    def prepare(self, module, captures, grads) -> MatrixLayer:
        return MatrixLayer.of(module, stack_tokens([c.inputs[0] for c in captures]), stack_tokens(grads))

    def sq_norms(self, module, prepared: MatrixLayer) -> torch.Tensor:
        return prepared.sq_norms(module)

    def clipped_sums(self, module, prepared: MatrixLayer, clip):
        return prepared.clipped_sums(module, clip)
