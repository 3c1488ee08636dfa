"""Is a run finished? Read from the run folder (an interface, DESIGN §4), without importing torch.

    python launch/status.py RUN_DIR [--fields step,steps,done]

Prints one JSON object ``{"run_dir", "step", "steps", "done"}`` (with --fields: those values, space
separated, JSON-encoded, for `read` in a shell script) and exits 0
when the run is done, 1 when it can be resumed (or has not started), 2 when RUN_DIR is unreadable.
`step` is the step of the checkpoint LAST points to (0 before the first one); `steps` is
`train.steps` of the resolved `config.yaml` (None before the run has started).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def run_status(run_dir: str | Path) -> dict:
    """Step of the LAST checkpoint and the run's target `train.steps`; done when the former reaches the latter."""
    run = Path(run_dir)
    config = run / "config.yaml"
    steps = yaml.safe_load(config.read_text())["train"]["steps"] if config.is_file() else None
    pointer = run / "LAST"
    step = 0
    if pointer.is_file():
        state = run / "checkpoints" / pointer.read_text().strip() / "state.json"
        step = int(json.loads(state.read_text())["step"])
    return {"run_dir": str(run), "step": step, "steps": steps, "done": steps is not None and step >= steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/status.py", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--fields", help="comma-separated keys: print only their values, space separated")
    args = parser.parse_args(argv)
    try:
        status = run_status(args.run_dir)
        values = [status[key] for key in args.fields.split(",")] if args.fields else [status]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: {args.run_dir}: not a readable run folder, or an unknown field ({err!r})", file=sys.stderr)
        return 2
    print(" ".join(json.dumps(value) for value in values))
    return 0 if status["done"] else 1


if __name__ == "__main__":
    sys.exit(main())
