"""nn.Embedding: the per-sample gradient of the table is sparse, so its norm is a ghost sum.

Sample i's gradient row for token u is Σ_{t: v_t = u} g_t, hence

    ‖∇_E ℓ_i‖² = Σ_u ‖Σ_{t: v_t=u} g_t‖² = Σ_{t,s} [v_t = v_s] (g_t·g_s)

(O(T²·D) per sample, never the V × D table). The clipped sum scatters c_i·g_{i,t} into row v_{i,t}.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerHandler, RowsSum, check_batched_input, trainable, upcast


def _ids_and_grads(captures, grads) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([c.inputs[0].reshape(c.inputs[0].shape[0], -1) for c in captures], dim=1)
    g = upcast(torch.cat([gr.reshape(gr.shape[0], -1, gr.shape[-1]) for gr in grads], dim=1))
    return ids, g


class EmbeddingHandler(LayerHandler):
    module_types = (nn.Embedding,)

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight"}

    def check(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises rows in place during the forward pass"
        if module.sparse:
            return "sparse gradients are not supported"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales by token counts over the whole batch (it mixes samples)"
        return None

    def check_call(self, module, inputs, output) -> str | None:
        return check_batched_input(inputs, 1, "(batch, ...) token ids")

    def prepare(self, module, captures, grads) -> tuple[torch.Tensor, torch.Tensor]:
        ids, g = _ids_and_grads(captures, grads)
        if module.padding_idx is not None:  # the padding row never receives a gradient
            g = g * (ids != module.padding_idx).unsqueeze(-1)
        return ids, g

    def sq_norms(self, module, prepared):
        ids, g = prepared
        if not trainable(module, "weight"):
            return g.new_zeros(ids.shape[0])
        same_token = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return (same_token * (g @ g.transpose(1, 2))).sum(dim=(1, 2))

    def clipped_sums(self, module, prepared, clip):
        if not trainable(module, "weight"):
            return {}
        ids, g = prepared
        weighted = (g * clip[:, None, None]).reshape(-1, g.shape[-1])
        return {"weight": RowsSum(ids.reshape(-1), weighted, module.weight.shape)}
