"""Per-sample clipped gradient sums with ONE backward pass (book-keeping; Bu et al. 2023).

Forward hooks keep each covered layer's input and output. `Clipper.backward(losses)` asks autograd
for the gradient of Σ_i ℓ_i with respect to those *outputs* only, so parameter gradients are never
formed by autograd (the engine prunes every edge into a weight). From (x, g) each layer handler gives
per-sample squared norms; their sum over all layers is ‖∇ℓ_i‖² over all trainable parameters
(invariant 2: one norm for the whole model). With c_i = min(1, C/‖∇ℓ_i‖), each handler then forms
Σ_i c_i ∇ℓ_i directly (one matmul for a Linear) and adds it to `.grad`, so successive micro-batches
accumulate (Abadi et al. 2016, DP-SGD clipping).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dpcap.errors import PrivacyError

from .layers import Capture, LayerRegistry, default_registry
from .validate import plan_layers

# Added to the norm before dividing so a zero gradient gives a finite clip factor of 1.
_NORM_EPS = 1e-6


class Clipper:
    """Computes Σ_i min(1, C/‖g_i‖)·g_i into `.grad` of every trainable parameter of `model`."""

    def __init__(self, model: nn.Module, max_grad_norm: float, *, registry: LayerRegistry | None = None) -> None:
        if not max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self._layers = plan_layers(model, registry or default_registry())
        self._captures: dict[int, list[Capture]] = defaultdict(list)
        self._hooks = [
            handler.tap(module).register_forward_hook(self._make_hook(index))
            for index, (_, module, handler) in enumerate(self._layers)
        ]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # Only a forward that will be differentiated needs its activations kept.
            if torch.is_grad_enabled() and output.requires_grad:
                detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
                edge = get_gradient_edge(output)
                self._captures[index].append(Capture(detached, edge, output.shape, output.dtype))

        return hook

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clear(self) -> None:
        """Drop kept activations (e.g. after a forward that will not be back-propagated)."""
        self._captures.clear()

    def remove(self) -> None:
        """Remove the hooks; the model is left as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.clear()

    def backward(self, per_sample_losses: torch.Tensor) -> torch.Tensor:
        """Add the clipped sum of per-sample gradients to `.grad`; return the (B,) unclipped norms."""
        losses = per_sample_losses
        if losses.dim() != 1:
            raise PrivacyError(f"per_sample_losses must have shape (B,), got {tuple(losses.shape)}")
        try:
            if losses.shape[0] == 0 or not losses.requires_grad:
                self._ensure_grads()
                return torch.zeros(losses.shape[0], device=losses.device)
            return self._clip_and_accumulate(losses)
        finally:
            self.clear()

    def _clip_and_accumulate(self, losses: torch.Tensor) -> torch.Tensor:
        active = [i for i in range(len(self._layers)) if self._captures.get(i)]
        outputs = [capture.output_edge for i in active for capture in self._captures[i]]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        per_layer, cursor = {}, 0
        for i in active:
            count = len(self._captures[i])
            per_layer[i] = [
                g if g is not None else losses.new_zeros(c.output_shape, dtype=c.output_dtype)
                for g, c in zip(grads[cursor : cursor + count], self._captures[i])
            ]
            cursor += count
        del grads, outputs
        prepared = {}
        sq_norms = losses.new_zeros(losses.shape[0], dtype=torch.promote_types(losses.dtype, torch.float32))
        for i in active:
            _, module, handler = self._layers[i]
            prepared[i] = handler.prepare(module, self._captures.pop(i), per_layer.pop(i))
            sq_norms += handler.sq_norms(module, prepared[i])
        norms = sq_norms.sqrt()
        clip = (self.max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)
        for i in active:
            _, module, handler = self._layers[i]
            # Pop as we go: each layer's activations and output gradients are freed once used.
            for name, value in handler.clipped_sums(module, prepared.pop(i), clip).items():
                _accumulate(getattr(module, name), value)
        self._ensure_grads()
        return norms

    def _ensure_grads(self) -> None:
        """Parameters unused by this forward still get a (zero) gradient, so noise reaches every one."""
        for p in self.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def _accumulate(param: nn.Parameter, value: torch.Tensor) -> None:
    value = value.to(param.dtype).reshape(param.shape)
    if param.grad is None:
        param.grad = value
    else:
        param.grad.add_(value)
