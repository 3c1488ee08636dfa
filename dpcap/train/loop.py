"""The run: privacy plan and budget guard, auto-resume, the step loop, checkpoints, signals.

Order of start-up follows big_vision: resume from the run folder's newest checkpoint that verifies
(LAST's, or the newest by step that does; see dpcap.train.state), else start from scratch. Each
logical step t draws its ids from the stateless Poisson sampler (seed, t), so a resumed run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpcap.config import RunConfig, TrainConfig, save_config, to_dict
from dpcap.data.index import ShardIndex
from dpcap.data.reader import (
    MicroBatchLoader,
    SampleReader,
    StepLoader,
    image_transform,
    rank_share,
    split_micro_batches,
)
from dpcap.data.sampler import PoissonSampler
from dpcap.errors import BudgetExceededError, ConfigError
from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper
from dpcap.privacy.accountant import Ledger
from dpcap.privacy.noise import secret_generator
from dpcap.train.lock import RunLock
from dpcap.train.metrics import MetricWriter, plot_curves, skipped_totals, truncate_metrics
from dpcap.train.plan import PrivacyPlan, resolve_plan
from dpcap.train.reduce import make_reducer
from dpcap.train.state import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_ema,
    optimizer_tensors,
    save_checkpoint,
    set_aside_newer_checkpoints,
)
from dpcap.train.step import logical_step, skipped_warning
from dpcap.train.tricks import EMA, StepTricks, augmentation_seed, load_public_weights
from dpcap.train.world import World, detect_world, device_for, init_distributed

# Relative slack on the ε budget: calibrate_sigma is exact to 1e-3 in σ, not in ε.
_BUDGET_RTOL = 1e-6


def lr_at(step: int, config: RunConfig) -> float:
    """Linear warm-up then cosine decay to lr·min_lr_ratio (step counts logical steps from 0)."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms' gains or 1-D vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=config.train.betas)


def clipper_for(model: torch.nn.Module, max_grad_norm: float, train: TrainConfig) -> Clipper:
    """The per-sample clipper with the run's memory budgets (``train.clip_layer_memory_mib``, ``…_step_…``)."""
    return Clipper(
        model,
        max_grad_norm,
        memory_budget_bytes=train.clip_layer_memory_mib * 2**20,
        step_memory_budget_bytes=train.clip_step_memory_mib * 2**20,
    )


def build_model(config: RunConfig):
    """The captioner of `config.model`, with `model.freeze` prefixes frozen (checked to match something)."""
    m = config.model
    model = create_captioner(m.size, seed=m.seed, **m.overrides())
    for prefix in m.freeze:
        matched = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        if not matched:
            raise ConfigError(f"model.freeze: no parameter name starts with {prefix!r}")
        for param in matched:
            param.requires_grad_(False)
    return model


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (slurm pre-emption) or SIGINT (Ctrl-C): the loop checkpoints at the next
    step boundary and the command exits 4 (resumable)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _noise_generator(plan_seed: int | None, step: int, device: torch.device, current: torch.Generator | None):
    """A secret generator per process (invariant 4); the insecure test seed is re-derived per step."""
    if plan_seed is None:
        return current if current is not None else secret_generator(device=device)
    return secret_generator(device=device, insecure_seed=(plan_seed * 1_000_003 + step) % 2**63)


def train(
    config: RunConfig,
    *,
    world: World | None = None,
    max_steps_this_run: int | None = None,
    allow_privacy_change: bool = False,
) -> dict:
    """Train (or resume) the run in `config.run_dir`; returns a summary dict (also the CLI's JSON).

    `allow_privacy_change`: resume even though the config changes the stored privacy plan (the
    change is recorded, see dpcap.train.plan); without it such a resume is refused (exit 2).
    """
    world = world or detect_world()
    init_distributed(world)
    lock = RunLock(config.run_dir) if world.is_main else None  # one trainer per run folder
    try:
        run = _start(config, world, allow_privacy_change, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    steps = config.train.steps
    end = steps if max_steps_this_run is None else min(steps, run.state.step + max_steps_this_run)
    try:
        stopped_by = _loop(run, end)
    finally:
        run.close()
    return _finish(run, stopped_by)


@dataclass
class _Run:
    """What the step loop needs, assembled by `_start`."""

    config: RunConfig
    world: World
    reducer: Any
    device: torch.device
    run_dir: Path
    plan: PrivacyPlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    ledger: Ledger
    ema: EMA | None
    anchors: list[torch.Tensor] | None
    reader: SampleReader
    public_reader: SampleReader | None
    clipper: Clipper | None = None
    sampler: PoissonSampler | None = None
    step_loader: StepLoader | None = None
    writer: MetricWriter | None = None
    generator: torch.Generator | None = None  # rank 0's secret noise generator (invariant 4)
    lock: RunLock | None = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.writer is not None:
            self.writer.close()
        if self.step_loader is not None:
            self.step_loader.close()


def _start(config: RunConfig, world: World, allow_privacy_change: bool, lock: RunLock | None) -> _Run:
    """Data, model, resume, privacy plan, readers; then the run folder, the backend and the logger.

    `lock` (rank 0) is taken before the run folder is read, or as soon as a fresh one is created.
    """
    index = ShardIndex(config.data.shards)
    device = device_for(world, config.train.device)
    model = build_model(config).to(device)
    model.set_grad_checkpointing(config.train.grad_checkpointing)  # training only: eval builds leave it off
    anchors = _public_warm_start(config, model)
    optimizer = make_optimizer(model, config)
    run_dir = Path(config.run_dir)
    reducer = make_reducer(world)
    if lock is not None and run_dir.is_dir():
        lock.acquire()
    checkpoint = latest_checkpoint(run_dir)
    state, ledger, stored_plan = _resume(checkpoint, model, optimizer, reducer, config)
    plan = resolve_plan(config, len(index), stored_plan, ledger, step=state.step, allow_change=allow_privacy_change)
    ema = None
    if config.train.ema_decay is not None:  # e_0 = θ_0, or the EMA saved with the checkpoint
        ema = EMA(model, config.train.ema_decay, load_ema(checkpoint) if checkpoint is not None else None)
    transform = image_transform(model.image_size, model.config.image_mean, model.config.image_std)
    tokenizer = get_tokenizer(config.model.size, **config.model.overrides())
    reader = SampleReader(config.data.shards, transform, tokenizer)
    public_reader = SampleReader(config.data.public_shards, transform, tokenizer) if config.data.public_shards else None
    run = _Run(
        config,
        world,
        reducer,
        device,
        run_dir,
        plan,
        model,
        optimizer,
        state,
        ledger,
        ema,
        anchors,
        reader,
        public_reader,
    )
    # Created only now, after the checks a user can fail (data, privacy plan, model, public data):
    # a start that fails with exit 2 leaves no empty run folder behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None and not lock.held:
        lock.acquire()
    run.lock = lock
    if world.is_main:
        if checkpoint is not None:  # newer ones did not verify: keep them for inspection, out of the way
            for moved in set_aside_newer_checkpoints(run_dir, state.step):
                print(f"[dpcap] {moved}", file=sys.stderr)
        save_config(config, run_dir / "config.yaml")
        if checkpoint is not None:
            truncate_metrics(run_dir / "metrics.jsonl", state.step)
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if config.train.backend == "deepspeed":  # after the resume: ZeRO partitions the optimizer state it loaded
        from dpcap.train.reduce_deepspeed import deepspeed_backend

        run.reducer, run.optimizer = deepspeed_backend(
            model, optimizer, world, zero_stage=config.train.zero_stage, micro_batch_size=config.train.micro_batch_size
        )
    run.clipper = clipper_for(model, plan.max_grad_norm, config.train) if plan.sigma > 0 else None
    run.sampler = PoissonSampler(plan.num_samples, plan.sample_rate, state.sampler_seed)
    # Reader workers live for the whole run (a new pool every step would cost more than the reading).
    run.step_loader = StepLoader(reader, config.data.num_workers) if config.data.num_workers > 0 else None
    run.writer = MetricWriter(
        run_dir,
        total_steps=config.train.steps,
        wandb_mode=config.log.wandb,
        project=config.log.wandb_project,
        config=to_dict(config),
        progress=config.log.progress,
        enabled=world.is_main,
        start_step=state.step,
    )
    return run


def _resume(checkpoint: Path | None, model, optimizer, reducer, config: RunConfig):
    """(state, ledger, stored plan) from the LAST checkpoint, or a fresh start with a new secret sampler seed."""
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        stored = state.extra.get("plan")
        if stored is not None:
            plan = PrivacyPlan.from_state(stored)
        else:  # written before plans were stored: the card has the same fields
            plan = PrivacyPlan.from_card(state.privacy) if state.privacy else None
        return state, Ledger.from_state_dict(state.ledger), plan
    seed = config.privacy.insecure_sampler_seed
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    # The sampling secret is drawn once (rank 0) and shared: every rank must draw the same ids.
    return TrainState(step=0, sampler_seed=reducer.broadcast_int(seed), ledger={}), Ledger(), None


def _loop(run: _Run, end: int) -> str | None:
    """Logical steps until `end` or a stop signal (then checkpoint at the step boundary); returns the signal."""
    with StopFlag() as stop:
        while run.state.step < end:
            _guard_budget(run.ledger, run.plan)
            record = _one_step(run)
            stop_requested = run.reducer.sum_scalars([float(stop.signal is not None)])[0] > 0
            run.writer.write(record)
            if run.state.step % run.config.train.checkpoint_every == 0 or run.state.step == end or stop_requested:
                _checkpoint(run)
            if stop_requested:
                return signal.Signals(stop.signal).name if stop.signal else "signal on another rank"
    return None


def _one_step(run: _Run) -> dict:
    """Draw, read, clip, noise once, update; record the step in the ledger; return its metrics record."""
    config, world, plan, step = run.config, run.world, run.plan, run.state.step
    started = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    ids = rank_share(run.sampler.indices(step), world.rank, world.world_size)
    micro_batches = split_micro_batches(ids, config.train.micro_batch_size)
    batches = run.step_loader.step(micro_batches) if run.step_loader else MicroBatchLoader(run.reader, micro_batches)
    if world.is_main:  # the only noise draw of the step happens on rank 0 (invariant 3)
        run.generator = _noise_generator(config.privacy.insecure_noise_seed, step, run.device, run.generator)
    tricks = StepTricks(
        augmentation_multiplicity=config.train.augmentation_multiplicity,
        augment_generator=_augment_generator(config, run.state.sampler_seed, step, world.rank),
        public_batch=_public_batch(run.public_reader, step, config.train.public_batch_size),
        public_weight=config.train.public_weight,
        anchors=run.anchors,
        public_pull=config.train.public_pull,
    )
    stats = logical_step(
        run.model,
        batches,
        clipper=run.clipper,
        optimizer=run.optimizer,
        reducer=run.reducer,
        noise_std=plan.sigma * plan.max_grad_norm,
        generator=run.generator,
        expected_batch_size=plan.num_samples * plan.sample_rate,
        device=run.device,
        precision=config.train.precision,
        tricks=tricks,
    )
    if run.ema is not None:
        run.ema.update(run.model)
    run.ledger.record(plan.sigma, plan.sample_rate)
    run.state.step = step + 1
    stats.reduce(run.reducer)
    warning = skipped_warning(stats, step=run.state.step)
    if warning is not None:
        run.writer.warn(warning)
    spent = run.ledger.epsilon(plan.delta, accountant=plan.accountant)
    record = {
        "step": run.state.step,
        **stats.summary(),
        "epsilon": spent if math.isfinite(spent) else None,
        "lr": lr_at(step, config),
        "seconds": time.perf_counter() - started,
    }
    if record["loss"] is None:
        record.pop("loss")
    return record


def _checkpoint(run: _Run) -> None:
    """Weights, moments, EMA, and the state: step, sampler seed, ledger, plan and card (invariant 5)."""
    if not (run.world.is_main or run.reducer.shards_optimizer_state):
        return
    moments = optimizer_tensors(run.optimizer)  # under ZeRO: a gather every rank must join
    if not run.world.is_main:
        return
    state = run.state
    state.ledger, state.privacy = run.ledger.state_dict(), run.plan.card(run.ledger)
    state.extra["plan"] = run.plan.to_state()
    ema = run.ema.state_dict() if run.ema is not None else None
    save_checkpoint(run.run_dir, run.model, moments, state, keep=run.config.train.keep_checkpoints, ema=ema)


def _finish(run: _Run, stopped_by: str | None) -> dict:
    if run.world.is_main:
        plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
    return {
        "run_dir": str(run.run_dir),
        "step": run.state.step,
        "done": run.state.step >= run.config.train.steps,
        "stopped_by": stopped_by,
        "skipped_total": skipped_totals(run.run_dir / "metrics.jsonl") if run.world.is_main else {},
        **run.plan.card(run.ledger),
    }


def _public_warm_start(config: RunConfig, model: torch.nn.Module) -> list[torch.Tensor] | None:
    """Load `model.init_from` (public weights) into `model`; return them per trainable parameter, or None.

    A resumed run then overwrites the weights with its checkpoint; the anchors still serve `train.public_pull`.
    """
    if not config.model.init_from:
        return None
    public = load_public_weights(config.model.init_from, model)
    model.load_state_dict(public, strict=True)
    return [public[name].to(p.device, p.dtype) for name, p in model.named_parameters() if p.requires_grad]


def _augment_generator(config: RunConfig, sampler_seed: int, step: int, rank: int) -> torch.Generator | None:
    """Augmentation randomness, internal to the per-example function: derived from the secret sampler seed."""
    if config.train.augmentation_multiplicity == 1:
        return None
    return torch.Generator().manual_seed(augmentation_seed(sampler_seed, step, rank))


def _public_batch(reader: SampleReader | None, step: int, size: int):
    """A deterministic public batch: ids step·P … step·P + P − 1 modulo the public set size (no sampling)."""
    if reader is None:
        return None
    return reader.read((step * size + np.arange(size)) % len(reader))


def _guard_budget(ledger: Ledger, plan: PrivacyPlan) -> None:
    """Invariant 5: refuse (exit 3) a step that would take ε past the budget."""
    if math.isinf(plan.epsilon_budget):  # the non-private baseline (or a run that once was one)
        return
    after = ledger.epsilon_after(
        sigma=plan.sigma, sample_rate=plan.sample_rate, steps=1, delta=plan.delta, accountant=plan.accountant
    )
    if after > plan.epsilon_budget * (1 + _BUDGET_RTOL):
        raise BudgetExceededError(
            f"the next step would spend ε = {after:.4f} > budget {plan.epsilon_budget:.4f} "
            f"(one more step at σ = {plan.sigma:.4f}, q = {plan.sample_rate:.3g}, δ = {plan.delta:.3g} after the "
            f"{ledger.steps} steps in the ledger)"
        )
