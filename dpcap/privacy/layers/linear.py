"""nn.Linear: per-sample norms by the ghost trick or by instantiation, whichever is cheaper within a memory budget.

For y_t = W x_t + b over T positions (x_t ∈ R^d, y_t ∈ R^p), sample i's weight gradient is
G_i = Σ_t g_t x_tᵀ (p × d), and the bias gradient is Σ_t g_t. Two exact ways to the norm and clipped sum:

* ghost (Goodfellow 2015; Li et al. 2022): ‖G_i‖²_F = Σ_{t,s} (x_t·x_s)(g_t·g_s) from two B×T×T Gram
  matrices; the clipped sum is then one matmul over all samples' stacked positions,
  Σ_i c_i G_i = gᵀ (c ⊙ x) (the clip factors scale the narrower of x and g).
* instantiated: form every G_i (one batched B×(p×T)·(T×d) matmul), take ‖G_i‖² from it, keep it, and
  form the clipped sum as Σ_i c_i G_i, a B·p·d contraction (no second pass over the T positions).
  x and g are dropped as soon as G is formed and G as soon as the sum is; G lives from the norm phase
  to the clipped-sum phase of the step, alongside the other layers' (the clip factors need all norms).

Cost model, in multiply-adds, for a micro-batch of B samples with T positions each (`branch_costs`):

    ghost:        2·B·T²·(d + p)  (Gram matrices)  +  B·T·p·d  (clipped sum)
    instantiated: B·T·p·d  (per-sample gradients)  +  B·p·d  (norms)  +  B·p·d  (clipped sum)

so ghost is cheaper in time iff T²·(d + p) < p·d, i.e. only for short sequences (T = 1, a 2-D input, is
ghost unless d or p is 1: the "Gram matrices" are then the scalars ‖x‖², ‖g‖²). Extra memory: ghost
2·B·T² floats, instantiated B·p·d floats. `choose_branch` takes the cheaper in time among the branches
whose extra memory fits the per-layer budget (`memory_budget_bytes`, a Clipper argument, default
`DEFAULT_MEMORY_BUDGET_BYTES` = 256 MiB), or the smaller-memory branch when neither fits (so a budget of
0 forces it). The budget is per layer: instantiated layers' G are alive together until the clipped sums,
so the step's extra peak is up to the sum of their `extra_bytes` (see `Clipper.branch_table`), less the
x and g they release. Both branches are exact; only speed and memory differ. The model counts
multiply-adds only: the instantiated branch's B·p·d passes are memory-bound and its B small matmuls
have inner size T, so on CPU it measured no faster than ghost on the nano captioner despite ~2x fewer
multiply-adds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import Linear as TimmLinear
from torch import nn

from .base import DEFAULT_MEMORY_BUDGET_BYTES, LayerHandler, check_batched_input, trainable, upcast
from .ghost_kernel import GHOST_KERNEL_ENV, SUPPORTED_DTYPES, ghost_sq_norms_triton, triton_available

GHOST = "ghost"
INSTANTIATED = "instantiated"
BRANCHES = (GHOST, INSTANTIATED)


def stack_tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, *, F) tensors of several calls → one (B, T, F) tensor of at least float32 (positions concatenated)."""
    flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tensors]
    return upcast(torch.cat(flat, dim=1)) if len(flat) > 1 else upcast(flat[0])


def branch_costs(batch: int, positions: int, d: int, p: int, element_size: int) -> dict[str, dict[str, int]]:
    """Estimated multiply-adds and extra bytes of each branch for one (B, T, d) → (B, T, p) layer."""
    sum_flops = batch * positions * p * d
    return {
        GHOST: {"flops": 2 * batch * positions * positions * (d + p) + sum_flops,
                "bytes": 2 * batch * positions * positions * element_size},
        INSTANTIATED: {"flops": sum_flops + 2 * batch * p * d, "bytes": batch * p * d * element_size},
    }  # fmt: skip


def choose_branch(costs: dict[str, dict[str, int]], memory_budget_bytes: float, force: str | None = None) -> str:
    """The cheaper branch in flops among those whose extra bytes fit the budget; else the smaller in memory."""
    if force is not None:
        if force not in BRANCHES:
            raise ValueError(f"unknown branch {force!r}; expected one of {BRANCHES}")
        return force
    fits = [b for b in BRANCHES if costs[b]["bytes"] <= memory_budget_bytes]
    if fits:
        return min(fits, key=lambda b: (costs[b]["flops"], costs[b]["bytes"]))
    return min(BRANCHES, key=lambda b: (costs[b]["bytes"], costs[b]["flops"]))


def ghost_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t x_tᵀ‖²_F per sample for x (B,T,d), g (B,T,p), as Σ_{t,s}(x_t·x_s)(g_t·g_s).

    On CUDA, by the fused Triton kernel (`ghost_kernel`), which never writes the two B×T×T Gram matrices
    to memory; elsewhere, for float64, or with ``DPCAP_GHOST_KERNEL=torch``, by torch from the Gram
    matrices (the reference). ``DPCAP_GHOST_KERNEL=triton`` forces the kernel (e.g. on CPU under
    ``TRITON_INTERPRET=1``).
    """
    choice = os.environ.get(GHOST_KERNEL_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{GHOST_KERNEL_ENV}={choice!r}; expected auto, torch or triton")
    if choice == "triton" or (
        choice == "auto" and triton_available(x) and x.dtype in SUPPORTED_DTYPES and g.dtype in SUPPORTED_DTYPES
    ):
        return ghost_sq_norms_triton(x, g).to(torch.promote_types(x.dtype, g.dtype))
    return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))


def per_sample_grads(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_i = Σ_t g_{i,t} x_{i,t}ᵀ for every sample: (B, p, d)."""
    return g.transpose(1, 2) @ x


def flat_sq_norms(grads: torch.Tensor) -> torch.Tensor:
    """Σ of squares per sample of a (B, ..., d) tensor: row norms over d, their squares summed in float64.

    No squared copy of `grads`, and as accurate as a cascaded float32 sum of squares (~1e-7 relative).
    Measured on CPU for float32 (B, p, d) = (64, 512, 128): 3x faster than ``pow(2).sum``; a batched dot
    product (bmm) was 15x slower and ~1e-5 off, a flat ``vector_norm`` ~1e-6 off (1e-3 at p·d = 10⁷).
    """
    rows = torch.linalg.vector_norm(grads.reshape(grads.shape[0], -1, grads.shape[-1]), dim=-1)
    return rows.double().pow(2).sum(dim=1).to(grads.dtype)


def matrix_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t x_tᵀ‖²_F per sample for x (B,T,d), g (B,T,p); ghost or instantiated by cost (default budget)."""
    costs = branch_costs(*x.shape, g.shape[-1], x.element_size())
    if choose_branch(costs, DEFAULT_MEMORY_BUDGET_BYTES) == GHOST:
        return ghost_sq_norms(x, g)
    return flat_sq_norms(per_sample_grads(x, g))


def matrix_clipped_sum(x: torch.Tensor, g: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i Σ_t g_{i,t} x_{i,t}ᵀ as one (p × d) matmul, the clip factors applied to the narrower side."""
    if x.shape[-1] <= g.shape[-1]:
        x = x * clip[:, None, None]
    else:
        g = g * clip[:, None, None]
    return g.reshape(-1, g.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])


@dataclass
class MatrixLayer:
    """A layer seen as y = W x + b on (B, T, ·) tensors: inputs, output grads, per-sample bias grads.

    `plan` picks the weight's branch (see the module docstring); without it, `sq_norms` plans with the
    default budget. With the instantiated branch, `sq_norms` replaces x and g by the per-sample weight
    gradients, which `clipped_sums` contracts with the clip factors and then drops.
    """

    x: torch.Tensor | None
    g: torch.Tensor | None
    bias_grads: torch.Tensor | None  # (B, p) = Σ_t g_t, when the bias is trainable
    branch: str | None = None
    weight_grads: torch.Tensor | None = None  # (B, p, d) per-sample G_i, instantiated branch only

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> MatrixLayer:
        return cls(x, g, g.sum(dim=1) if trainable(module, "bias") else None)

    def plan(self, module: nn.Module, memory_budget_bytes: float, force: str | None = None) -> dict | None:
        """Choose the weight's branch; the decision record for the Clipper's branch table (None: no weight)."""
        if not trainable(module, "weight"):
            return None
        batch, positions, d = self.x.shape
        p = self.g.shape[-1]
        costs = branch_costs(batch, positions, d, p, self.x.element_size())
        self.branch = choose_branch(costs, memory_budget_bytes, force)
        return {
            "B": batch,
            "T": positions,
            "d": d,
            "p": p,
            "branch": self.branch,
            "ghost_flops": costs[GHOST]["flops"],
            "instantiated_flops": costs[INSTANTIATED]["flops"],
            "ghost_bytes": costs[GHOST]["bytes"],
            "instantiated_bytes": costs[INSTANTIATED]["bytes"],
            "extra_bytes": costs[self.branch]["bytes"],
            "memory_budget_bytes": memory_budget_bytes,
        }

    def sq_norms(self, module: nn.Module) -> torch.Tensor:
        total = (self.x if self.x is not None else self.weight_grads).new_zeros(self.batch)
        if trainable(module, "weight"):
            if self.branch is None:
                self.plan(module, DEFAULT_MEMORY_BUDGET_BYTES)
            if self.branch == GHOST:
                total += ghost_sq_norms(self.x, self.g)
            else:
                if self.weight_grads is None:
                    self.weight_grads = per_sample_grads(self.x, self.g)
                    self.x = self.g = None  # only G is needed from here on
                total += flat_sq_norms(self.weight_grads)
        if self.bias_grads is not None:
            total += self.bias_grads.pow(2).sum(dim=1)
        return total

    @property
    def batch(self) -> int:
        return (self.x if self.x is not None else self.weight_grads).shape[0]

    def clipped_sums(self, module: nn.Module, clip: torch.Tensor) -> dict[str, torch.Tensor]:
        sums = {}
        if trainable(module, "weight"):
            shape = module.weight.shape
            if self.weight_grads is not None:
                grads, self.weight_grads = self.weight_grads, None
                sums["weight"] = (clip @ grads.reshape(grads.shape[0], -1)).reshape(shape)
                del grads  # freed here, before the caller accumulates the sum
            else:
                sums["weight"] = matrix_clipped_sum(self.x, self.g, clip).reshape(shape)
        if self.bias_grads is not None:
            sums["bias"] = clip @ self.bias_grads
        return sums


class LinearHandler(LayerHandler):
    module_types = (nn.Linear,)
    equivalent_forwards = (TimmLinear.forward,)  # F.linear, with a cast only under torchscript
    # Tests only: GHOST or INSTANTIATED overrides the cost-based choice for every layer of this handler.
    force_branch: str | None = None

    def covers(self, module: nn.Module) -> set[str]:
        return {"weight", "bias"}

    def check_call(self, module, inputs, output) -> str | None:
        return check_batched_input(inputs, 2, f"(batch, ..., {module.in_features})")

    def prepare(self, module, captures, grads) -> MatrixLayer:
        return MatrixLayer.of(module, stack_tokens([c.inputs[0] for c in captures]), stack_tokens(grads))

    def plan(self, module, prepared: MatrixLayer, memory_budget_bytes) -> dict | None:
        return prepared.plan(module, memory_budget_bytes, self.force_branch)

    def sq_norms(self, module, prepared: MatrixLayer) -> torch.Tensor:
        return prepared.sq_norms(module)

    def clipped_sums(self, module, prepared: MatrixLayer, clip):
        return prepared.clipped_sums(module, clip)
