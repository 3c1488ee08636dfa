"""The contract every layer kind implements, and the registry the Clipper owns.

A layer handler answers three questions about one module, given what the forward pass left
behind (`x`, the module's input activations of every call, and `g`, the gradient of the summed
per-sample losses with respect to the module's output of every call):

* which of the module's *own* parameters it can clip per sample (`covers`);
* each sample's squared gradient norm, summed over those parameters (`sq_norms`, shape (B,));
* the clipped sum Σ_i c_i ∇_θ ℓ_i for each of those parameters (`clipped_sums`).

Because ℓ = Σ_i ℓ_i and samples never interact, g[i] = ∂ℓ_i/∂out[i]: the per-sample gradient of a
parameter is a function of (x[i], g[i]) alone, which is what makes one backward enough
("book-keeping", Bu et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Extra scratch bytes a handler may spend on one layer to take a faster exact branch (see linear.py).
DEFAULT_MEMORY_BUDGET_BYTES = 256 << 20  # 256 MiB
# Bytes the layers of one micro-batch may hold together, from their norms to their clipped sums, beyond the
# activations and output gradients they replace (a Linear's instantiated per-sample gradients, see linear.py).
DEFAULT_STEP_MEMORY_BUDGET_BYTES = 1 << 30  # 1 GiB


@dataclass
class Capture:
    """One forward call of a tapped module: its input activation and where its output sits in the graph.

    Only the output's gradient edge is kept, not the tensor: holding e.g. the vocabulary head's
    (B, T, V) logits would keep them alive through the whole backward, which autograd itself frees early.
    """

    inputs: tuple
    output_edge: object  # torch.autograd.graph.GradientEdge
    output_shape: torch.Size
    output_dtype: torch.dtype


class LazySum:
    """A clipped sum Σ_i c_i ∇ℓ_i kept as the operands of its last product, for the Clipper to add in place.

    With gradient accumulation `.grad` already holds the earlier micro-batches' sums. Forming this one
    and then adding it costs a temporary the size of the parameter (fresh pages on CPU, so page faults)
    and one more pass over both; `add_to` lets BLAS (beta = 1) or `index_add_` write into `.grad` in the
    same pass that forms the sum. `materialize` gives the plain tensor (the first micro-batch, or a
    `.grad` of another dtype or layout). Either way the values are the same sum, up to float rounding.
    """

    dtype: torch.dtype

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, out: torch.Tensor) -> None:
        """out += the sum, in place (`out` contiguous, of this sum's dtype and numel)."""
        raise NotImplementedError


@dataclass
class MatmulSum(LazySum):
    """left @ right: a (p, N) by (N, d) product (a weight's clipped sum over N stacked positions)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    def materialize(self) -> torch.Tensor:
        return self.left @ self.right

    def add_to(self, out: torch.Tensor) -> None:
        out.view(self.left.shape[0], self.right.shape[1]).addmm_(self.left, self.right)


@dataclass
class WeightedSum(LazySum):
    """Σ_i weights[i] · stack[i]: the clip factors (B,) contracted with per-sample gradients (B, ...)."""

    weights: torch.Tensor
    stack: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.dtype

    def materialize(self) -> torch.Tensor:
        return self.weights @ self.stack.reshape(self.stack.shape[0], -1)

    def add_to(self, out: torch.Tensor) -> None:
        out.view(-1).addmv_(self.stack.reshape(self.stack.shape[0], -1).T, self.weights)


@dataclass
class RowsSum(LazySum):
    """A table of `shape` that is zero but for `rows` (M, D) added into rows `index` (M,) (an embedding's sum)."""

    index: torch.Tensor
    rows: torch.Tensor
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def materialize(self) -> torch.Tensor:
        return self.rows.new_zeros(self.shape).index_add_(0, self.index, self.rows)

    def add_to(self, out: torch.Tensor) -> None:
        out.view(self.shape).index_add_(0, self.index, self.rows)


class LayerHandler:
    """Base class of the per-layer maths. Subclasses set `module_types` and override the methods.

    The clipper calls `prepare` once per layer and step (during the backward, as soon as the gradients
    of all the layer's outputs are known), then `plan` and `sq_norms`, and, once the backward is over
    and the clip factors are known, `clipped_sums` on what `prepare` returned — so work shared by the
    two (unfolding patches, per-sample bias gradients) is done once. All three run with autocast
    disabled, and `prepare` receives the floating-point inputs and output gradients already cast to
    the clipper's dtype (float32, or float64 for a float64 model); `clip` has that dtype too.

    The maths is that of the `forward` of `module_types` (or of `equivalent_forwards`): a subclass
    overriding `forward` (timm's channels-first LayerNorm2d, a weight-standardised or "same"-padded
    conv) is refused at construction unless its handler lists it, since its per-sample gradients
    differ. Shapes are checked per forward call by `check_call`.
    """

    module_types: tuple[type[nn.Module], ...] = ()
    # Other `forward` implementations with the same per-sample gradients (e.g. timm's LayerNorm).
    equivalent_forwards: tuple = ()
    # False where the handler does not depend on the module's own forward (it reads a tapped submodule).
    requires_known_forward: bool = True

    def covers(self, module: nn.Module) -> set[str]:
        """Names of the module's own (non-recursive) parameters this handler can clip."""
        raise NotImplementedError

    def check(self, module: nn.Module) -> str | None:
        """A reason this particular module cannot be handled (unsupported options), or None."""
        return None

    def check_forward(self, module: nn.Module) -> str | None:
        """A reason the module's `forward` is not one this handler's maths describes, or None."""
        if not self.requires_known_forward:
            return None
        forward = type(module).forward
        if any(forward is t.forward for t in self.module_types) or any(forward is f for f in self.equivalent_forwards):
            return None
        known = ", ".join(t.__name__ for t in self.module_types)
        return f"{type(module).__qualname__} overrides forward(); the per-sample gradient rule is that of {known}"

    def check_call(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> str | None:
        """A reason this forward call (known only at forward time: input ranks) cannot be handled, or None."""
        return None

    def tap(self, module: nn.Module) -> nn.Module:
        """The module whose forward inputs/outputs carry the information (usually `module` itself)."""
        return module

    def prepare(self, module: nn.Module, captures: Sequence[Capture], grads: Sequence[torch.Tensor]) -> Any:
        """What `sq_norms` and `clipped_sums` need, computed once from the forward captures and output grads."""
        raise NotImplementedError

    def plan(
        self, module: nn.Module, prepared: Any, memory_budget_bytes: float, held_budget_bytes: float = math.inf
    ) -> dict | None:
        """Choose among the handler's exact branches for this step (called after `prepare`, before
        `sq_norms`), spending at most `memory_budget_bytes` extra on this layer and holding at most
        `held_budget_bytes` (what is left of the micro-batch's budget) until the clipped sums; return the
        decision for the Clipper's branch table (with ``held_bytes``, what it holds), or None where there
        is nothing to choose."""
        return None

    def sq_norms(self, module: nn.Module, prepared: Any) -> torch.Tensor:
        """Per-sample squared gradient norms (B,), at least float32, over the trainable parameters covered."""
        raise NotImplementedError

    def clipped_sums(self, module: nn.Module, prepared: Any, clip: torch.Tensor) -> dict[str, torch.Tensor | LazySum]:
        """Σ_i clip[i]·∇ℓ_i for each trainable covered parameter, keyed by parameter name: a tensor of the
        parameter's numel, or a `LazySum` that the Clipper adds into `.grad` in place."""
        raise NotImplementedError


def trainable(module: nn.Module, name: str) -> bool:
    """Whether `module.<name>` is a parameter that requires a gradient."""
    param = getattr(module, name, None)
    return isinstance(param, nn.Parameter) and param.requires_grad


class LayerRegistry:
    """Maps module types to handlers; looked up along `type(module).__mro__` (most specific first)."""

    def __init__(self, handlers: Sequence[LayerHandler] = ()) -> None:
        self._by_type: dict[type[nn.Module], LayerHandler] = {}
        for handler in handlers:
            self.register(handler)

    def register(self, handler: LayerHandler) -> LayerHandler:
        for module_type in handler.module_types:
            self._by_type[module_type] = handler
        return handler

    def lookup(self, module: nn.Module) -> LayerHandler | None:
        for klass in type(module).__mro__:
            if klass in self._by_type:
                return self._by_type[klass]
        return None


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (norm sums stay exact enough under bf16/fp16 autocast); float64 stays float64."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def check_batched_input(inputs: tuple, min_dim: int, expected: str) -> str | None:
    """None if the first positional input is a tensor of at least `min_dim` dims (batch first), else why not."""
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        return "called without a positional tensor input (the clipper reads the first positional argument)"
    if inputs[0].dim() < min_dim:
        return f"input of shape {tuple(inputs[0].shape)} has no batch dimension (expected {expected})"
    return None
