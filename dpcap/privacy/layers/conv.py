"""nn.Conv2d (e.g. the ViT patch embedding) as a Linear layer over unfolded patches.

A conv with groups = 1 is y_l = W u_l + b where u_l is the l-th unfolded input patch (F.unfold),
so the Linear maths applies with T = number of output positions and d = C_in·k_h·k_w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, check_batched_input, upcast
from .linear import MatrixLayer


def unfold_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, L, C·kh·kw) input patches in F.unfold's feature order.

    Non-overlapping patches (stride = kernel, no padding or dilation: a ViT patch embedding) are a
    pure reshape; CPU im2col is much slower for that case.
    """
    kh, kw = module.kernel_size
    batch, channels, height, width = x.shape
    plain = module.stride == (kh, kw) and module.padding == (0, 0) and module.dilation == (1, 1)
    if plain and height % kh == 0 and width % kw == 0:
        patches = x.reshape(batch, channels, height // kh, kh, width // kw, kw).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, -1, channels * kh * kw)
    unfolded = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return unfolded.transpose(1, 2)


class Conv2dHandler(LayerHandler):
    module_types = (nn.Conv2d,)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def check(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding mode {module.padding_mode!r} / padding {module.padding!r} (only explicit zero padding)"
        return None

    def check_call(self, module, inputs, output) -> str | None:
        reason = check_batched_input(inputs, 4, f"(batch, {module.in_channels}, height, width)")
        if reason is None and inputs[0].dim() != 4:
            reason = f"input of shape {tuple(inputs[0].shape)} is not (batch, channels, height, width)"
        return reason

    def prepare(self, module, captures, grads) -> MatrixLayer:
        xs = [upcast(unfold_patches(module, c.inputs[0])) for c in captures]
        gs = [upcast(g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)) for g in grads]  # (B, L, O)
        return MatrixLayer.of(module, torch.cat(xs, dim=1), torch.cat(gs, dim=1))

    def sq_norms(self, module, prepared: MatrixLayer) -> torch.Tensor:
        return prepared.sq_norms(module)

    def clipped_sums(self, module, prepared: MatrixLayer, clip):
        return prepared.clipped_sums(module, clip)
