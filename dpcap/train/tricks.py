"""Optional DP training tricks, each behind a config switch (all off by default).

- EMA of the weights for evaluation (De et al. 2022, "Unlocking high-accuracy DP image classification
  through scale"): e_t = d·e_{t−1} + (1 − d)·θ_t with e_0 = θ_0. A function of the released DP iterates
  only, so post-processing: no privacy cost.
- Augmentation multiplicity (De et al. 2022): each example's loss is the mean over K random views
  *before* clipping, so an example still contributes one clipped gradient (sensitivity unchanged).
- Public warm start and pull toward the public weights, and public + private gradient mixing
  (e.g. Kurakin et al. 2022; Sander et al. 2023, "TAN without a burn"; Nasr et al. 2023): public data
  enters without clipping or noise and is outside N and q, so the accounting is unchanged; these are
  post-processing of the DP update with public inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dpcap.errors import ConfigError, DataError


@dataclass(frozen=True)
class StepTricks:
    """The optional tricks of one logical step (the defaults switch every one off).

    `augmentation_multiplicity` K views per example averaged before clipping, their randomness from
    `augment_generator`; `public_batch` mixed into the noisy update with `public_weight`; a pull of
    strength `public_pull` toward the public weights `anchors`.
    """

    augmentation_multiplicity: int = 1
    augment_generator: torch.Generator | None = None
    public_batch: Any = None  # a dpcap.data.reader.Batch of public data
    public_weight: float = 0.0
    anchors: list[torch.Tensor] | None = None
    public_pull: float = 0.0


NO_TRICKS = StepTricks()

# Random resized crop: area fraction and aspect-ratio ranges (torchvision's defaults, area raised to 0.35).
_CROP_SCALE = (0.35, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


class EMA:
    """Exponential moving average of a model's floating-point state: e ← d·e + (1 − d)·θ."""

    def __init__(self, model: torch.nn.Module, decay: float, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = float(decay)
        state = model.state_dict()
        if tensors is None:
            tensors = {k: v.detach().clone() for k, v in state.items()}
        elif tensors.keys() != state.keys():
            raise DataError(
                f"EMA weights do not match the model (keys differ, e.g. {sorted(tensors.keys() ^ state.keys())[:3]})"
            )
        self.tensors = {k: tensors[k].to(state[k].device, state[k].dtype) for k in state}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.tensors[name].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.tensors[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}


def random_resized_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image: random resized crop (bilinear back to H×W) + horizontal flip w.p. ½.

    `images` is a (B, C, H, W) tensor (already normalised); every random number comes from `generator`
    (CPU), so views are reproducible from its seed and independent of any global RNG.
    """
    _, _, height, width = images.shape
    views = []
    for image in images:
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        area = height * width * (_CROP_SCALE[0] + u[0] * (_CROP_SCALE[1] - _CROP_SCALE[0]))
        log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
        ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
        h = min(height, max(1, round(math.sqrt(area / ratio))))
        w = min(width, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        crop = image[:, top : top + h, left : left + w].unsqueeze(0)
        view = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        views.append(view.flip(-1) if u[2] < 0.5 else view)
    return torch.stack(views) if views else images.clone()


def augmentation_seed(sampler_seed: int, step: int, rank: int) -> int:
    """Per (step, rank) seed derived from the run's secret sampler seed (the insecure one in tests)."""
    return int(np.random.SeedSequence([sampler_seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_public_weights(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ_public from a safetensors file (a run's model.safetensors), checked to match `model` exactly."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.init_from: no such file {path}")
    try:
        tensors = load_file(file)
    except Exception as err:  # safetensors raises its own error types on a malformed header
        raise DataError(f"model.init_from: {path} is not a readable safetensors file ({err})") from None
    state = model.state_dict()
    missing, unexpected = sorted(state.keys() - tensors.keys()), sorted(tensors.keys() - state.keys())
    wrong = [k for k in state.keys() & tensors.keys() if tensors[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise DataError(
            f"model.init_from: {path} does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]})"
        )
    return tensors


@torch.no_grad()
def mix_public_(params: list[torch.nn.Parameter], public_grads: list[torch.Tensor], weight: float) -> None:
    """grad ← (1 − w)·grad + w·ḡ_public (the DP update is already noised and divided by qN)."""
    for p, g in zip(params, public_grads):
        p.grad.mul_(1 - weight).add_(g, alpha=weight)


@torch.no_grad()
def pull_toward_(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], strength: float) -> None:
    """grad ← grad + λ·(θ − θ_public): the gradient of (λ/2)‖θ − θ_public‖², a public-data regulariser."""
    for p, anchor in zip(params, anchors):
        p.grad.add_(p.detach() - anchor, alpha=strength)
