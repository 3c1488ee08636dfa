"""Per-sample clipped gradient sums with ONE backward pass (book-keeping; Bu et al. 2023).

Forward hooks keep each covered layer's input and output. `Clipper.backward(losses)` back-propagates
Σ_i ℓ_i to those *outputs* only (``torch.autograd.backward(..., inputs=<their gradient edges>)``), so
parameter gradients are never formed by autograd (the engine prunes every edge into a weight). Each
output's gradient g reaches a hook on that output as soon as the backward has formed it; there, while
g is fresh in cache, the layer's handler turns (x, g) into per-sample squared norms and whatever its
clipped sum will need, and g is dropped as a plain backward drops it (see `_backward_to_outputs`).
The norms summed over all layers are ‖∇ℓ_i‖² over all trainable parameters (invariant 2: one norm
for the whole model). With c_i = min(1, C/‖∇ℓ_i‖), each handler then forms Σ_i c_i ∇ℓ_i directly
(for a Linear: one matmul, or a contraction of the per-sample gradients it kept) and adds it to
`.grad`, so successive micro-batches accumulate (Abadi et al. 2016, DP-SGD clipping).

The clipper's own maths (the backward to the layer outputs, the norms, the clip factors and the
clipped sums) runs with autocast disabled, in at least float32 (float64 when the parameters are), on
the forward's captured activations cast to that dtype: the bound C must hold whatever precision the
caller's forward used, and a bf16 norm or sum matmul could let one example's contribution exceed it.

Activation checkpointing (timm's ``set_grad_checkpointing``, ``Captioner.set_grad_checkpointing``) is
supported in its non-reentrant form (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``):
the first forward runs with autograd on, so every covered layer is captured as usual and its output
edge is a node of the real graph; the recomputation that the backward triggers inside each checkpointed
region fires the forward hooks a second time, and those calls are ignored (see `_recording`). The
reentrant form is refused (`_refuse_reentrant_checkpointing`): its first forward runs under no_grad,
so the layers inside it would leave no capture and their parameters no gradient.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dpcap.errors import PrivacyError

from .layers import Capture, LayerRegistry, default_registry
from .layers.base import DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_STEP_MEMORY_BUDGET_BYTES, LazySum
from .validate import plan_layers

try:  # timm's global switch between reentrant and non-reentrant checkpointing (TIMM_REENTRANT_CKPT)
    from timm.layers import use_reentrant_ckpt as _timm_reentrant
except ImportError:  # a timm without the switch: its checkpoint helpers take use_reentrant per call only

    def _timm_reentrant() -> bool:
        return False


# Added to the norm before dividing so a zero gradient gives a finite clip factor of 1.
_NORM_EPS = 1e-6


class Clipper:
    """Computes Σ_i min(1, C/‖g_i‖)·g_i into `.grad` of every trainable parameter of `model`."""

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        *,
        registry: LayerRegistry | None = None,
        memory_budget_bytes: float = DEFAULT_MEMORY_BUDGET_BYTES,
        step_memory_budget_bytes: float = DEFAULT_STEP_MEMORY_BUDGET_BYTES,
    ) -> None:
        """`memory_budget_bytes`: extra scratch bytes one layer may use for a faster exact branch (a Linear's
        per-sample gradients instead of its ghost norm; see `layers/linear.py`).
        `step_memory_budget_bytes`: what the layers of one micro-batch may hold together beyond the
        activations and output gradients they replace, from their norms to their clipped sums (the
        instantiated per-sample gradients), handed out in the order the layers' gradients arrive. 0 for
        either takes every layer's smallest-memory branch."""
        if not max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        for name, value in (
            ("memory_budget_bytes", memory_budget_bytes),
            ("step_memory_budget_bytes", step_memory_budget_bytes),
        ):
            if not value >= 0:
                raise PrivacyError(f"{name} must be >= 0, got {value}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.memory_budget_bytes = memory_budget_bytes
        self.step_memory_budget_bytes = step_memory_budget_bytes
        self._branches: list[dict] = []
        self._layers = plan_layers(model, registry or default_registry())
        self._captures: dict[int, list[Capture]] = defaultdict(list)
        # Layers that ran with autograd off since the last clear: the trigger of the reentrant check.
        self._ungraded: set[int] = set()
        self._differentiating = False  # True while our own backward runs (see `_recording`)
        # Bumped by `clear`: the output-gradient hooks of forwards recorded before it do nothing.
        self._generation = 0
        self._leaf_output = False  # a captured output is a leaf tensor (see `_backward_to_outputs`)
        self._step: _Step | None = None  # the backward in progress
        self._hooks = [
            handler.tap(module).register_forward_hook(self._make_hook(index))
            for index, (_, module, handler) in enumerate(self._layers)
        ]

    def _label(self, index: int) -> str:
        name, module, _ = self._layers[index]
        return f"{name or '<root>'} ({type(module).__name__})"

    def _make_hook(self, index: int):
        _, planned, handler = self._layers[index]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._recording():
                return
            if not torch.is_grad_enabled():
                self._ungraded.add(index)
                return
            # Only a forward that will be differentiated needs its activations kept.
            if isinstance(output, torch.Tensor) and output.requires_grad:
                reason = handler.check_call(planned, inputs, output)
                if reason:
                    raise PrivacyError(f"cannot clip per sample: {self._label(index)}: {reason}")
                detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
                edge = get_gradient_edge(output)
                self._captures[index].append(Capture(detached, edge, output.shape, output.dtype))
                slot = len(self._captures[index]) - 1
                if output.grad_fn is None:
                    self._leaf_output = True
                output.register_hook(self._make_grad_hook(index, slot, self._generation))

        return hook

    def _make_grad_hook(self, index: int, slot: int, generation: int):
        """The hook on a captured output: hands its gradient to the clipper's backward in progress, if any.

        A backward that is not the clipper's (or a graph left over from before `clear`) finds no step of
        this generation, and the hook does nothing. It never changes the gradient (returns None)."""

        def hook(grad: torch.Tensor) -> None:
            step = self._step
            if step is not None and step.by_hooks and generation == self._generation:
                step.arrive(index, slot, grad)

        return hook

    def _recording(self) -> bool:
        """False for forward calls made by a backward: activation checkpointing's recomputation.

        A non-reentrant checkpoint re-runs its region's forward when the backward first unpacks a tensor
        saved there, with autograd on, so these hooks fire again; recording that call would append a
        second capture per layer (and a gradient edge of a graph that is thrown away). The capture of
        the first forward is the one that counts: the output gradients the backward computes through
        the recomputed tensors are the gradients at that forward's values, because the recomputation
        repeats it exactly: torch.utils.checkpoint restores the CPU and device RNG states
        (preserve_rng_state=True, so a dropout mask would be redrawn identically; dpcap's models have
        no dropout anyway) and the autocast state of the first forward (the clipper's backward runs
        with autocast off, the recomputation under the forward's bf16 autocast), and its default
        determinism check refuses recomputed tensors whose shape, dtype or device differ.
        """
        return not self._differentiating and not _inside_backward()

    def branch_table(self) -> list[dict]:
        """Each layer's branch decision (name, B, T, d, p, branch, est. flops and extra bytes both ways)
        from the last backward that clipped anything; only layers whose handler has a choice appear."""
        return [dict(row) for row in self._branches]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clear(self) -> None:
        """Drop kept activations (e.g. after a forward that will not be back-propagated)."""
        self._captures.clear()
        self._ungraded.clear()
        self._leaf_output = False
        self._generation += 1

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
        self._refuse_reentrant_checkpointing(losses)
        with _autocast_disabled(losses.device.type):
            return self._clip_and_accumulate_exact(losses, _compute_dtype(self.trainable_parameters(), losses))

    def _clip_and_accumulate_exact(self, losses: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch = losses.shape[0]
        active = [i for i in range(len(self._layers)) if self._captures.get(i)]
        for i in active:  # refuse before anything reaches `.grad`
            for capture in self._captures[i]:
                if len(capture.output_shape) == 0 or capture.output_shape[0] != batch:
                    raise PrivacyError(
                        f"cannot clip per sample: {self._label(i)}: output of shape {tuple(capture.output_shape)} "
                        f"does not have the batch ({batch} samples) as its first dimension"
                    )
        step = _Step(self, active, batch, dtype, losses.device)
        self._step = step
        try:
            self._backward_to_outputs(losses, step)
            for i in active:  # layers whose outputs got no gradient (or not all of theirs): zeros
                if i in step.pending:
                    step.fill_missing(i)
        finally:
            self._step = None
        self._branches = [step.decisions[i] for i in active if i in step.decisions]
        norms = step.sq_norms.sqrt()
        clip = (self.max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)
        prepared = step.prepared
        del step
        for i in active:
            _, module, handler = self._layers[i]
            # Pop as we go: each layer's activations and output gradients (or per-sample gradients), which
            # its sums hold until they are added, are freed once used.
            sums = handler.clipped_sums(module, prepared.pop(i), clip)
            for name in list(sums):
                _accumulate(getattr(module, name), sums.pop(name))
        self._ensure_grads()
        return norms

    def _backward_to_outputs(self, losses: torch.Tensor, step: _Step) -> None:
        """One backward of Σ_i ℓ_i to the captured outputs, each layer's norm formed as its gradients arrive.

        `torch.autograd.backward(..., inputs=edges)` runs only the part of the graph that leads to the
        captured outputs (no edge into a weight, so autograd forms no parameter gradient) and keeps none
        of the gradients it passes: each arrives at its output's hook (`_make_grad_hook`), where the
        layer's handler turns it into that layer's per-sample norms and what its clipped sum needs, while
        it is fresh in cache, and it is dropped, as a plain backward drops it. A leaf tensor as a captured
        output (an identity-like tapped module fed a leaf) would have its `.grad` accumulated that way, so
        then the gradients are asked of `torch.autograd.grad` instead and handed over after it returns.
        """
        slots = [(i, slot) for i in step.pending for slot in range(len(self._captures[i]))]
        outputs = [self._captures[i][slot].output_edge for i, slot in slots]
        if not outputs:
            return
        step.by_hooks = not self._leaf_output
        self._differentiating = True  # the checkpoint recomputation inside this backward is not recorded
        try:
            if step.by_hooks:
                torch.autograd.backward(losses.sum(), inputs=outputs)
            else:
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        finally:
            self._differentiating = False
        if not step.by_hooks:
            for (i, slot), grad in zip(slots, grads):
                if grad is not None:
                    step.arrive(i, slot, grad)

    def _refuse_reentrant_checkpointing(self, losses: torch.Tensor) -> None:
        """PrivacyError where reentrant activation checkpointing hides layers from the hooks.

        A reentrant checkpoint (``use_reentrant=True``; DeepSpeed's ``CheckpointFunction`` too) runs its
        first forward under no_grad inside an autograd.Function: the layers there record nothing, and
        their parameters are not edges of the graph. Clipping would give them a zero gradient (or stop
        on torch's "incompatible with .grad()"). Two checks: timm models switched to checkpointing while
        timm's global mode is reentrant (whatever the graph looks like: with a frozen stem the
        checkpoint node is not even in it), and, where a layer that owns trainable parameters ran with
        autograd off and left no capture, a reentrant checkpoint node in the loss's graph.
        """
        if _timm_reentrant():
            for name, module in self.model.named_modules():
                if getattr(module, "grad_checkpointing", False) is True and type(module).__module__.startswith("timm."):
                    raise PrivacyError(
                        f"cannot clip per sample: {name or '<root>'} ({type(module).__name__}) uses timm's reentrant "
                        "gradient checkpointing (TIMM_REENTRANT_CKPT / timm.layers.set_reentrant_ckpt(True)): its "
                        "layers run under no_grad and would get no per-sample gradient; use the non-reentrant "
                        "default (set_reentrant_ckpt(False))"
                    )
        missing = sorted(i for i in self._ungraded if not self._captures.get(i))
        if missing and losses.grad_fn is not None and _has_reentrant_checkpoint(losses.grad_fn):
            labels = ", ".join(self._label(i) for i in missing[:3]) + (", …" if len(missing) > 3 else "")
            raise PrivacyError(
                f"cannot clip per sample: reentrant activation checkpointing (use_reentrant=True) in the loss's "
                f"graph; {labels} ran under no_grad inside it and would get no per-sample gradient. "
                "Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            )

    def _ensure_grads(self) -> None:
        """Parameters unused by this forward still get a (zero) gradient, so noise reaches every one."""
        for p in self.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)


class _Step:
    """One `Clipper.backward`: the output gradients of each layer as they arrive, and what is made of them.

    When every capture of a layer has its gradient, the layer's handler prepares it (activations and
    gradients cast to the clipper's dtype), plans its branch and adds its per-sample squared norms to
    the total; what the clipped sum needs is kept until the clip factors are known. The book-keeping is
    locked: autograd runs the hooks of a graph that spans devices on one thread per device.
    """

    def __init__(self, clipper: Clipper, active: list[int], batch: int, dtype: torch.dtype, device) -> None:
        self.clipper, self.dtype = clipper, dtype
        self.by_hooks = True  # False: the gradients are handed over by `_backward_to_outputs`, hooks ignored
        self.pending: dict[int, list[torch.Tensor | None]] = {i: [None] * len(clipper._captures[i]) for i in active}
        self.waiting = {i: len(slots) for i, slots in self.pending.items()}
        self.prepared: dict[int, object] = {}
        self.decisions: dict[int, dict] = {}
        self.sq_norms = torch.zeros(batch, dtype=dtype, device=device)
        self.held_left = clipper.step_memory_budget_bytes  # of the micro-batch's budget (see `_prepare`)
        self._lock = threading.Lock()

    def arrive(self, index: int, slot: int, grad: torch.Tensor) -> None:
        with self._lock:
            slots = self.pending.get(index)
            if slots is None or slots[slot] is not None:
                return  # already prepared, or this output's gradient seen once (a second hook on one tensor)
            slots[slot] = grad
            self.waiting[index] -= 1
            if self.waiting[index]:
                return
            grads = self.pending.pop(index)
        self._prepare(index, grads)

    def fill_missing(self, index: int) -> None:
        """Zeros for the outputs of `index` that no gradient reached (unused by the loss), then prepare it."""
        captures = self.clipper._captures[index]
        grads = [
            self.sq_norms.new_zeros(capture.output_shape, dtype=self.dtype) if grad is None else grad
            for grad, capture in zip(self.pending.pop(index), captures)
        ]
        self._prepare(index, grads)

    def _prepare(self, index: int, grads: list[torch.Tensor]) -> None:
        clipper = self.clipper
        name, module, handler = clipper._layers[index]
        grads = [g.to(self.dtype) for g in grads]
        captures = [_captured_as(c, self.dtype) for c in clipper._captures.pop(index)]
        prepared = handler.prepare(module, captures, grads)
        del captures, grads
        with self._lock:  # a plan takes its held bytes from what is left: one layer at a time
            decision = handler.plan(module, prepared, clipper.memory_budget_bytes, held_budget_bytes=self.held_left)
            if decision is not None:
                self.held_left -= decision.get("held_bytes", 0)
        norms = handler.sq_norms(module, prepared)
        with self._lock:
            if decision is not None:
                self.decisions[index] = {"name": name or "<root>", **decision}
            self.sq_norms += norms
            self.prepared[index] = prepared


def _accumulate(param: nn.Parameter, value: torch.Tensor | LazySum) -> None:
    if isinstance(value, LazySum):
        grad = param.grad
        if grad is not None and grad.dtype == value.dtype and grad.is_contiguous():
            value.add_to(grad)  # the earlier micro-batches' sum: added in the pass that forms this one
            return
        value = value.materialize()
    value = value.to(param.dtype).reshape(param.shape)
    if param.grad is None:
        param.grad = value
    else:
        param.grad.add_(value)


def _inside_backward() -> bool:
    """Whether this thread is executing an autograd backward (any, not only the clipper's own)."""
    current = getattr(torch._C, "_current_graph_task_id", None)  # what torch.utils.checkpoint itself reads
    return current is not None and current() != -1


def _has_reentrant_checkpoint(root: object) -> bool:
    """Whether the autograd graph below `root` holds a reentrant checkpoint node.

    torch's reentrant checkpoint is an autograd.Function named ``CheckpointFunction`` (its node
    ``CheckpointFunctionBackward``), as is DeepSpeed's activation checkpointing. Only walked when a trainable layer
    ran with autograd off, so the common step pays nothing.
    """
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _compute_dtype(params: list[nn.Parameter], losses: torch.Tensor) -> torch.dtype:
    """float32, or float64 when a trainable parameter (or the loss) is float64: never bf16/fp16."""
    dtype = torch.float32
    for tensor in (*params, losses):
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@contextlib.contextmanager
def _autocast_disabled(device_type: str) -> Iterator[None]:
    """Autocast off for cpu, cuda and the losses' device, whatever the caller has enabled."""
    kinds = {"cpu", "cuda"} | ({device_type} if torch.amp.is_autocast_available(device_type) else set())
    with contextlib.ExitStack() as stack:
        for kind in sorted(kinds):
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def _captured_as(capture: Capture, dtype: torch.dtype) -> Capture:
    """The capture with its floating-point inputs in `dtype` (token ids stay integers); itself if they are."""
    if all(not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype for t in capture.inputs):
        return capture
    inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in capture.inputs)
    return replace(capture, inputs=inputs)
