"""Checkpoints at logical-step boundaries, in step-named folders with an atomically replaced LAST.

Layout (an interface, DESIGN §4)::

    RUN_DIR/checkpoints/step_00000100/{model.safetensors, optimizer.safetensors, state.json}
    RUN_DIR/checkpoints/step_00000100/ema.safetensors  # only with train.ema_decay: EMA of the weights
    RUN_DIR/LAST                      # "step_00000100": the newest complete checkpoint

A checkpoint folder is written under a temporary name, every file fsync'd, and renamed when
complete, then LAST is replaced (tmp + os.replace), so a kill at any moment leaves the previous
checkpoint intact. `state.json` records each file's size and sha256 and its own checksum; a resume
verifies the checkpoint LAST names and falls back to the newest one that verifies (saying so).
Pruning keeps the newest by step and never the one just written.
`state.json` holds the step, the (secret) sampler seed and the privacy ledger (invariant 5); the
noise generator's state is never saved (invariant 4). Nothing is unpickled on load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpcap.errors import DataError, StorageError

LAST = "LAST"
EMA_FILE = "ema.safetensors"
STATE_DIGEST_KEY = "state_sha256"
_STEP_FOLDER = re.compile(r"step_\d{8}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _state_digest(data: dict) -> str:
    """Checksum of state.json's content other than the checksum itself (canonical JSON)."""
    rest = {k: v for k, v in data.items() if k != STATE_DIGEST_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


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
    Every file is fsync'd, and its size and sha256 recorded in state.json (itself checksummed), before
    LAST is replaced. A full disk raises `StorageError` (exit 2) with the previous checkpoint intact.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / checkpoint_name(state.step)
    tmp = root / (final.name + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"step": str(state.step)})
        moments = optimizer if isinstance(optimizer, dict) else optimizer_tensors(optimizer)
        save_file(moments, tmp / "optimizer.safetensors")
        if ema is not None:
            save_file(ema, tmp / EMA_FILE, metadata={"step": str(state.step)})
        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync_path(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        data = {**state.to_json(), "files": files}
        data[STATE_DIGEST_KEY] = _state_digest(data)
        _write_json(tmp / "state.json", data)
        _fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        pointer = Path(run_dir) / LAST
        pointer_tmp = pointer.with_name(LAST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, pointer)
        _fsync_path(Path(run_dir))
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in _DISK_FULL:
            previous = _pointed_name(Path(run_dir))
            raise StorageError(
                f"no space left on the device of {root} while writing checkpoint {final.name}"
                f"{f'; {previous} is intact' if previous else ''}: free space and resume"
            ) from None
        raise
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, written: str) -> None:
    """Keep the `keep` newest checkpoints by step (and always `written`, the one LAST now names)."""
    for old in _step_folders(root)[:-keep]:
        if old.name != written:
            shutil.rmtree(old, ignore_errors=True)


def _step_folders(root: Path) -> list[Path]:
    """The complete checkpoint folders (`step_NNNNNNNN`, not `.tmp`), oldest step first."""
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def _pointed_name(run_dir: Path) -> str | None:
    """The folder name LAST holds, if it is a well-formed checkpoint name (never a path)."""
    pointer = run_dir / LAST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return name if _STEP_FOLDER.fullmatch(name) else None


def verify_checkpoint(folder: Path) -> str | None:
    """None if the checkpoint is whole: state.json parses and matches its checksum, every file it lists has
    its size and sha256, the ledger counts the checkpoint's step; else what is wrong."""
    try:
        data = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as err:
        return f"state.json unreadable ({err})"
    if not isinstance(data, dict):
        return "state.json is not an object"
    if STATE_DIGEST_KEY in data and data[STATE_DIGEST_KEY] != _state_digest(data):
        return "state.json does not match its checksum"
    try:
        step = data["step"]
        ledger_steps = sum(int(seg["steps"]) for seg in data["ledger"].get("segments", []))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"state.json lacks a step or ledger ({err!r})"
    if folder.name != checkpoint_name(step):
        return f"state.json says step {step}"
    if ledger_steps != step:
        return f"the ledger records {ledger_steps} steps for a checkpoint at step {step}"
    files = data.get("files")
    if files is None:  # written before checksums were recorded: the weights must at least be there
        return None if (folder / "model.safetensors").is_file() else "model.safetensors is missing"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_checkpoint(run_dir: Path, *, log=None) -> Path | None:
    """The checkpoint to resume from: the one LAST names if it verifies, else the newest by step that does.

    None for a fresh run (no checkpoint at all). Each checkpoint passed over is reported through
    `log` (default: stderr). `DataError` (exit 2) when checkpoints exist but none verifies.
    """
    run_dir = Path(run_dir)
    log = log or (lambda text: print(f"[dpcap] {text}", file=sys.stderr))
    root = run_dir / "checkpoints"
    pointer = run_dir / LAST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and not _STEP_FOLDER.fullmatch(named):
        log(f"{pointer} holds {named!r}, not a checkpoint folder name: ignored")
        named = None
    found = _step_folders(root) if root.is_dir() else []
    candidates = ([root / named] if named else []) + [p for p in reversed(found) if p.name != named]
    problems = []
    for folder in candidates:
        problem = "missing" if not folder.is_dir() else verify_checkpoint(folder)
        if problem is None:
            if problems:
                log(f"resuming from {folder.name}: " + "; ".join(problems))
            return folder
        problems.append(f"{folder.name} passed over ({problem})")
    if problems:
        raise DataError(f"no checkpoint in {root} verifies: " + "; ".join(problems))
    return None


def set_aside_newer_checkpoints(run_dir: Path, step: int) -> list[str]:
    """Rename checkpoints newer than the one resumed from (passed over: they did not verify) to ``….unverified``:
    kept for inspection, never pruned, and never outranking the checkpoints this run writes."""
    root = Path(run_dir) / "checkpoints"
    moved = []
    for folder in _step_folders(root) if root.is_dir() else []:
        if int(folder.name.removeprefix("step_")) > step:
            target = folder.with_name(f"{folder.name}.unverified")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            moved.append(f"{folder.name} is newer than the resumed step {step}: moved to {target.name}")
    return moved


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
    data = json.loads((folder / "state.json").read_text())
    for key in ("files", STATE_DIGEST_KEY):
        data.pop(key, None)
    return TrainState.from_json(data)
