"""Gaussian noise for DP-SGD from a secret generator (privacy invariant 4).

The generator is seeded from ``os.urandom`` every time a process starts and its seed is neither
stored nor returned, so noise never repeats across restarts or ranks. A fixed seed exists only
for tests (``insecure_seed``); a run that uses one is not private.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

from dpcap.errors import ConfigError, PrivacyError

__all__ = ["NOISE_CHUNK_ELEMENTS", "add_gaussian_noise_", "secret_generator"]

_SEED_LIMIT = 1 << 64


def secret_generator(device: str | torch.device = "cpu", *, insecure_seed: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from 8 bytes of ``os.urandom``.

    ``insecure_seed`` (tests only) replaces the secret seed with a fixed one, making the noise
    reproducible and the run NOT private.
    """
    generator = torch.Generator(device=device)
    if insecure_seed is None:
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    else:
        generator.manual_seed(_check_seed(insecure_seed))
    return generator


# On the CPU, noise is drawn into one scratch buffer of this many float32 (1 MiB) and added chunk by chunk:
# a fresh tensor-sized buffer per parameter costs page faults and a pass through memory that a cache-sized
# one does not (on the tiny captioner's 23M parameters, one thread: 80 ms instead of 128 ms).
NOISE_CHUNK_ELEMENTS = 1 << 18


def add_gaussian_noise_(tensors: Sequence[torch.Tensor], *, std: float, generator: torch.Generator) -> None:
    """Add independent N(0, std²) noise in place to every element of every tensor.

    The noise is drawn in float32 from ``generator`` (which must live on each tensor's device) as
    ``normal_(0, std)`` (std = σ·C, the Gaussian mechanism's standard deviation for sensitivity C):
    tensor by tensor, in order, and on the CPU for contiguous tensors in consecutive chunks of
    `NOISE_CHUNK_ELEMENTS` elements. It is added in float32 for half-precision tensors (rounded once)
    or in the tensor's own precision otherwise. ``std == 0`` adds nothing. All tensors are checked
    before any is modified.
    """
    std = _check_std(std)
    for index, tensor in enumerate(tensors):
        _check_tensor(index, tensor, generator)
    if std == 0.0:
        return
    scratch = None
    with torch.no_grad():
        for tensor in tensors:
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                noise = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
                _add_(tensor, noise.normal_(0.0, std, generator=generator))
                continue
            if scratch is None:
                scratch = torch.empty(NOISE_CHUNK_ELEMENTS, dtype=torch.float32)
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), NOISE_CHUNK_ELEMENTS):
                piece = flat[start : start + NOISE_CHUNK_ELEMENTS]
                _add_(piece, scratch[: piece.numel()].normal_(0.0, std, generator=generator))


def _add_(tensor: torch.Tensor, noise: torch.Tensor) -> None:
    if torch.finfo(tensor.dtype).bits < 32:
        tensor.copy_(tensor.float().add_(noise))
    else:
        tensor.add_(noise.to(tensor.dtype))


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < _SEED_LIMIT:
        raise ConfigError(f"insecure_seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _check_std(std: object) -> float:
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0.0 <= float(std) < math.inf:
        raise ConfigError(f"noise std must be a finite number >= 0, got {std!r}")
    return float(std)


def _check_tensor(index: int, tensor: torch.Tensor, generator: torch.Generator) -> None:
    if not tensor.is_floating_point():
        raise PrivacyError(f"cannot add Gaussian noise to tensor {index} of dtype {tensor.dtype}")
    if not _same_device(tensor.device, generator.device):
        raise PrivacyError(
            f"noise generator is on {generator.device} but tensor {index} is on {tensor.device}; "
            "create the generator on the tensor's device"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, reading a missing index (``cuda``) as the current device of that type."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type == "cpu":
        return True
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
