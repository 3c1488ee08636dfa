"""The privacy core: per-sample clipping, noise and accounting (pure maths; no I/O, no distributed)."""

from .clipper import Clipper

__all__ = ["Clipper"]
