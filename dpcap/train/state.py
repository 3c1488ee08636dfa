"""Checkpoints at logical-step boundaries, in step-named folders with an atomically replaced LAST.

Layout (an interface, DESIGN §4)::

    RUN_DIR/checkpoints/step_00000100/{model.safetensors, optimizer.safetensors, state.json}
    RUN_DIR/checkpoints/step_00000100/ema.safetensors  # only with train.ema_decay: EMA of the weights
    RUN_DIR/LAST                      # "step_00000100": the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, then LAST is
replaced (tmp + os.replace), so a kill at any moment leaves the previous checkpoint intact.
`state.json` holds the step, the (secret) sampler seed and the privacy ledger (invariant 5); the
noise generator's state is never saved (invariant 4). Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpcap.errors import DataError

LAST = "LAST"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainState:
    """What, besides the weights and optimizer moments, a resumed run needs to continue exactly."""

    step: int
    sampler_seed: int
    ledger: dict  # Ledger.state_dict()
    privacy: dict = field(default_factory=dict)  # sigma, sample_rate, delta, epsilon budget, … (the card)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sampler_seed": self.sampler_seed,
            "ledger": self.ledger,
            "privacy": self.privacy,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {"step", "sampler_seed", "ledger", "privacy"}
        return cls(
            data["step"],
            data["sampler_seed"],
            data["ledger"],
            data.get("privacy", {}),
            {k: v for k, v in data.items() if k not in known},
        )


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state into safetensors-ready tensors ('{index}.{key}')."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.Tensor],
    state: TrainState,
    keep: int = 2,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step_<state.step>` atomically, point LAST at it, prune older ones.

    `optimizer` may be given as its `optimizer_tensors` already (gathered from ZeRO partitions). `ema`
    (the EMA of the weights, same keys as the model) goes to `ema.safetensors` next to `model.safetensors`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"step": str(state.step)})
    moments = optimizer if isinstance(optimizer, dict) else optimizer_tensors(optimizer)
    save_file(moments, tmp / "optimizer.safetensors")
    if ema is not None:
        save_file(ema, tmp / EMA_FILE, metadata={"step": str(state.step)})
    _write_json(tmp / "state.json", state.to_json())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = Path(run_dir) / LAST
    pointer_tmp = pointer.with_name(LAST + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, pointer)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder LAST points to, or None for a fresh run."""
    pointer = Path(run_dir) / LAST
    if not pointer.is_file():
        return None
    folder = Path(run_dir) / "checkpoints" / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        raise DataError(f"{pointer} points to {folder}, which is not a complete checkpoint")
    return folder


def load_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA weights saved with a checkpoint (DataError if the run did not keep them)."""
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        raise DataError(f"{folder} has no {EMA_FILE} (the run was trained without train.ema_decay)")
    return load_file(path)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Load weights (strictly: every key must match), optimizer moments and the train state."""
    folder = Path(folder)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise DataError(
            f"{folder}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if optimizer is not None:
        load_optimizer_tensors(optimizer, load_file(folder / "optimizer.safetensors"))
    return TrainState.from_json(json.loads((folder / "state.json").read_text()))
