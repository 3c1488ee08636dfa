"""The DeepSpeed back-end (ZeRO stage 0, 1, 2): the same noisy logical update as the DDP path (invariant 3).

Like `reduce.py`, this is one of the few modules that touch torch.distributed or DeepSpeed; it is
imported only when `train.backend` is "deepspeed".

How the clipped sums reach DeepSpeed. The clipper writes Σ_i c_i g_i straight into `.grad` (its one
backward asks autograd for gradients of layer *outputs*), so DeepSpeed's per-parameter gradient hooks,
which ZeRO-2 uses to reduce-scatter each gradient as autograd accumulates it, never fire. Rather than
drive DeepSpeed's partition book-keeping by hand, each rank hands its local gradient G_r to the engine
the way the engine expects gradients: as the gradient of the linear surrogate

    L_r(θ) = Σ_p ⟨θ_p, G_r,p⟩,        ∇_θ L_r = G_r  (exactly: the backward of a dot product is 1·G),

through the engine's own forward, backward and step. That costs one O(P) dot product per parameter
tensor, not a second pass through the model, and every ZeRO stage then reduces as designed: stage 0
all-reduces, stage 1 reduces at the step boundary, stage 2 reduce-scatters from its hooks.

Noise exactly once, normalised by qN. Rank 0 adds N(0, σ²C²) to its local sum before the reduction
(like `DataParallelReducer`), every rank divides its share by the expected batch qN, and DeepSpeed is
configured to SUM over ranks (`gradient_allreduce_op: "sum"`; its default averages) with its gradient
clipping off (its default clips the update to norm 1.0) and one accumulation step (so nothing is
divided by an accumulation count):

    Σ_r G_r/qN  with  G_0 ← G_0 + N(0, σ²C²)   =   (Σ_r Σ_i c_i g_i + N(0, σ²C²)) / qN.

Why rank 0 and not each rank on the partition it owns after the reduce-scatter (DESIGN §6 allows
both; the union is one draw either way): it needs nothing of DeepSpeed's partition layout (alignment
padding, parameters straddling partitions) or of its internal gradient buffers; it consumes the same
generator in the same parameter order as the 1-process and DDP paths, so a fixed test seed gives the
same parameters on any world size; and drawing P normals on one device is O(P), negligible next to
a logical step. It costs no extra memory either: the clipper already holds the full local gradient.

Memory. Each rank still accumulates its full local clipped sum in `.grad` over its micro-batches, so
ZeRO-2 saves what ZeRO-1 saves here (optimizer state, fp32 gradient partitions), not that accumulator.

Checkpoints. Under ZeRO-1/2 the AdamW moments live in flat per-rank partitions. `state_dict()` gathers
them per parameter with DeepSpeed's `safe_get_full_optimizer_state` (a collective: every rank calls
it) into the layout `state.optimizer_tensors` writes for the DDP path, so optimizer.safetensors does
not depend on the back-end, the ZeRO stage or the world size; restoring scatters it back with
`safe_set_full_optimizer_state`. Nothing goes through DeepSpeed's own (pickled) checkpoint files.

Launch. DeepSpeed requires LOCAL_RANK in the environment; it is exported from the `World` that
world.py derived from the launcher (srun sets SLURM_LOCALID instead). It adopts the process group
world.py made; a 1-process run joins a 1-rank group here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_optimizer_state,
    safe_set_full_optimizer_state,
)
from torch import nn

from dpcap.errors import ConfigError, DataError
from dpcap.privacy.noise import add_gaussian_noise_
from dpcap.train.reduce import _BUCKET_ELEMENTS, DataParallelReducer
from dpcap.train.world import World

__all__ = ["DeepSpeedOptimizer", "DeepSpeedReducer", "deepspeed_backend", "deepspeed_config"]

ZERO_STAGES = (0, 1, 2)


def deepspeed_config(zero_stage: int, micro_batch_size: int) -> dict:
    """The engine configuration; each DP-relevant default of DeepSpeed is overridden explicitly."""
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(f"train.zero_stage must be one of {list(ZERO_STAGES)}, got {zero_stage!r}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,  # book-keeping only: batches come from the sampler
        "gradient_accumulation_steps": 1,  # one surrogate backward per logical step: nothing divided by a count
        "gradient_allreduce_op": "sum",  # the default "mean" would divide the noisy sum by the world size
        "gradient_clipping": 0.0,  # the default 1.0 would clip the noisy update itself
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "communication_data_type": "fp32",  # sums of clipped gradients and noise stay in float32
        "bf16": {"enabled": False},  # train.precision=bf16 is autocast: weights, sums, noise, moments stay fp32
        "zero_allow_untested_optimizer": True,  # ZeRO runs any torch optimizer on its flat fp32 partitions
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": _BUCKET_ELEMENTS,
            "allgather_bucket_size": _BUCKET_ELEMENTS,
            "overlap_comm": False,
        },
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }


class _LinearSurrogate(nn.Module):
    """Wraps the model for the engine; forward(grads) = Σ_p ⟨θ_p, G_p⟩, whose gradient is G exactly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        params = self.trainable()
        if len(params) != len(grads):
            raise ValueError(f"{len(grads)} gradients for {len(params)} trainable parameters")
        return torch.stack([torch.dot(p.reshape(-1), g.detach().reshape(-1)) for p, g in zip(params, grads)]).sum()


class DeepSpeedReducer(DataParallelReducer):
    """Noise on rank 0, ÷ qN everywhere, then the engine SUM-reduces (all-reduce or reduce-scatter)."""

    def __init__(self, engine, surrogate: _LinearSurrogate, zero_stage: int) -> None:
        super().__init__()
        self._engine, self._surrogate = engine, surrogate
        self.shards_optimizer_state = zero_stage > 0  # checkpointing gathers it: every rank must join

    def finish(
        self, params, *, noise_std: float, generator: torch.Generator | None, expected_batch_size: float
    ) -> None:
        params = list(params)
        if [id(p) for p in params] != [id(p) for p in self._surrogate.trainable()]:
            raise ValueError("finish() must get the model's trainable parameters, in order")
        grads = [p.grad for p in params]
        if noise_std > 0 and self.rank == 0:  # the only draw of the step, before the reduction
            add_gaussian_noise_(grads, std=noise_std, generator=generator)
        for grad in grads:
            grad.div_(expected_batch_size)
        for p in params:
            p.grad = None  # the engine's backward produces the gradient afresh (and fires its hooks)
        surrogate = self._engine(grads)
        del grads  # each G_p is now held only by its dot product, freed once that node has run
        self._engine.backward(surrogate, scale_wrt_gas=False)


class DeepSpeedOptimizer:
    """What the loop needs of an optimizer (param_groups, zero_grad, step, state_dict), run by the engine.

    `param_groups` are the wrapped torch optimizer's: under ZeRO each holds one flat fp32 partition but
    keeps its hyper-parameters, so the loop's learning-rate schedule writes `group["lr"]` as before.
    """

    def __init__(self, engine, base: torch.optim.Optimizer, groups: list[list[nn.Parameter]], zero_stage: int):
        self._engine, self._base, self._groups, self.zero_stage = engine, base, groups, zero_stage

    @property
    def param_groups(self) -> list[dict]:
        return self._base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params in self._groups:
            for p in params:
                p.grad = None

    def step(self) -> None:
        self._engine.step()

    def state_dict(self) -> dict:
        """Per-parameter state numbered like torch's `Optimizer.state_dict()`; collective under ZeRO-1/2."""
        if self.zero_stage == 0:
            return self._base.state_dict()
        state, index = {}, 0
        for group, params in zip(self._base.param_groups, self._groups):
            flat = group["params"][0]
            flat_state = self._base.state.get(flat, {})
            if flat_state:
                # DeepSpeed links each parameter to its slices of the state once, right after the first
                # group's first step, when later groups have no state yet: link again, now that all have.
                lazy_init_hp_params_optimizer_state(params, flat, self._base.state)
                for offset, p in enumerate(params):
                    state[index + offset] = {key: _full_state(p, key, value) for key, value in flat_state.items()}
            index += len(params)
        return {"state": state, "param_groups": self._base.state_dict()["param_groups"]}


def _full_state(param: nn.Parameter, key: str, value):
    """The whole tensor of one parameter's state (every rank contributes its fragment); "step" is shared."""
    if key == "step":
        return value.detach().clone()
    return safe_get_full_optimizer_state(param, key).detach().clone()


def _take_state(optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]]) -> list[list[dict]]:
    """Remove the per-parameter state (e.g. just loaded from a checkpoint) before ZeRO re-groups the params."""
    taken = [[dict(optimizer.state.get(p, {})) for p in params] for params in groups]
    optimizer.state.clear()
    return taken


def _restore_state(base: torch.optim.Optimizer, groups: list[list[nn.Parameter]], taken: list[list[dict]]) -> None:
    """Scatter per-parameter state into the flat partitions (each rank keeps its own fragments).

    Follows torch's convention that "step" is one scalar per parameter (here, per group) and every
    other key is a tensor shaped like its parameter.
    """
    for group, params, entries in zip(base.param_groups, groups, taken):
        present = [entry for entry in entries if entry]
        if not present:
            continue
        if len(present) != len(entries):
            raise DataError("the checkpoint's optimizer.safetensors holds state for only some parameters of a group")
        flat = group["params"][0]
        base.state[flat] = {
            key: value.detach().clone() if key == "step" else torch.zeros_like(flat)
            for key, value in present[0].items()
        }
        lazy_init_hp_params_optimizer_state(params, flat, base.state)
        for p, entry in zip(params, entries):
            for key, value in entry.items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(flat.device, flat.dtype), key)


def _export_local_rank(world: World) -> None:
    """DeepSpeed reads LOCAL_RANK from the environment (srun sets SLURM_LOCALID instead): export World's."""
    current = os.environ.get("LOCAL_RANK")
    if current is not None and int(current) != world.local_rank:
        raise ConfigError(
            f"LOCAL_RANK={current} in the environment but the launcher gave local rank {world.local_rank}"
        )
    os.environ["LOCAL_RANK"] = str(world.local_rank)


def deepspeed_backend(
    model: nn.Module, optimizer: torch.optim.Optimizer, world: World, *, zero_stage: int, micro_batch_size: int
) -> tuple[DeepSpeedReducer, DeepSpeedOptimizer]:
    """Wrap `model` and `optimizer` (its state possibly just loaded from a checkpoint) in a DeepSpeed engine."""
    config = deepspeed_config(zero_stage, micro_batch_size)
    _export_local_rank(world)
    if not dist.is_initialized():  # a 1-process run: world.py joins no group, DeepSpeed needs one
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            auto_mpi_discovery=False,
            init_method=f"tcp://{world.master_addr}:{world.master_port}",
            rank=world.rank,
            world_size=world.world_size,
        )
    groups = [list(group["params"]) for group in optimizer.param_groups]
    taken = _take_state(optimizer, groups) if zero_stage > 0 else None
    surrogate = _LinearSurrogate(model)
    engine, _, _, _ = deepspeed.initialize(model=surrogate, optimizer=optimizer, config=config)
    if taken is not None:
        _restore_state(optimizer, groups, taken)
    return DeepSpeedReducer(engine, surrogate, zero_stage), DeepSpeedOptimizer(engine, optimizer, groups, zero_stage)
