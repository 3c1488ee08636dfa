"""nn.Linear: per-sample norms by the ghost trick or by instantiation, whichever is cheaper.

For y_t = W x_t + b over T positions, sample i's weight gradient is G_i = Σ_t g_t x_tᵀ (p × d) and

    ‖G_i‖²_F = Σ_{t,s} (x_t·x_s)(g_t·g_s)          (ghost norm, Goodfellow 2015; Li et al. 2022)

which costs O(T²(d+p)) and 2T² memory per sample, against O(T·p·d) and p·d to form G_i. We take the
ghost form when 2T² ≤ p·d. The bias gradient is Σ_t g_t. The clipped sum is one matmul,
Σ_i c_i G_i = (c ⊙ g)ᵀ x with all samples' positions stacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Capture, LayerHandler, trainable, upcast


def stack_tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, *, F) tensors of several calls → one (B, T, F) float32 tensor (positions concatenated)."""
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
    """Σ_i c_i Σ_t g_{i,t} x_{i,t}ᵀ as one (p × d) matmul."""
    weighted = (g * clip[:, None, None]).reshape(-1, g.shape[-1])
    return weighted.transpose(0, 1) @ x.reshape(-1, x.shape[-1])


class LinearHandler(LayerHandler):
    module_types = (nn.Linear,)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def sq_norms(self, module, captures: Sequence[Capture], grads):
        x, g = stack_tokens([c.inputs[0] for c in captures]), stack_tokens(grads)
        total = x.new_zeros(x.shape[0])
        if trainable(module, "weight"):
            total += matrix_sq_norms(x, g)
        if trainable(module, "bias"):
            total += g.sum(dim=1).pow(2).sum(dim=1)
        return total

    def clipped_sums(self, module, captures, grads, clip):
        x, g = stack_tokens([c.inputs[0] for c in captures]), stack_tokens(grads)
        sums = {}
        if trainable(module, "weight"):
            sums["weight"] = matrix_clipped_sum(x, g, clip)
        if trainable(module, "bias"):
            sums["bias"] = (g.sum(dim=1) * clip[:, None]).sum(dim=0)
        return sums
