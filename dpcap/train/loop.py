"""The run: privacy plan and budget guard, auto-resume, the step loop, checkpoints, signals.

Order of start-up follows big_vision: resume from the run folder's LAST checkpoint if there is one,
else start from scratch. Each logical step t draws its ids from the stateless Poisson sampler
(seed, t), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpcap.config import RunConfig, save_config, to_dict
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
from dpcap.privacy.accountant import Ledger, calibrate_sigma, epsilon
from dpcap.privacy.noise import secret_generator
from dpcap.train.metrics import MetricWriter, plot_curves, truncate_metrics
from dpcap.train.reduce import make_reducer
from dpcap.train.state import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_ema,
    optimizer_tensors,
    save_checkpoint,
)
from dpcap.train.step import logical_step
from dpcap.train.tricks import EMA, augmentation_seed, load_public_weights
from dpcap.train.world import World, detect_world, device_for, init_distributed

# Relative slack on the ε budget: calibrate_sigma is exact to 1e-3 in σ, not in ε.
_BUDGET_RTOL = 1e-6


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything the accountant needs, fixed at the start of a run (and saved in every checkpoint)."""

    num_samples: int
    sample_rate: float
    sigma: float
    delta: float
    max_grad_norm: float
    accountant: str
    epsilon_budget: float  # inf for the non-private baseline
    insecure: bool  # a fixed noise or sampler seed: the run carries no guarantee
    recipe: dict = field(default_factory=dict)  # what else shaped the weights (see training_recipe)

    @property
    def private(self) -> bool:
        return self.sigma > 0 and not self.insecure

    def card(self, steps: int, spent: float) -> dict:
        return {
            "epsilon": spent if math.isfinite(spent) else None,
            "delta": self.delta,
            "sigma": self.sigma,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "num_samples": self.num_samples,
            "max_grad_norm": self.max_grad_norm,
            "accountant": self.accountant,
            "sampling": "poisson",
            "epsilon_budget": self.epsilon_budget if math.isfinite(self.epsilon_budget) else None,
            "private": self.private,
            **self.recipe,
        }


def training_recipe(config: RunConfig) -> dict:
    """The switches beside (σ, q, T, C) that shaped the weights, for the privacy card.

    None of them changes ε (public data and public weights are not accounted for; EMA and K views
    are post-processing / per-example functions), but a reader of the card must know that the
    weights also depend on public data (``public_data``, ``init_from``): the guarantee covers the
    private training set only.
    """
    t, m, d = config.train, config.model, config.data
    return {
        "augmentation_multiplicity": t.augmentation_multiplicity,
        "ema_decay": t.ema_decay,
        "init_from": m.init_from,
        "public_pull": t.public_pull,
        "public_data": d.public_shards,
        "public_batch_size": t.public_batch_size,
        "public_weight": t.public_weight,
        "frozen_parameters": ",".join(m.freeze),
    }


def plan_privacy(config: RunConfig, num_samples: int) -> PrivacyPlan:
    """σ (given or calibrated), q = batch_size / N, δ (default 1/N) and the ε budget."""
    p, t = config.privacy, config.train
    if t.batch_size > num_samples:
        raise ConfigError(f"train.batch_size {t.batch_size} exceeds the data set size {num_samples} (q must be ≤ 1)")
    q = t.batch_size / num_samples
    delta = p.delta if p.delta is not None else 1.0 / num_samples
    if p.sigma == 0 and p.epsilon is not None:
        raise ConfigError("privacy.sigma = 0 (non-private) cannot meet privacy.epsilon; drop one of them")
    sigma = p.sigma if p.sigma is not None else calibrate_sigma(p.epsilon, q, t.steps, delta, accountant=p.accountant)
    if p.epsilon is not None:
        budget = p.epsilon
    else:
        budget = epsilon(sigma, q, t.steps, delta, accountant=p.accountant) if sigma > 0 else math.inf
    insecure = p.insecure_noise_seed is not None or p.insecure_sampler_seed is not None
    return PrivacyPlan(
        num_samples, q, sigma, delta, p.max_grad_norm, p.accountant, budget, insecure, training_recipe(config)
    )


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


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (slurm pre-emption): the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
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


def train(config: RunConfig, *, world: World | None = None, max_steps_this_run: int | None = None) -> dict:
    """Train (or resume) the run in `config.run_dir`; returns a summary dict (also the CLI's JSON)."""
    world = world or detect_world()
    init_distributed(world)
    reducer = make_reducer(world)
    run_dir = Path(config.run_dir)
    device = device_for(world, config.train.device)
    index = ShardIndex(config.data.shards)
    plan = plan_privacy(config, len(index))

    model = build_model(config).to(device)
    anchors = _public_warm_start(config, model)
    optimizer = make_optimizer(model, config)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        ledger = Ledger.from_state_dict(state.ledger)
        if world.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", state.step)
    else:
        seed = config.privacy.insecure_sampler_seed
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        # The sampling secret is drawn once (rank 0) and shared: every rank must draw the same ids.
        state, ledger = TrainState(step=0, sampler_seed=reducer.broadcast_int(seed), ledger={}), Ledger()
        if world.is_main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    ema = None
    if config.train.ema_decay is not None:  # e_0 = θ_0, or the EMA saved with the checkpoint
        ema = EMA(model, config.train.ema_decay, load_ema(checkpoint) if checkpoint is not None else None)
    cfg = model.config
    tokenizer = get_tokenizer(config.model.size, **config.model.overrides())
    transform = image_transform(model.image_size, cfg.image_mean, cfg.image_std)
    reader = SampleReader(config.data.shards, transform, tokenizer)
    public_reader = SampleReader(config.data.public_shards, transform, tokenizer) if config.data.public_shards else None
    # Created only now, after the checks a user can fail (data, privacy plan, model, public data):
    # a start that fails with exit 2 leaves no empty run folder behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_config(config, run_dir / "config.yaml")
    if config.train.backend == "deepspeed":  # after the resume: ZeRO partitions the optimizer state it loaded
        from dpcap.train.reduce_deepspeed import deepspeed_backend

        reducer, optimizer = deepspeed_backend(
            model, optimizer, world, zero_stage=config.train.zero_stage, micro_batch_size=config.train.micro_batch_size
        )

    clipper = Clipper(model, plan.max_grad_norm) if plan.sigma > 0 else None
    sampler = PoissonSampler(plan.num_samples, plan.sample_rate, state.sampler_seed)
    # Reader workers live for the whole run (a new pool every step would cost more than the reading).
    step_loader = StepLoader(reader, config.data.num_workers) if config.data.num_workers > 0 else None
    writer = MetricWriter(
        run_dir,
        total_steps=config.train.steps,
        wandb_mode=config.log.wandb,
        project=config.log.wandb_project,
        config=to_dict(config),
        progress=config.log.progress,
        enabled=world.is_main,
        start_step=state.step,
    )
    generator = None
    end = config.train.steps if max_steps_this_run is None else min(config.train.steps, state.step + max_steps_this_run)
    stopped_by = None
    try:
        with StopFlag() as stop:
            while state.step < end:
                _guard_budget(ledger, plan)
                step = state.step
                started = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config)
                ids = rank_share(sampler.indices(step), world.rank, world.world_size)
                micro_batches = split_micro_batches(ids, config.train.micro_batch_size)
                batches = step_loader.step(micro_batches) if step_loader else MicroBatchLoader(reader, micro_batches)
                if world.is_main:  # the only noise draw of the step happens on rank 0 (invariant 3)
                    generator = _noise_generator(config.privacy.insecure_noise_seed, step, device, generator)
                stats = logical_step(
                    model,
                    batches,
                    clipper=clipper,
                    optimizer=optimizer,
                    reducer=reducer,
                    noise_std=plan.sigma * plan.max_grad_norm,
                    generator=generator,
                    expected_batch_size=plan.num_samples * plan.sample_rate,
                    device=device,
                    precision=config.train.precision,
                    augmentation_multiplicity=config.train.augmentation_multiplicity,
                    augment_generator=_augment_generator(config, state.sampler_seed, step, world.rank),
                    public_batch=_public_batch(public_reader, step, config.train.public_batch_size),
                    public_weight=config.train.public_weight,
                    anchors=anchors,
                    public_pull=config.train.public_pull,
                )
                if ema is not None:
                    ema.update(model)
                ledger.record(plan.sigma, plan.sample_rate)
                state.step = step + 1
                stats.reduce(reducer)
                stop_requested = reducer.sum_scalars([float(stop.signal is not None)])[0] > 0
                spent = ledger.epsilon(plan.delta, accountant=plan.accountant) if plan.sigma > 0 else math.inf
                record = {
                    "step": state.step,
                    **stats.summary(),
                    "epsilon": spent if math.isfinite(spent) else None,
                    "lr": lr_at(step, config),
                    "seconds": time.perf_counter() - started,
                }
                if record["loss"] is None:
                    record.pop("loss")
                writer.write(record)
                due = state.step % config.train.checkpoint_every == 0 or state.step == end or stop_requested
                if due and (world.is_main or reducer.shards_optimizer_state):
                    moments = optimizer_tensors(optimizer)  # under ZeRO: a gather every rank must join
                    if world.is_main:
                        state.ledger, state.privacy = ledger.state_dict(), plan.card(state.step, spent)
                        save_checkpoint(
                            run_dir,
                            model,
                            moments,
                            state,
                            keep=config.train.keep_checkpoints,
                            ema=ema.state_dict() if ema is not None else None,
                        )
                if stop_requested:
                    stopped_by = signal.Signals(stop.signal).name if stop.signal else "signal on another rank"
                    break
    finally:
        writer.close()
        if step_loader is not None:
            step_loader.close()
    spent = ledger.epsilon(plan.delta, accountant=plan.accountant) if plan.sigma > 0 else math.inf
    if world.is_main:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return {
        "run_dir": str(run_dir),
        "step": state.step,
        "done": state.step >= config.train.steps,
        "stopped_by": stopped_by,
        **plan.card(state.step, spent),
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
    if plan.sigma == 0:
        return
    after = ledger.epsilon_after(
        sigma=plan.sigma, sample_rate=plan.sample_rate, steps=1, delta=plan.delta, accountant=plan.accountant
    )
    if after > plan.epsilon_budget * (1 + _BUDGET_RTOL):
        raise BudgetExceededError(
            f"the next step would spend ε = {after:.4f} > budget {plan.epsilon_budget:.4f} "
            f"(after {ledger.steps} steps at σ = {plan.sigma:.4f}, q = {plan.sample_rate:.3g}, δ = {plan.delta:.3g})"
        )
