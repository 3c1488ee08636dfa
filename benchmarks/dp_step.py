"""Cost of one DP training step, side by side: non-private vs dpcap's clipper vs opacus ghost clipping.

Every method trains its own copy of the SAME captioner (same size, overrides and seed, hence the same
initial weights) on the SAME batch: random images in [-1, 1] and real English captions of varied
lengths. One step of each method is

* ``nonprivate``: ``per_sample_loss(...).sum().backward()`` then AdamW;
* ``dpcap``: forward, ``Clipper.backward(losses)`` (one backward, book-keeping), + N(0, σ²C²) noise,
  ÷ B, AdamW (DP-SGD, Abadi et al. 2016);
* ``opacus_ghost``: opacus 1.6 ``GradSampleModuleFastGradientClipping`` with ghost clipping, running
  the two-backward recipe of ``DPTensorFastGradientClipping.backward`` (backward of Σℓ_i with
  ``retain_graph``, ``zero_grad``, clip coefficients, backward of Σ c_i ℓ_i with hooks disabled),
  then the same noise, ÷ B and AdamW;
* ``naive`` (optional): one backward per example, clip, sum — the textbook oracle.

With ``--accumulation K`` one step is a logical step of K micro-batches, as ``dpcap train`` takes it
(DP-Cap: 1,310,720 samples over 128 ranks at micro-batch 128 is K = 80): K forward/backward passes over
the batch, their (clipped) gradients summed, then the noise, ÷ K·B and AdamW once. K = 1 (default) puts
a full noise draw and optimizer step on every micro-batch, the worst case for DP's fixed per-step costs.

Timing: ``--warmup`` rounds, then ``--iters`` rounds; each round runs every method once, interleaved
with a rotating start (ABC, BCA, CAB, …) so that machine noise hits all methods alike; the median
per method is reported. Memory: one extra step per method after timing, measured as the peak of
live tensor bytes above the level at the start of the step (params, AdamW state and the batch are
resident before and after, gradients are freed between steps). On CUDA this is
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start; on CPU it is replayed
from the allocation/free events of ``torch.profiler`` (``profile_memory=True``), which sees every
tensor the CPU allocator hands out but not allocator caching, fragmentation or non-tensor memory.

Opacus cannot wrap the captioner as it stands (see ``opacus_note`` in the output). It is timed on an
*adapted view*: a module that re-uses the captioner's own submodules and parameter objects but routes
timm's ``cls_token``/``pos_embed`` through a small module opacus can hook and passes contiguous token
ids; the view is checked to give the captioner's losses exactly and to own the same parameters.

The last stdout line is one JSON object, also written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpcap.data.tokenizer import EOT_ID, target_mask
from dpcap.errors import DpcapError
from dpcap.model import create_captioner, get_config, get_tokenizer
from dpcap.privacy import Clipper
from dpcap.privacy.layers.base import DEFAULT_STEP_MEMORY_BUDGET_BYTES
from dpcap.privacy.layers.linear import GHOST, INSTANTIATED, SCRATCH_ELEMENT_COST, branch_costs, choose_branch
from dpcap.privacy.noise import add_gaussian_noise_, secret_generator

DEFAULT_OUT = "benchmarks/results/dp_step.json"
CHECK_RTOL = 1e-4
NORM_EPS = 1e-6  # as dpcap's Clipper and opacus' get_clipping_coef: c_i = min(1, C / (‖g_i‖ + 1e-6))

# Real captions of varied lengths (2 to ~45 BPE tokens; the longest are truncated at the context length).
CAPTIONS = (
    "a dog",
    "two cats asleep on a sofa",
    "a red bicycle leaning against a brick wall",
    "sunset over the sea",
    "a plate of pasta with tomato sauce and fresh basil leaves on a wooden table",
    "an old man reading a newspaper on a park bench while pigeons gather around his feet",
    "snow",
    "a child flying a yellow kite on a windy beach",
    "a busy city street at night with taxis, neon signs and people crossing in the rain "
    "under colourful umbrellas while a bus waits at the traffic light",
    "three green apples in a glass bowl",
    "a small boat on a calm lake surrounded by pine trees and mountains",
    "close-up of a bee on a purple flower",
    "a laptop, a cup of coffee and a notebook on a desk next to a window",
    "a herd of zebras drinking at a waterhole in the savanna during the dry season, "
    "with dust in the air and a lone acacia tree in the background",
    "a man surfing a big wave",
    "a bowl of soup",
)


# --------------------------------------------------------------------------------------------- setup
def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with value read as int, float, bool (true/false) or left a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_batch(model: nn.Module, tokenizer, batch_size: int, seed: int, device: torch.device):
    """Images uniform in [-1, 1] from an explicit generator; captions cycled from CAPTIONS."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, model.image_size, model.image_size, generator=generator) * 2 - 1
    tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)])
    return images.to(device), tokens.to(device)


def forward_precision(args: argparse.Namespace, device: torch.device):
    """The forward's autocast (``--amp bf16``) or a no-op; the clipper's own maths stays float32 either way."""
    if args.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """A fresh captioner; the same seed gives the same initial weights for every method."""
    return create_captioner(args.size, seed=args.seed, **args.overrides).to(device).train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with DP-Cap's betas and weight decay."""
    return torch.optim.AdamW(trainable(model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.005)


# ------------------------------------------------------------------------------- opacus adapted view
class PrefixTokens(nn.Module):
    """timm ViT's ``_pos_embed`` for class_token=True, no_embed_class=False: ``cat(cls, x) + pos_embed``.

    Holds the ViT's own ``cls_token`` and ``pos_embed`` Parameter objects (shared, not copied).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class OpacusView(nn.Module):
    """The captioner's per-sample loss, re-wired from its own submodules so opacus can hook every parameter.

    Differences from ``Captioner.per_sample_loss`` are only in plumbing: the ViT's token parameters sit in
    `PrefixTokens` (opacus gives a module that owns parameters and has no rule to functorch, and the
    ViT's hooks would never fire because the captioner calls ``forward_features``), and the decoder
    input ids are made contiguous (opacus' embedding norm sampler calls ``.view`` on them).
    """

    def __init__(self, captioner: nn.Module) -> None:
        super().__init__()
        vit = captioner.encoder
        if vit.reg_token is not None or vit.no_embed_class or vit.cls_token is None:
            raise ValueError("OpacusView assumes a timm ViT with a class token, no register tokens, embed_class")
        self.patch_embed = vit.patch_embed
        self.prefix = PrefixTokens(vit)
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.decoder = captioner.decoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image_tokens = self.norm(self.blocks(self.prefix(self.patch_embed(images))))
        return contiguous_ids_loss(self.decoder, image_tokens, tokens)


def contiguous_ids_loss(decoder: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``Captioner.per_sample_loss`` after the encoder, with contiguous decoder input ids.

    ℓ_i = (1/|M_i|) Σ_{j∈M_i} −log p(t_{i,j+1} | t_{i,≤j}, x_i), M_i = targets up to the first EOT.
    Like the captioner, columns after every row's EOT are cut first (the decoder is causal, so the
    loss is unchanged and both do the same work).
    """
    mask = target_mask(tokens, eot_id=EOT_ID)
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
    tokens, mask = tokens[:, : used + 1], mask[:, :used]
    logits = decoder(tokens[:, :-1].contiguous(), image_tokens).float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return (nll.view(mask.shape) * mask).sum(dim=1) / mask.sum(dim=1)


def opacus_wrap(module: nn.Module, max_grad_norm: float):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    return GradSampleModuleFastGradientClipping(
        module, batch_first=True, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
    )


def opacus_routing(gsm) -> dict[str, object]:
    """How opacus handles each module it hooks (its own ``iterate_submodules``): ghost norm, per-sample
    grad sampler, or functorch (vmap of the whole module). Lookups are by exact type, as opacus does."""
    names = {id(module): name or "<root>" for name, module in gsm._module.named_modules()}
    entries: dict[str, list[tuple[str, str]]] = {"ghost_norm": [], "grad_sampler": [], "functorch": []}
    for module in gsm.iterate_submodules(gsm._module):
        kind = type(module)
        if gsm.use_ghost_clipping and kind in gsm.NORM_SAMPLERS:
            route = "ghost_norm"
        elif kind in gsm.GRAD_SAMPLERS:
            route = "grad_sampler"
        else:
            route = "functorch"
        entries[route].append((names[id(module)], f"{kind.__module__}.{kind.__name__}"))
    return {
        "ghost_norm_modules": len(entries["ghost_norm"]),
        "grad_sampler_types": sorted({kind for _, kind in entries["grad_sampler"]}),
        "functorch_modules": [f"{name} ({kind})" for name, kind in entries["functorch"]],
    }


def opacus_two_backward(gsm, losses: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The body of opacus' ``DPTensorFastGradientClipping.backward`` for loss_reduction="sum".

    ``DPOptimizerFastGradientClipping.zero_grad()`` defaults to ``set_to_none=False``, mirrored here.
    Returns the clip coefficients c_i = min(1, C / (‖g_i‖ + 1e-6)).
    """
    losses.sum(dim=0).backward(retain_graph=True)
    optimizer.zero_grad(set_to_none=False)
    coeff = gsm.get_clipping_coef()
    second = torch.sum(coeff.to(losses.device) * losses)
    gsm.disable_hooks()
    second.backward()
    gsm.enable_hooks()
    return coeff


def _attempt(fn: Callable[[], None]) -> str:
    try:
        fn()
        return "ran"
    except Exception as error:  # noqa: BLE001 - the point is to record whatever opacus raises
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def probe_opacus_as_is(args: argparse.Namespace, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, object]:
    """Wrap the stock captioner with opacus; try its first backward and its clip coefficients.

    Tried twice: with ``per_sample_loss`` itself, then with the same loss fed contiguous token ids
    (to see past opacus' embedding ``.view`` on the sliced ids).
    """
    out: dict[str, object] = {}
    for label, loss_fn in (
        ("outcome", lambda m: m.per_sample_loss(images, tokens)),
        ("outcome_with_contiguous_ids", lambda m: contiguous_ids_loss(m.decoder, m.image_tokens(images), tokens)),
    ):
        model = build_model(args, images.device)
        gsm = opacus_wrap(model, args.max_grad_norm)
        out.setdefault("routing", opacus_routing(gsm))

        def first_half(model=model, gsm=gsm, loss_fn=loss_fn) -> None:
            loss_fn(model).sum().backward()
            gsm.get_clipping_coef()

        out[label] = _attempt(first_half)
        gsm.remove_hooks()
    return out


# ----------------------------------------------------------------------------------------- methods
class Method:
    """One way to take a training step on its own copy of the captioner."""

    name = ""

    def __init__(self, args: argparse.Namespace, images: torch.Tensor, tokens: torch.Tensor) -> None:
        self.images, self.tokens = images, tokens
        self.model = build_model(args, images.device)
        self.params = trainable(self.model)
        self.optimizer = make_optimizer(self.model)
        self.noise_std = args.sigma * args.max_grad_norm
        self.generator = secret_generator(images.device, insecure_seed=args.seed)
        self.accumulation = args.accumulation
        self.args = args

    def step(self) -> None:
        """One logical step: ``accumulation`` micro-batches, then the update."""
        for _ in range(self.accumulation):
            self.micro_batch()
        self.finish()

    def micro_batch(self) -> None:
        """Forward and backward of the batch, its gradient (clipped sum for DP) added to `.grad`."""
        raise NotImplementedError

    def finish(self) -> None:
        self.finish_private()

    def losses(self, model: nn.Module | None = None) -> torch.Tensor:
        """(B,) per-sample losses of the batch, the forward under ``--amp``."""
        with forward_precision(self.args, self.images.device):
            return (model or self.model).per_sample_loss(self.images, self.tokens).float()

    def finish_private(self) -> None:
        """+ N(0, σ²C²) on the clipped sum, ÷ B, AdamW; gradients freed for the next step."""
        grads = [p.grad for p in self.params]
        add_gaussian_noise_(grads, std=self.noise_std, generator=self.generator)
        torch._foreach_div_(grads, float(self.accumulation * self.images.shape[0]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class NonPrivate(Method):
    name = "nonprivate"

    def micro_batch(self) -> None:
        self.losses().sum().backward()

    def finish(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Dpcap(Method):
    name = "dpcap"

    def __init__(self, args, images, tokens) -> None:
        super().__init__(args, images, tokens)
        self.clipper = Clipper(self.model, args.max_grad_norm)

    def micro_batch(self) -> None:
        self.clipper.backward(self.losses())


class OpacusGhost(Method):
    name = "opacus_ghost"

    def __init__(self, args, images, tokens) -> None:
        super().__init__(args, images, tokens)
        self.gsm = opacus_wrap(OpacusView(self.model), args.max_grad_norm)

        self.accumulated: list[torch.Tensor] | None = None

    def micro_batch(self) -> None:
        with forward_precision(self.args, self.images.device):
            losses = self.gsm(self.images, self.tokens).float()
        opacus_two_backward(self.gsm, losses, self.optimizer)  # zeroes `.grad` between its two backwards
        if self.accumulation > 1:  # so each micro-batch's clipped sum is set aside, as opacus' optimizer does
            grads = [p.grad for p in self.params]
            if self.accumulated is None:
                self.accumulated = [g.clone() for g in grads]
            else:
                torch._foreach_add_(self.accumulated, grads)

    def finish(self) -> None:
        if self.accumulated is not None:
            for p, summed in zip(self.params, self.accumulated):
                p.grad = summed
            self.accumulated = None
        self.finish_private()


class Naive(Method):
    name = "naive"

    def __init__(self, args, images, tokens) -> None:
        super().__init__(args, images, tokens)
        self.max_grad_norm = args.max_grad_norm

    def micro_batch(self) -> None:
        previous = [p.grad for p in self.params]
        naive_clipped_sum(self.model, self.params, self.images, self.tokens, self.max_grad_norm)
        for p, grad in zip(self.params, previous):
            if grad is not None:
                p.grad.add_(grad)


def naive_clipped_sum(model, params, images, tokens, max_grad_norm: float) -> torch.Tensor:
    """Σ_i min(1, C/(‖g_i‖+1e-6)) g_i into `.grad`, one backward per example; returns the norms ‖g_i‖."""
    sums = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(images.shape[0]):
        loss = model.per_sample_loss(images[i : i + 1], tokens[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        torch._foreach_add_(sums, grads, alpha=float((max_grad_norm / (norm + NORM_EPS)).clamp(max=1.0)))
        norms.append(norm)
    for p, s in zip(params, sums):
        p.grad = s
    return torch.stack(norms)


# ----------------------------------------------------------------------------------- measurements
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    methods: Sequence[Method], warmup: int, iters: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of each method over `iters` rounds after `warmup` rounds.

    Each round runs every method once, the start rotating (ABC, BCA, CAB, …). Process CPU time sums
    all threads; it is less sensitive than wall time to other processes on a shared machine.
    """
    times = {m.name: {"wall": [], "cpu": []} for m in methods}
    for round_index in range(warmup + iters):
        shift = round_index % len(methods)
        for method in list(methods[shift:]) + list(methods[:shift]):
            gc.collect()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            method.step()
            synchronize(device)
            if round_index >= warmup:
                times[method.name]["wall"].append(time.perf_counter() - wall)
                times[method.name]["cpu"].append(time.process_time() - cpu)
    return times


def cpu_step_memory(step: Callable[[], None], mark: str | None = None) -> tuple[int, int | None]:
    """(peak, live at the first ``record_function(mark)``) CPU tensor bytes above the start of `step`,
    replayed from the profiler's memory events; the second is None without a mark, 0 if it never ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    memory = [e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    memory.sort(key=lambda e: e.start_ns())
    peak = max(itertools.accumulate((e.nbytes() for e in memory), initial=0))
    if mark is None:
        return peak, None
    marks = [e.start_ns() for e in events if e.name() == mark]
    return peak, sum(e.nbytes() for e in memory if marks and e.start_ns() <= marks[0])


def cpu_step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak live CPU tensor bytes above the start of `step`, replayed from the profiler's memory events."""
    return cpu_step_memory(step)[0]


def cuda_step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def step_peak_bytes(method: Method, device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        return cuda_step_peak_bytes(method.step, device)
    return cpu_step_peak_bytes(method.step)


def resident_bytes(method: Method) -> int:
    """Parameters + AdamW state + the batch: what every method holds between steps."""
    tensors = [*method.model.parameters(), method.images, method.tokens]
    tensors += [t for state in method.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------ sanity check
def flat_grads(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def gradient_check(args: argparse.Namespace, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, object]:
    """dpcap's clipped sum (σ = 0) vs opacus ghost clipping vs the naive loop, at C = median per-sample norm.

    Choosing C at the median clips about half the samples, so both branches of min(1, C/‖g_i‖) are checked.
    """
    probe = build_model(args, images.device)
    clipper = Clipper(probe, args.max_grad_norm)
    norms = clipper.backward(probe.per_sample_loss(images, tokens)).detach()
    clip_norm = float(norms.median())
    del probe, clipper

    results: dict[str, torch.Tensor] = {}
    dp_model = build_model(args, images.device)
    dp_norms = Clipper(dp_model, clip_norm).backward(dp_model.per_sample_loss(images, tokens)).detach()
    results["dpcap"] = flat_grads(trainable(dp_model))
    out: dict[str, object] = {
        "max_grad_norm": clip_norm,
        "clipped_fraction": float((dp_norms > clip_norm).float().mean()),
    }

    naive_model = build_model(args, images.device)
    naive_norms = naive_clipped_sum(naive_model, trainable(naive_model), images, tokens, clip_norm)
    results["naive"] = flat_grads(trainable(naive_model))
    out["grad_rel_err_vs_naive"] = relative_error(results["dpcap"], results["naive"])
    out["norm_max_rel_err_vs_naive"] = float(((dp_norms - naive_norms).abs() / naive_norms).max())

    try:
        op_model = build_model(args, images.device)
        view = OpacusView(op_model)
        gsm = opacus_wrap(view, clip_norm)
        opacus_two_backward(gsm, gsm(images, tokens), make_optimizer(op_model))
        op_norms = gsm.per_sample_gradient_norms.detach()
        results["opacus"] = flat_grads(trainable(op_model))
        out["grad_rel_err_vs_opacus"] = relative_error(results["dpcap"], results["opacus"])
        out["norm_max_rel_err_vs_opacus"] = float(((dp_norms - op_norms).abs() / op_norms).max())
        out["opacus_vs_naive_grad_rel_err"] = relative_error(results["opacus"], results["naive"])
    except Exception as error:  # noqa: BLE001 - recorded, not fatal: the timing still stands
        out["opacus_error"] = f"{type(error).__name__}: {error}"
    errors = [v for k, v in out.items() if k.startswith(("grad_rel_err", "norm_max_rel_err"))]
    out["passed"] = all(e <= CHECK_RTOL for e in errors)
    out["rtol"] = CHECK_RTOL
    return out


def check_view_matches(args: argparse.Namespace, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """Max |Δloss| between the captioner and its opacus view (must be 0 up to float rounding)."""
    model = build_model(args, images.device)
    view = OpacusView(model)
    if {id(p) for p in view.parameters()} != {id(p) for p in model.parameters()}:
        raise RuntimeError("OpacusView does not own exactly the captioner's parameters")
    with torch.no_grad():
        return float((view(images, tokens) - model.per_sample_loss(images, tokens)).abs().max())


# ------------------------------------------------------------------------------------------- report
def method_classes(args: argparse.Namespace) -> list[type[Method]]:
    classes: list[type[Method]] = [NonPrivate, Dpcap]
    if not args.no_opacus:
        classes.append(OpacusGhost)
    if args.naive == "on" or (args.naive == "auto" and args.batch_size <= args.naive_max_batch):
        classes.append(Naive)
    return classes


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def config_summary(args: argparse.Namespace, device: torch.device, model: nn.Module, tokens: torch.Tensor) -> dict:
    cfg = get_config(args.size, **args.overrides)
    lengths = target_mask(tokens.cpu()).sum(dim=1).float()
    return {
        "size": args.size,
        "overrides": args.overrides,
        "vision": _fields(cfg.vision),
        "text": _fields(cfg.text),
        "params": sum(p.numel() for p in trainable(model)),
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "caption_target_tokens": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "max_grad_norm": args.max_grad_norm,
        "sigma": args.sigma,
        "amp": args.amp,
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "torch": torch.__version__,
        "opacus": _opacus_version(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "memory_method": "cuda max_memory_allocated delta"
        if device.type == "cuda"
        else "torch.profiler CPU allocation/free event replay (tensor bytes; excludes allocator caching)",
    }


def _fields(obj) -> dict:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _opacus_version() -> str | None:
    try:
        import opacus

        return opacus.__version__
    except ImportError:
        return None


def opacus_note(as_is: dict, view_routing: dict) -> str:
    """One paragraph: what opacus does with the stock captioner, and what the timed view is."""
    why_first = " (opacus' embedding norm sampler calls .view on the sliced decoder ids)"
    why_second = (
        " (the timm VisionTransformer owns cls_token/pos_embed, so opacus routes the whole encoder to "
        "functorch and hooks nothing inside it; that hook never fires because Captioner calls "
        "encoder.forward_features, so no encoder parameter gets a norm)"
    )
    first, second = as_is["outcome"], as_is["outcome_with_contiguous_ids"]
    return (
        f"Stock captioner: {first}{why_first if 'view size' in first else ''}; with contiguous ids: "
        f"{second}{why_second if '_norm_sample' in second else ''}. Timed on OpacusView (the captioner's own "
        "submodules and Parameter objects re-wired, losses checked equal): "
        f"{view_routing['ghost_norm_modules']} Linear/Embedding modules by ghost norm; functorch (vmap) for "
        f"{len(view_routing['functorch_modules'])} modules (opacus looks rules up by exact type, so timm's "
        "LayerNorm subclass goes to functorch, as do PrefixTokens and LearnedPositions); grad samplers for "
        f"{', '.join(view_routing['grad_sampler_types']) or 'none'}; two backward passes per step."
    )


def build_report(args, methods, times, peaks, extras) -> dict:
    wall = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    per_method = {
        m.name: {
            "seconds_median": wall[m.name],
            "cpu_seconds_median": cpu[m.name],
            "seconds_all": [round(t, 4) for t in times[m.name]["wall"]],
            "peak_step_bytes": peaks[m.name],
            "resident_bytes": resident_bytes(m),
        }
        for m in methods
    }
    base = per_method["nonprivate"]
    report = {
        "time_ratio_vs_nonprivate": ratio(wall["dpcap"], wall["nonprivate"]),
        "memory_ratio_vs_nonprivate": ratio(peaks["dpcap"], peaks["nonprivate"]),
        "time_ratio_vs_opacus_ghost": ratio(wall["dpcap"], wall.get("opacus_ghost")),
        "memory_ratio_vs_opacus_ghost": ratio(peaks["dpcap"], peaks.get("opacus_ghost")),
        "cpu_time_ratio_vs_nonprivate": ratio(cpu["dpcap"], cpu["nonprivate"]),
        "cpu_time_ratio_vs_opacus_ghost": ratio(cpu["dpcap"], cpu.get("opacus_ghost")),
        "opacus_ghost_time_ratio_vs_nonprivate": ratio(wall.get("opacus_ghost"), wall["nonprivate"]),
        "opacus_ghost_memory_ratio_vs_nonprivate": ratio(peaks.get("opacus_ghost"), peaks["nonprivate"]),
        "naive_time_ratio_vs_nonprivate": ratio(wall.get("naive"), wall["nonprivate"]),
        "memory_ratio_vs_nonprivate_incl_resident": ratio(
            peaks["dpcap"] + per_method["dpcap"]["resident_bytes"], base["peak_step_bytes"] + base["resident_bytes"]
        ),
        "methods": per_method,
    }
    report.update(extras)
    return report


def print_branch_table(rows: Sequence[dict]) -> None:
    """The Clipper's per-layer branch choices of the last step, one line per layer, on stderr."""
    print(f"{'layer':<40} {'B':>4} {'T':>4} {'d':>5} {'p':>6} {'branch':<12} {'ghost MAC':>10} "
          f"{'inst MAC':>10} {'ghost cost':>10} {'inst cost':>10} {'extra MiB':>9} {'held MiB':>8}",
          file=sys.stderr)  # fmt: skip
    for r in rows:
        print(f"{r['name']:<40} {r['B']:>4} {r['T']:>4} {r['d']:>5} {r['p']:>6} {r['branch']:<12} "
              f"{r['ghost_flops']:>10.3g} {r['instantiated_flops']:>10.3g} {r.get('ghost_cost', float('nan')):>10.3g} "
              f"{r.get('instantiated_cost', float('nan')):>10.3g} {r['extra_bytes'] / 2**20:>9.2f} "
              f"{r.get('held_bytes', 0) / 2**20:>8.2f}",
              file=sys.stderr)  # fmt: skip


def project_branches(
    rows: Sequence[dict], batch: int, step_budget_bytes: float = DEFAULT_STEP_MEMORY_BUDGET_BYTES
) -> list[dict]:
    """The cost model's per-layer choice at micro-batch ``batch`` for the shapes of a measured table.

    A projection, not a measurement: each layer's T, d, p, element size and memory budget are the
    measured ones; the instantiated branch is priced exactly (`branch_costs`), the ghost branch's
    measured flops and cost (zero rows skipped) are scaled by batch / B, linear as the per-sample Gram pairs are.
    The micro-batch's held-bytes budget is handed out last layer first, the order in which a backward
    reaches them. Rows of handlers without the two Linear branches are copied as they are."""
    projected: list[dict] = [{}] * len(rows)
    held_left = step_budget_bytes
    for index in reversed(range(len(rows))):
        row = rows[index]
        if not {"ghost_flops", "instantiated_bytes", "memory_budget_bytes", "T", "d", "p"} <= row.keys():
            projected[index] = dict(row)
            continue
        element = row["instantiated_bytes"] // (row["B"] * row["p"] * row["d"])
        costs = branch_costs(batch, row["T"], row["d"], row["p"], element)
        scale = batch / row["B"]
        costs[GHOST]["flops"] = round(row["ghost_flops"] * scale)
        # The measured ghost cost (zero rows skipped) scales as its flops; a table from before the cost key
        # is priced from its flops and bytes as `branch_costs` does.
        ghost_cost = row.get("ghost_cost", row["ghost_flops"] + SCRATCH_ELEMENT_COST * row["ghost_bytes"] // element)
        costs[GHOST]["cost"] = round(ghost_cost * scale)
        branch = choose_branch(costs, row["memory_budget_bytes"], held_budget_bytes=held_left)
        projected[index] = {
            **row, "B": batch, "projected_from_B": row["B"], "branch": branch,
            "rows_kept": round(row["rows_kept"] * scale),
            "ghost_flops": costs[GHOST]["flops"], "instantiated_flops": costs[INSTANTIATED]["flops"],
            "ghost_cost": costs[GHOST]["cost"], "instantiated_cost": costs[INSTANTIATED]["cost"],
            "ghost_bytes": costs[GHOST]["bytes"], "instantiated_bytes": costs[INSTANTIATED]["bytes"],
            "extra_bytes": costs[branch]["bytes"], "held_bytes": costs[branch]["held"], "held_budget_bytes": held_left,
        }  # fmt: skip
        held_left -= costs[branch]["held"]
    return projected


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="nano", help="named captioner size (default nano)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per logical step (noise and AdamW once per K micro-batches; default 1)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--override", action="append", type=parse_override, default=[], metavar="KEY=VALUE", help="model override"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where a shared machine stalls multi-threaded ops; "
        "torch's default on CUDA)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier (timing only)")
    parser.add_argument("--seed", type=int, default=0, help="model init, images and (insecure, benchmark) noise")
    parser.add_argument("--naive", choices=("auto", "on", "off"), default="auto", help="time the per-example loop")
    parser.add_argument("--naive-max-batch", type=int, default=16, help="--naive auto times it up to this batch")
    parser.add_argument("--no-opacus", action="store_true", help="skip opacus entirely")
    parser.add_argument("--no-check", action="store_true", help="skip the gradient sanity check")
    parser.add_argument(
        "--check-batch-size", type=int, default=16, help="first N samples used by the sanity check and opacus probe"
    )
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast the forward (e.g. bf16 on GPU)")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead of one shape: a table over --scaling-sizes × --scaling-tokens × --scaling-batches",
    )
    parser.add_argument("--scaling-sizes", type=_names, default=SCALING_SIZES, help="comma-separated sizes")
    parser.add_argument("--scaling-tokens", type=_ints, default=SCALING_TOKENS, help="image tokens, e.g. 65,197")
    parser.add_argument("--scaling-batches", type=_ints, default=SCALING_BATCHES, help="batch sizes, e.g. 16,32")
    parser.add_argument("--scaling-opacus", action="store_true", help="time opacus ghost clipping in every cell")
    parser.add_argument(
        "--project-batch",
        type=int,
        default=None,
        metavar="B",
        help="also print the cost model's branch per layer at micro-batch B (a projection from the measured "
        "shapes, for sizes whose full micro-batch does not fit here; in the JSON as branches_projected)",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    args = parser.parse_args(argv)
    args.overrides = dict(args.override)
    if min(args.batch_size, args.iters, args.check_batch_size, args.accumulation) < 1 or args.warmup < 0:
        parser.error("--batch-size, --iters, --accumulation and --check-batch-size must be >= 1, --warmup >= 0")
    return args


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """One shape: the opacus probes and gradient check (unless switched off), then the timed methods."""
    started = time.perf_counter()
    shape_model = build_model(args, device)
    tokenizer = get_tokenizer(args.size, **args.overrides)
    images, tokens = make_batch(shape_model, tokenizer, args.batch_size, args.seed, device)
    extras: dict[str, object] = {"config": config_summary(args, device, shape_model, tokens)}
    del shape_model
    check_images, check_tokens = images[: args.check_batch_size], tokens[: args.check_batch_size]
    if not args.no_opacus:
        as_is = probe_opacus_as_is(args, check_images, check_tokens)
        view_routing = opacus_routing(opacus_wrap(OpacusView(build_model(args, device)), args.max_grad_norm))
        extras["opacus_as_is"] = as_is
        extras["opacus_view_routing"] = view_routing
        extras["opacus_view_max_abs_loss_diff"] = check_view_matches(args, check_images, check_tokens)
        extras["opacus_view_matches"] = extras["opacus_view_max_abs_loss_diff"] <= 1e-5
        extras["opacus_note"] = opacus_note(as_is, view_routing)
    if not args.no_check:
        extras["gradient_check"] = gradient_check(args, check_images, check_tokens)

    methods = [cls(args, images, tokens) for cls in method_classes(args)]
    times = time_interleaved(methods, args.warmup, args.iters, device)
    peaks = {m.name: step_peak_bytes(m, device) for m in methods}
    extras["branches"] = next(m for m in methods if m.name == "dpcap").clipper.branch_table()
    extras["load_average_end"] = os.getloadavg()
    extras["wall_seconds"] = time.perf_counter() - started
    return build_report(args, methods, times, peaks, extras)


SCALING_SIZES = ("nano", "tiny", "small")
SCALING_TOKENS = (65, 197)
SCALING_BATCHES = (16, 32, 64, 128)


def scaling_cell(args: argparse.Namespace, size: str, tokens: int, batch: int) -> argparse.Namespace:
    """The arguments of one scaling cell: ``size`` at the image size giving ``tokens`` image tokens
    (CLS + a square grid of patches), batch ``batch``; opacus only with ``--scaling-opacus``, no checks."""
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise SystemExit(f"error: --scaling-tokens {tokens} is not 1 + a square number of patches")
    patch = get_config(size, **args.overrides).vision.patch_size
    cell = copy.copy(args)
    cell.size, cell.batch_size = size, batch
    cell.overrides = {**args.overrides, "image_size": patch * grid}
    cell.no_opacus, cell.no_check, cell.naive = not args.scaling_opacus, True, "off"
    return cell


def scaling_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time and step-memory ratios of dpcap (and opacus ghost) vs non-private over sizes × T × B."""
    rows = []
    for size in args.scaling_sizes:
        for tokens in args.scaling_tokens:
            for batch in args.scaling_batches:
                cell = scaling_cell(args, size, tokens, batch)
                report = measure(cell, device)
                methods = report["methods"]
                row = {
                    "size": size,
                    "T": tokens,
                    "image_size": cell.overrides["image_size"],
                    "B": batch,
                    "nonprivate_s": methods["nonprivate"]["seconds_median"],
                    "dpcap_s": methods["dpcap"]["seconds_median"],
                    "time_ratio": report["time_ratio_vs_nonprivate"],
                    "memory_ratio": report["memory_ratio_vs_nonprivate"],
                    "nonprivate_peak_bytes": methods["nonprivate"]["peak_step_bytes"],
                    "dpcap_peak_bytes": methods["dpcap"]["peak_step_bytes"],
                    "opacus_ghost_time_ratio": report["opacus_ghost_time_ratio_vs_nonprivate"],
                    "opacus_ghost_memory_ratio": report["opacus_ghost_memory_ratio_vs_nonprivate"],
                    "instantiated_layers": sum(r["branch"] == "instantiated" for r in report["branches"]),
                    "ghost_layers": sum(r["branch"] == "ghost" for r in report["branches"]),
                    "images_per_s": {
                        name: cell.accumulation * batch / m["seconds_median"] for name, m in methods.items()
                    },
                }
                rows.append(row)
                print_scaling_row(row, header=len(rows) == 1)
    return rows


def print_scaling_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'size':<6} {'T':>4} {'px':>4} {'B':>4} {'nonpriv s':>9} {'dpcap s':>8} {'time x':>6} "
              f"{'mem x':>6} {'opacus x':>8}", file=sys.stderr)  # fmt: skip
    opacus = "-" if row["opacus_ghost_time_ratio"] is None else f"{row['opacus_ghost_time_ratio']:.3f}"
    print(f"{row['size']:<6} {row['T']:>4} {row['image_size']:>4} {row['B']:>4} {row['nonprivate_s']:>9.3f} "
          f"{row['dpcap_s']:>8.3f} {row['time_ratio']:>6.3f} {row['memory_ratio']:>6.3f} "
          f"{opacus:>8}", file=sys.stderr, flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.scaling:
        started = time.perf_counter()
        report = {
            "scaling": scaling_table(args, device),
            "config": {
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "threads": torch.get_num_threads(),
                "amp": args.amp,
                "warmup": args.warmup,
                "iters": args.iters,
                "accumulation": args.accumulation,
                "torch": torch.__version__,
                "load_average_end": os.getloadavg(),
            },
            "wall_seconds": time.perf_counter() - started,
        }
    else:
        report = measure(args, device)
        print_branch_table(report["branches"])
        if args.project_batch:
            report["branches_projected"] = project_branches(report["branches"], args.project_batch)
            print(f"projected to micro-batch {args.project_batch} (cost model, not measured):", file=sys.stderr)
            print_branch_table(report["branches_projected"])
    write_json_atomic(args.out, report)
    print(json.dumps(report, separators=(",", ":")))
    return report


if __name__ == "__main__":
    try:
        main()
    except DpcapError as error:  # a bad size or override: one line, exit 2, as the dpcap CLI
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
