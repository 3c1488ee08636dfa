"""One logical DP-SGD step: micro-batches → per-sample clip → reduce + noise once → ÷ qN → AdamW.

The logical batch is what the Poisson sampler drew for this step (its size varies, and may be 0);
it is processed in micro-batches whose clipped sums accumulate in `.grad`. Only after the last
micro-batch is noise added — once — and the sum divided by the expected batch size qN
(invariant 3), so the update's sensitivity to one example is C/(qN) whatever the realised size.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from dpcap.data.reader import SKIP_REASONS, Batch
from dpcap.privacy import Clipper
from dpcap.train.metrics import NonFiniteLossError
from dpcap.train.tricks import NO_TRICKS, StepTricks, mix_public_, pull_toward_, random_resized_flip

# A step whose drawn samples were skipped (unreadable, too many pixels, …) more often than this warns.
SKIPPED_WARN_FRACTION = 0.10
_OTHER = "other"  # a reason the reader does not list in SKIP_REASONS, once summed over ranks


@dataclass
class StepStats:
    """Operator statistics of one logical step (not covered by the DP guarantee, invariant 6)."""

    batch_size: int = 0
    loss_sum: float = 0.0
    clipped: int = 0
    norms: list[float] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.batch_size if self.batch_size else None

    @property
    def drawn(self) -> int:
        """Samples the sampler drew for this step: those used plus those skipped."""
        return self.batch_size + sum(self.skipped.values())

    def reduce(self, reducer) -> None:
        """Sum the world's counts so rank 0 logs the whole logical batch (norms stay rank-local).

        Skip counts are summed per reason of `dpcap.data.reader.SKIP_REASONS` (a fixed order every rank
        shares); any other reason is summed as "other".
        """
        local = [self.skipped.get(reason, 0) for reason in SKIP_REASONS]
        local.append(sum(n for reason, n in self.skipped.items() if reason not in SKIP_REASONS))
        total = reducer.sum_scalars([self.batch_size, self.loss_sum, self.clipped, *local])
        self.batch_size, self.loss_sum, self.clipped = int(total[0]), total[1], int(total[2])
        counts = zip((*SKIP_REASONS, _OTHER), total[3:])
        self.skipped = Counter({reason: int(n) for reason, n in counts if n})

    def summary(self) -> dict:
        norms = torch.tensor(self.norms) if self.norms else None
        return {
            "loss": self.loss,
            "batch_size": self.batch_size,
            "skipped": sum(self.skipped.values()),
            **({"skipped_reasons": dict(sorted(self.skipped.items()))} if self.skipped else {}),
            "clipped_fraction": self.clipped / self.batch_size if self.batch_size and self.norms else None,
            "grad_norm_median": float(norms.median()) if norms is not None else None,
        }


def skipped_warning(
    stats: StepStats, *, step: int | None = None, threshold: float = SKIPPED_WARN_FRACTION
) -> str | None:
    """A warning line when more than ``threshold`` of the step's drawn samples were skipped, else None.

    Call it after `StepStats.reduce`, so the counts are the whole world's. Skipped samples contribute
    zero to the step (N, q and the accounting are unchanged), so training goes on: the line is for the
    operator, whose data is damaged or unreadable in bulk.
    """
    skipped, drawn = sum(stats.skipped.values()), stats.drawn
    if not drawn or skipped <= threshold * drawn:
        return None
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    where = f"step {step}: " if step is not None else ""
    return (
        f"{where}{skipped} of the {drawn} drawn samples ({skipped / drawn:.0%}) were skipped ({reasons}); "
        "they add nothing to the step, so it trains on less data: check the shards (`dpcap data stats DIR`)"
    )


def per_sample_losses(model, batch: Batch, device: torch.device, precision: str) -> torch.Tensor:
    images, tokens = batch.images.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        losses = model.per_sample_loss(images, tokens)
    if not torch.isfinite(losses).all():
        raise NonFiniteLossError(
            f"non-finite per-sample loss for sample ids {batch.ids[~torch.isfinite(losses.cpu())].tolist()}"
        )
    return losses


def example_losses(
    model, batch: Batch, device: torch.device, precision: str, *, multiplicity: int = 1, generator=None
) -> torch.Tensor:
    """ℓ_i, or with K = multiplicity > 1 the mean (1/K) Σ_k ℓ(aug_k(x_i), t_i) (De et al. 2022).

    The K views go through K separate forward calls of batch b (not one of K·b): the clipper's hooks
    keep every call and combine them per sample, so the clipped quantity is ∇ of example i's mean loss.
    """
    if multiplicity == 1:
        return per_sample_losses(model, batch, device, precision)
    views = [
        per_sample_losses(model, replace(batch, images=random_resized_flip(batch.images, generator)), device, precision)
        for _ in range(multiplicity)
    ]
    return torch.stack(views).mean(dim=0)


def public_mean_gradient(
    model, params: list[torch.nn.Parameter], batch: Batch, device: torch.device, precision: str, clipper
) -> list[torch.Tensor]:
    """(1/|P|) Σ_{j∈P} ∇ℓ_j over a public batch P: no clipping, no noise, not written to `.grad`."""
    try:
        losses = per_sample_losses(model, batch, device, precision)
        grads = torch.autograd.grad(losses.sum() / len(batch), params, allow_unused=True)
    finally:
        if clipper is not None:
            clipper.clear()  # its hooks kept the public forward's activations: drop them
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _add_unclipped_sum(params: list[torch.nn.Parameter], losses: torch.Tensor) -> None:
    """Add Σ_i ∇ℓ_i to `.grad` the way the clipper adds its clipped sum (σ = 0 baseline).

    Written directly rather than by autograd's accumulation, so that no engine gradient hook (DeepSpeed
    ZeRO-2 reduce-scatters from them) fires before `reducer.finish` has the whole local sum.
    """
    grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
    for p, grad in zip(params, grads):
        if grad is None:
            continue
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.add_(grad)


def logical_step(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    clipper: Clipper | None,
    optimizer: torch.optim.Optimizer,
    reducer,
    noise_std: float,
    generator: torch.Generator | None,
    expected_batch_size: float,
    device: torch.device,
    precision: str = "fp32",
    tricks: StepTricks = NO_TRICKS,
) -> StepStats:
    """Run one logical step over `batches`; `clipper=None` (σ = 0) is the non-private baseline.

    Optional `tricks` (dpcap.train.tricks): K augmented views per example averaged before clipping; after
    the noisy DP update is formed, mixing with a public batch's mean gradient (weight w) and a pull
    λ·(θ − θ_public) toward the public `anchors` — post-processing that leaves the accounting unchanged.
    """
    stats = StepStats()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    model.train()
    for batch in batches:
        stats.skipped.update(batch.skipped)
        if len(batch) == 0:
            continue
        losses = example_losses(
            model,
            batch,
            device,
            precision,
            multiplicity=tricks.augmentation_multiplicity,
            generator=tricks.augment_generator,
        )
        if clipper is not None:
            norms = clipper.backward(losses)
            stats.norms.extend(norms.tolist())
            stats.clipped += int((norms > clipper.max_grad_norm).sum())
        else:
            _add_unclipped_sum(params, losses)
        stats.batch_size += len(batch)
        stats.loss_sum += float(losses.detach().sum())
    for p in params:  # an empty logical batch still takes a (noise-only) step: invariant 1
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reducer.finish(params, noise_std=noise_std, generator=generator, expected_batch_size=expected_batch_size)
    if tricks.public_batch is not None and len(tricks.public_batch):
        public_gradient = public_mean_gradient(model, params, tricks.public_batch, device, precision, clipper)
        mix_public_(params, public_gradient, tricks.public_weight)
    if tricks.anchors is not None and tricks.public_pull > 0:
        pull_toward_(params, tricks.anchors, tricks.public_pull)
    optimizer.step()
    return stats
