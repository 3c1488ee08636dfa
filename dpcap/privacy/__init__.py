"""The privacy core: per-sample clipping, noise and accounting (pure maths; no I/O, no distributed)."""

from .accountant import Ledger, calibrate_sigma, epsilon
from .clipper import Clipper
from .noise import add_gaussian_noise_, secret_generator
from .planner import plan

__all__ = ["Clipper", "Ledger", "add_gaussian_noise_", "calibrate_sigma", "epsilon", "plan", "secret_generator"]
