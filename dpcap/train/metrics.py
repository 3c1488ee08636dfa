"""Rank-0 metric writer: one JSON line per logical step, wandb (offline by default), a progress bar.

Like big_vision's metric writer it fails loudly on a non-finite loss instead of training on.
Logged losses and norm statistics are for the operator: they are not covered by the DP guarantee
(invariant 6) — only the weights are.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dpcap.errors import DpcapError


class NonFiniteLossError(DpcapError):
    """Training produced a NaN/inf loss; the run stops at the last good checkpoint."""


class MetricWriter:
    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        wandb_mode: str = "offline",
        project: str = "dpcap",
        config: dict | None = None,
        progress: bool = True,
        enabled: bool = True,
        start_step: int = 0,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._wandb_run = None
        self._bar = None
        if not enabled:
            return
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb_run = wandb.init(
                project=project, dir=str(run_dir), mode=wandb_mode, config=config, resume="allow", id=_wandb_id(run_dir)
            )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="dp steps", unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        loss = record.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {record.get('step')}; resume from the last checkpoint"
            )
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(record, step=record["step"])
        if self._bar is not None:
            self._bar.update(1)
            # epsilon is None for a non-private run (σ = 0) and loss is absent after an empty batch.
            self._bar.set_postfix(
                loss=_format(record.get("loss"), ".3f", missing="n/a"),
                eps=_format(record.get("epsilon"), ".2f", missing="∞"),
            )

    def warn(self, message: str) -> None:
        """A warning line on stderr (rank 0 only), written above the progress bar when there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"warning: {message}", file=sys.stderr)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def _format(value: Any, spec: str, *, missing: str) -> str:
    """`value` in format `spec`; `missing` for None, and plain str() for anything `spec` does not fit."""
    if value is None:
        return missing
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def skipped_totals(path: Path) -> dict[str, int]:
    """{reason: count} of the samples skipped over every step logged in ``metrics.jsonl`` (a resumed run's
    earlier steps included); a record with skipped samples but no reasons counts them as "unknown"."""
    totals: Counter[str] = Counter()
    for record in read_metrics(path):
        reasons = record.get("skipped_reasons")
        if reasons:
            totals.update({str(k): int(v) for k, v in reasons.items()})
        elif record.get("skipped"):
            totals["unknown"] += int(record["skipped"])
    return dict(sorted(totals.items()))


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from (those steps will be redone)."""
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss and ε against the logical step, as one PNG (matplotlib Agg, no display)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.6))
    # A step with an empty batch has no loss and a non-private run no ε: plotted as gaps (NaN).
    ax_loss.plot(steps, [_number(r.get("loss")) for r in records])
    ax_loss.set(xlabel="logical step", ylabel="train loss (not private)", title="loss")
    ax_eps.plot(steps, [_number(r.get("epsilon")) for r in records], color="tab:red")
    ax_eps.set(xlabel="logical step", ylabel="ε spent", title="privacy")
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return Path(out_png)
