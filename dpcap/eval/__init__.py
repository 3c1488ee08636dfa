"""Evaluation of frozen encoders: feature extraction (cached) and linear probes.

Import the submodules directly (``dpcap.eval.probe``, ``dpcap.eval.features``); the names below are
re-exported lazily so that importing ``dpcap.eval`` stays cheap and free of side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LinearHead": "probe",
    "fit_logistic_regression": "probe",
    "linear_probe": "probe",
    "sgd_probe": "probe",
    "confusion_matrix": "probe",
    "save_confusion_png": "probe",
    "save_accuracy_bars_png": "probe",
    "caption_samples": "captions",
    "save_captions_png": "captions",
    "extract_features": "features",
    "cached_features": "features",
    "labelled_features": "features",
    "few_shot": "fewshot",
    "shot_indices": "fewshot",
    "zero_shot": "zeroshot",
    "zero_shot_accuracy": "zeroshot",
    "ZeroShotClassifier": "zeroshot",
    "PromptTrie": "zeroshot",
    "score_prompts": "zeroshot",
    "template_prompts": "zeroshot",
    "run_audit": "audit",
    "epsilon_lower_bound": "audit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dpcap.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dpcap.eval' has no attribute {name!r}")
