"""nn.Conv2d (e.g. the ViT patch embedding) as a Linear layer over unfolded patches.

A conv with groups = 1 is y_l = W u_l + b where u_l is the l-th unfolded input patch (F.unfold),
so the Linear maths applies with T = number of output positions and d = C_in·k_h·k_w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, trainable, upcast
from .linear import matrix_clipped_sum, matrix_sq_norms


def _patches_and_grads(module: nn.Conv2d, captures, grads) -> tuple[torch.Tensor, torch.Tensor]:
    xs, gs = [], []
    for capture, g in zip(captures, grads):
        x = capture.inputs[0]
        unfolded = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
        xs.append(upcast(unfolded.transpose(1, 2)))  # (B, L, C·kh·kw)
        gs.append(upcast(g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)))  # (B, L, O)
    return torch.cat(xs, dim=1), torch.cat(gs, dim=1)


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

    def sq_norms(self, module, captures, grads):
        x, g = _patches_and_grads(module, captures, grads)
        total = x.new_zeros(x.shape[0])
        if trainable(module, "weight"):
            total += matrix_sq_norms(x, g)
        if trainable(module, "bias"):
            total += g.sum(dim=1).pow(2).sum(dim=1)
        return total

    def clipped_sums(self, module, captures, grads, clip):
        x, g = _patches_and_grads(module, captures, grads)
        sums = {}
        if trainable(module, "weight"):
            sums["weight"] = matrix_clipped_sum(x, g, clip).reshape(module.weight.shape)
        if trainable(module, "bias"):
            sums["bias"] = (g.sum(dim=1) * clip[:, None]).sum(dim=0)
        return sums
