"""Independent oracle: clip each example's gradient by a plain per-example backward loop."""

from __future__ import annotations

import torch
from torch import nn


def naive_clipped_sum(model: nn.Module, loss_fn, inputs: list, max_grad_norm: float):
    """(clipped sum per trainable parameter name, per-sample norms) from B separate backwards."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    batch = inputs[0].shape[0]
    for i in range(batch):
        grads = torch.autograd.grad(
            loss_fn(*[x[i : i + 1] for x in inputs]).sum(), list(params.values()), allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for name, g in zip(params, grads):
            total[name] += factor * g
        norms.append(norm)
    return total, torch.stack(norms) if norms else torch.zeros(0)
