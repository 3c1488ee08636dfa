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

Cost model (`branch_costs`), for a micro-batch of B samples with T positions each: multiply-adds plus
κ = `SCRATCH_ELEMENT_COST` for every element of scratch the branch writes and reads back,

    ghost:        2·B·T²·(d + p)  (Gram matrices)  +  B·T·p·d  (clipped sum)     + κ·2·B·T²
    instantiated: B·T·p·d  (per-sample gradients)  +  2·B·p·d  (norms, clipped sum)  + κ·B·p·d

so the instantiated branch is the cheaper iff p·d·(κ + 2) < 2·T²·(d + p + κ): long sequences of narrow
layers (tiny's 192-wide encoder at T = 197), while short sequences and wide layers take ghost (T = 1, a
2-D input, is ghost unless d or p is 1: the "Gram matrices" are then the scalars ‖x‖², ‖g‖²). The κ term
is why: the instantiated branch's G is written to fresh pages and read back twice, B·p·d passes that are
memory-bound, where the Gram matrices' extra multiply-adds run at the matmul's rate. Counting
multiply-adds alone took the instantiated branch for `small`'s 384-wide qkv and MLP and ran its DP step
at 1.8x the non-private one, against 1.14x with every Linear on ghost (benchmarks/README.md).
Extra memory: ghost 2·B·T² floats, instantiated B·p·d floats. `choose_branch` takes the cheaper branch
among those whose memory fits two budgets, or the smaller-memory branch when none does (so budgets of 0
force it):
* the layer's scratch, its `extra_bytes` (`memory_budget_bytes`, a Clipper argument, default
  `DEFAULT_MEMORY_BUDGET_BYTES` = 256 MiB);
* what it holds until the clipped sums beyond the x and g it replaces, its `held_bytes`: the instantiated
  G of every layer is alive together with the others' until the clip factors are known, and holds more
  than x and g where p·d > T·(d + p) (d = p = 512 at T = 224, say). The Clipper gives each
  micro-batch `step_memory_budget_bytes` (default `DEFAULT_STEP_MEMORY_BUDGET_BYTES` = 1 GiB), and each
  layer, as its gradient arrives in the backward, what is left of it.
Both branches are exact; only speed and memory differ.

Zero rows (ghost branch, CPU): a position whose output gradient g_t is exactly zero adds nothing to
G_i, to the ghost double sum or to Σ_t g_t. A causal decoder trained on captions of varied lengths has
many: every position after a sample's last target (and the vocabulary head's positions outside the
target mask). `nonzero_rows` finds the rows of g that are not exactly 0 (checked element by element: a
NaN is never taken for zero), and where at least `ZERO_ROWS_MIN_FRACTION` of the rows are zero the ghost
branch keeps only the others (N = Σ_i n_i rows, one copy): the clipped-sum matmul runs over N rows
instead of B·T, the bias sums over them, and the double sum takes the cheapest of the B (T × T) Gram
pairs, one N × N pair or an n_i × n_i pair per sample (`gram_method`). `plan` counts the ghost branch
at that cost (with the scratch of its Gram pairs and of the compacted copies), so a layer with many zero
rows can take it where its dense cost would not. Same maths, without terms that are exactly zero; on CPU
only (the row counts are read on the host).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import Linear as TimmLinear
from torch import nn

from .base import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    LayerHandler,
    LazySum,
    MatmulSum,
    WeightedSum,
    check_batched_input,
    trainable,
    upcast,
)
from .ghost_kernel import GHOST_KERNEL_ENV, SUPPORTED_DTYPES, ghost_sq_norms_triton, triton_available

GHOST = "ghost"
INSTANTIATED = "instantiated"
BRANCHES = (GHOST, INSTANTIATED)

SCRATCH_ELEMENT_COST = 384
"""κ: what writing one element of scratch and reading it back costs, in multiply-adds, in `branch_costs`.

Measured on this project's 2-core CPU (benchmarks/README.md, DP step ÷ non-private at B = 16): the
fastest branch for every layer of `small` (T = 65 and 197) and `base` (T = 197) is ghost, and for tiny's
encoder at T = 197 instantiated; a κ between ~270 and ~500 reproduces all four, 384 sits inside."""


def stack_tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, *, F) tensors of several calls → one (B, T, F) tensor of at least float32 (positions concatenated)."""
    flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tensors]
    return upcast(torch.cat(flat, dim=1)) if len(flat) > 1 else upcast(flat[0])


def branch_costs(batch: int, positions: int, d: int, p: int, element_size: int) -> dict[str, dict[str, int]]:
    """Estimated multiply-adds, extra bytes, held bytes and cost of each branch for one (B, T, d) → (B, T, p) layer.

    ``cost``: the multiply-adds plus κ (`SCRATCH_ELEMENT_COST`) per element of scratch, what `choose_branch`
    compares. ``held``: what the branch keeps until the clipped sums beyond the x and g it would keep
    anyway. The ghost branch keeps x and g (its Gram matrices are scratch); the instantiated branch keeps G
    (B·p·d) and drops x and g (B·T·(d + p)), so it holds more only where p·d > T·(d + p)."""
    sum_flops = batch * positions * p * d
    ghost_flops, ghost_scratch = 2 * batch * positions * positions * (d + p) + sum_flops, 2 * batch * positions**2
    inst_flops, inst_scratch = sum_flops + 2 * batch * p * d, batch * p * d
    return {
        GHOST: {"flops": ghost_flops, "bytes": ghost_scratch * element_size, "held": 0,
                "cost": ghost_flops + SCRATCH_ELEMENT_COST * ghost_scratch},
        INSTANTIATED: {"flops": inst_flops, "bytes": inst_scratch * element_size,
                       "held": max(0, batch * (p * d - positions * (d + p))) * element_size,
                       "cost": inst_flops + SCRATCH_ELEMENT_COST * inst_scratch},
    }  # fmt: skip


def choose_branch(
    costs: dict[str, dict[str, int]],
    memory_budget_bytes: float,
    force: str | None = None,
    held_budget_bytes: float = math.inf,
) -> str:
    """The cheaper branch in ``cost`` (multiply-adds + κ·scratch) among those whose extra bytes fit the
    layer's budget and whose held bytes fit what is left of the micro-batch's; else the smaller in memory."""
    if force is not None:
        if force not in BRANCHES:
            raise ValueError(f"unknown branch {force!r}; expected one of {BRANCHES}")
        return force
    fits = [
        b for b in BRANCHES if costs[b]["bytes"] <= memory_budget_bytes and costs[b].get("held", 0) <= held_budget_bytes
    ]
    if fits:
        return min(fits, key=lambda b: (costs[b]["cost"], costs[b]["bytes"]))
    return min(BRANCHES, key=lambda b: (costs[b]["bytes"], costs[b]["cost"]))


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


# The ghost branch drops g's zero rows when at least this fraction of all B·T rows are (see the docstring).
ZERO_ROWS_MIN_FRACTION = 0.25
# Up to this many elements of g, every row's min and max are read (two fast passes, no per-sample loop);
# above it (a vocabulary head), only the rows outside each sample's probed span are, sample by sample.
_FULL_CHECK_ELEMENTS = 1 << 22
# What one small torch call costs, in multiply-adds (CPU, one thread: ~8 µs), for `gram_method`'s
# per-sample loop.
_CALL_COST_MACS = 300_000


@dataclass
class RowSet:
    """The rows kept of a (B, T, ·) pair, sample-major: `index` into the B·T rows, `sample` of each."""

    index: torch.Tensor  # (N,) int64, increasing
    sample: torch.Tensor  # (N,) int64, index // T
    counts: list[int]  # n_i, rows kept per sample
    batch: int

    @classmethod
    def of(cls, keep: torch.Tensor) -> RowSet:
        """From a (B, T) bool mask of the rows to keep."""
        index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(index, index // keep.shape[1], keep.sum(dim=1).tolist(), keep.shape[0])

    @property
    def within(self) -> int:
        """Σ_i n_i²: the pairs of kept rows of one sample."""
        return sum(n * n for n in self.counts)

    def compact(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, F) → (N, F): the kept rows, one copy."""
        return t.reshape(-1, t.shape[-1]).index_select(0, self.index)


def nonzero_rows(g: torch.Tensor) -> RowSet | None:
    """The rows of g (B, T, p) that are not exactly zero, where at least `ZERO_ROWS_MIN_FRACTION` of all
    rows are; None where fewer are, or off the CPU (the row counts are read on the host).

    A row with a nonzero first or last entry is nonzero (the probe: two elements per row, so a layer
    without zero rows costs next to nothing; first at 8 positions only). A row is dropped only once all
    of its entries are seen to be 0 (its min and its max; NaN propagates through both, so a NaN row is
    kept). The probes only decide whether to look further, never that a row is zero.
    """
    batch, positions = g.shape[0], g.shape[1]
    rows = batch * positions
    if g.device.type != "cpu" or rows == 0 or g.shape[-1] == 0:
        return None
    # A first look at a few positions of every sample (every stride-th, at most 8: a view, no index
    # tensor): a layer where none of them can be a zero row is left alone after reading 2·B·8 elements.
    sampled = g[:, :: max(1, -(-positions // 8))]
    if bool(((sampled[..., 0] != 0) | (sampled[..., -1] != 0)).all()):
        return None
    probe = (g[..., 0] != 0) | (g[..., -1] != 0)
    if rows - int(probe.sum()) < ZERO_ROWS_MIN_FRACTION * rows:
        return None  # the probe alone shows too few zero rows: nothing more is read
    if g.numel() <= _FULL_CHECK_ELEMENTS:
        keep = (g.amax(dim=-1) != 0) | (g.amin(dim=-1) != 0)
    else:
        keep = _span_mask(g, probe)
    if rows - int(keep.sum()) < ZERO_ROWS_MIN_FRACTION * rows:
        return None
    return RowSet.of(keep)


def _span_mask(g: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of each sample's span of rows outside which g's rows are checked to be all zero.

    The span first runs from the first to the last probed-nonzero row; the rows before and after it are
    read (views, no copy) and the span widened to any of them that is not all zero.
    """
    positions = g.shape[1]
    order = torch.arange(positions)
    first = torch.where(probe, order, positions).amin(dim=1).tolist()
    last = torch.where(probe, order, -1).amax(dim=1).tolist()
    spans = []
    for i, (lo, hi) in enumerate(zip(first, last)):
        lo, hi = (0, 0) if hi < lo else (lo, hi + 1)  # no probed row: every row is checked below
        if hi < positions and not _all_zero(g[i, hi:]):
            found = _nonzero_row_indices(g[i, hi:])
            lo, hi = (lo if lo < hi else hi + found[0]), hi + found[-1] + 1
        if lo > 0 and not _all_zero(g[i, :lo]):
            lo = _nonzero_row_indices(g[i, :lo])[0]
        spans.append((lo, hi))
    bounds = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    return (order >= bounds[:, :1]) & (order < bounds[:, 1:])


def _all_zero(rows: torch.Tensor) -> bool:
    low, high = torch.aminmax(rows)
    return bool((low == 0) & (high == 0))


def _nonzero_row_indices(rows: torch.Tensor) -> list[int]:
    """Indices of the rows of a (n, p) tensor that are not all zero (NaN counts as nonzero)."""
    return ((rows.amax(dim=-1) != 0) | (rows.amin(dim=-1) != 0)).nonzero().flatten().tolist()


# Ways to the ghost double sum where g has zero rows (`gram_method`).
DENSE, ONE_PAIR, PER_SAMPLE = "dense", "one_pair", "per_sample"
_FORCE_GRAM: str | None = None  # tests only: one of the three, whatever the costs


def gram_method(rows: RowSet, positions: int, width: int) -> tuple[str, int, int]:
    """The cheapest way to the ghost double sum of a layer with zero rows: (method, multiply-adds, scratch
    elements), chosen by multiply-adds + κ·scratch as `branch_costs` prices a branch (each torch call of
    the per-sample loop counted as `_CALL_COST_MACS`), for features of width d + p:

    * DENSE: the B (T × T) Gram pairs of `ghost_sq_norms` over every row, before the zero rows are dropped
      (cheap for a narrow layer);
    * ONE_PAIR: one N × N pair over the kept rows, its block diagonal summed per sample;
    * PER_SAMPLE: an n_i × n_i pair per sample (a vocabulary head: no T² or N² term over p).
    """
    total = rows.index.numel()
    options = {
        DENSE: (rows.batch * positions * positions * width, 2 * rows.batch * positions * positions),
        ONE_PAIR: (total * total * width, 2 * total * total),
        PER_SAMPLE: (rows.within * width + 4 * rows.batch * _CALL_COST_MACS, 2 * rows.within),
    }
    method = _FORCE_GRAM or min(options, key=lambda m: options[m][0] + SCRATCH_ELEMENT_COST * options[m][1])
    return method, *options[method]


def ragged_ghost_sq_norms(x: torch.Tensor, g: torch.Tensor, rows: RowSet, one_pair: bool) -> torch.Tensor:
    """`ghost_sq_norms` on kept rows x (N, d), g (N, p): Σ_{t,s} (x_t·x_s)(g_t·g_s) within each sample."""
    if one_pair:
        # One N × N Gram pair; its block-diagonal part (pairs of rows of one sample) summed per sample.
        products = (x @ x.T) * (g @ g.T)
        same = rows.sample[:, None] == rows.sample[None, :]
        return x.new_zeros(rows.batch).index_add_(0, rows.sample, (products * same).sum(dim=1))
    norms = [
        ((xi @ xi.T) * (gi @ gi.T)).sum() if len(xi) else x.new_zeros(())
        for xi, gi in zip(x.split(rows.counts), g.split(rows.counts))
    ]
    return torch.stack(norms)


def ragged_clipped_sum(x: torch.Tensor, g: torch.Tensor, rows: RowSet, clip: torch.Tensor) -> MatmulSum:
    """`matrix_clipped_sum` on kept rows: gᵀ (c ⊙ x), each row scaled by its sample's clip factor."""
    scale = clip.index_select(0, rows.sample)[:, None]
    if x.shape[-1] <= g.shape[-1]:
        x = x * scale
    else:
        g = g * scale
    return MatmulSum(g.T, x)


def matrix_clipped_sum(x: torch.Tensor, g: torch.Tensor, clip: torch.Tensor) -> MatmulSum:
    """Σ_i c_i Σ_t g_{i,t} x_{i,t}ᵀ as one (p × d) matmul, the clip factors applied to the narrower side."""
    if x.shape[-1] <= g.shape[-1]:
        x = x * clip[:, None, None]
    else:
        g = g * clip[:, None, None]
    return MatmulSum(g.reshape(-1, g.shape[-1]).transpose(0, 1), x.reshape(-1, x.shape[-1]))


@dataclass
class MatrixLayer:
    """A layer seen as y = W x + b on (B, T, ·) tensors: inputs, output grads, per-sample bias grads.

    `plan` picks the weight's branch (see the module docstring); without it, `sq_norms` plans with the
    default budget. With the instantiated branch, `sq_norms` replaces x and g by the per-sample weight
    gradients, which `clipped_sums` contracts with the clip factors and then drops.
    """

    x: torch.Tensor | None
    g: torch.Tensor | None
    bias_grads: torch.Tensor | None  # (B, p) = Σ_t g_t, when the bias is trainable (formed by `sq_norms`)
    branch: str | None = None
    weight_grads: torch.Tensor | None = None  # (B, p, d) per-sample G_i, instantiated branch only
    rows: RowSet | None = None  # g's rows that are not all zero, where enough are (found by `plan`)
    compacted: bool = False  # ghost branch with `rows`: x is (N, d) and g (N, p), the kept rows only
    batch: int = 0
    has_bias: bool = False

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> MatrixLayer:
        return cls(x, g, None, batch=x.shape[0], has_bias=trainable(module, "bias"))

    def plan(
        self,
        module: nn.Module,
        memory_budget_bytes: float,
        force: str | None = None,
        held_budget_bytes: float = math.inf,
    ) -> dict | None:
        """Choose the weight's branch; the decision record for the Clipper's branch table (None: no weight).

        Where g has enough zero rows (`nonzero_rows`), the ghost branch's cost is that of the kept rows."""
        if not trainable(module, "weight"):
            return None
        batch, positions, d = self.x.shape
        p = self.g.shape[-1]
        costs = branch_costs(batch, positions, d, p, self.x.element_size())
        self.rows = nonzero_rows(self.g)
        if self.rows is not None:  # the kept rows' Gram pairs and clipped sum, and their compacted copies
            _, gram_flops, gram_scratch = gram_method(self.rows, positions, d + p)
            kept = self.rows.index.numel()
            costs[GHOST]["flops"] = gram_flops + kept * p * d
            costs[GHOST]["cost"] = costs[GHOST]["flops"] + SCRATCH_ELEMENT_COST * (gram_scratch + kept * (d + p))
        self.branch = choose_branch(costs, memory_budget_bytes, force, held_budget_bytes)
        return {
            "B": batch,
            "T": positions,
            "d": d,
            "p": p,
            "branch": self.branch,
            "rows_kept": batch * positions if self.rows is None else self.rows.index.numel(),
            "ghost_flops": costs[GHOST]["flops"],
            "instantiated_flops": costs[INSTANTIATED]["flops"],
            "ghost_cost": costs[GHOST]["cost"],
            "instantiated_cost": costs[INSTANTIATED]["cost"],
            "ghost_bytes": costs[GHOST]["bytes"],
            "instantiated_bytes": costs[INSTANTIATED]["bytes"],
            "extra_bytes": costs[self.branch]["bytes"],
            "held_bytes": costs[self.branch]["held"],
            "memory_budget_bytes": memory_budget_bytes,
            "held_budget_bytes": held_budget_bytes,
        }

    def sq_norms(self, module: nn.Module) -> torch.Tensor:
        total = (self.x if self.x is not None else self.weight_grads).new_zeros(self.batch)
        weight = trainable(module, "weight")
        if weight and self.branch is None:
            self.plan(module, DEFAULT_MEMORY_BUDGET_BYTES)
        if weight and self.branch == GHOST:
            total += self._ghost_sq_norms()
            self._form_bias_grads()
        else:
            self._form_bias_grads()
            if weight:
                if self.weight_grads is None:
                    self.weight_grads = per_sample_grads(self.x, self.g)
                    self.x = self.g = None  # only G is needed from here on
                total += flat_sq_norms(self.weight_grads)
        if self.bias_grads is not None:
            total += self.bias_grads.pow(2).sum(dim=1)
        return total

    def _ghost_sq_norms(self) -> torch.Tensor:
        """The weight's ghost norms; where g has zero rows, x and g are left holding only the others."""
        if self.rows is None:
            return ghost_sq_norms(self.x, self.g)
        if self.compacted:  # a second call: only the kept rows are left
            return ragged_ghost_sq_norms(self.x, self.g, self.rows, one_pair=False)
        method, *_ = gram_method(self.rows, self.x.shape[1], self.x.shape[-1] + self.g.shape[-1])
        dense = ghost_sq_norms(self.x, self.g) if method == DENSE else None
        # Keep only the rows that can contribute (see the module docstring).
        self.x, self.g, self.compacted = self.rows.compact(self.x), self.rows.compact(self.g), True
        if dense is not None:
            return dense
        return ragged_ghost_sq_norms(self.x, self.g, self.rows, one_pair=method == ONE_PAIR)

    def _form_bias_grads(self) -> None:
        """Σ_t g_t per sample (over the kept rows where compacted)."""
        if self.has_bias and self.bias_grads is None:
            if self.compacted:
                self.bias_grads = self.g.new_zeros(self.batch, self.g.shape[-1]).index_add_(0, self.rows.sample, self.g)
            elif self.g.device.type == "cpu":  # 1ᵀ g as a batched matmul: ~1.6x faster than sum(dim=1) there
                self.bias_grads = torch.bmm(self.g.new_ones(self.batch, 1, self.g.shape[1]), self.g).squeeze(1)
            else:
                self.bias_grads = self.g.sum(dim=1)

    def clipped_sums(self, module: nn.Module, clip: torch.Tensor) -> dict[str, LazySum]:
        """The weight's and bias's clipped sums, as products the Clipper adds into `.grad` in place. What this
        layer held (x and g, or G) is handed over: it is freed once the caller has accumulated the sums."""
        sums = {}
        if trainable(module, "weight"):
            if self.weight_grads is not None:
                sums["weight"] = WeightedSum(clip, self.weight_grads)
            elif self.compacted:
                sums["weight"] = ragged_clipped_sum(self.x, self.g, self.rows, clip)
            else:
                sums["weight"] = matrix_clipped_sum(self.x, self.g, clip)
        if self.bias_grads is not None:
            sums["bias"] = WeightedSum(clip, self.bias_grads)
        self.x = self.g = self.weight_grads = self.bias_grads = None
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

    def plan(self, module, prepared: MatrixLayer, memory_budget_bytes, held_budget_bytes=math.inf) -> dict | None:
        return prepared.plan(module, memory_budget_bytes, self.force_branch, held_budget_bytes)

    def sq_norms(self, module, prepared: MatrixLayer) -> torch.Tensor:
        return prepared.sq_norms(module)

    def clipped_sums(self, module, prepared: MatrixLayer, clip):
        return prepared.clipped_sums(module, clip)
