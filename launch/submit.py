"""Submit `dpcap train` to slurm with submitit, as a checkpointable job that requeues itself.

    python -m launch.submit CONFIG [key=value …] --run-dir RUN_DIR \\
        [--nodes 16 --gpus-per-node 8 --partition P --timeout-min 2880 --signal-delay-s 900]

Run it from the repository root (the job imports `launch.submit` from there). submitit is not a
core dependency (`pip install 'dpcap[dist]'`); it is imported only when a job is submitted or
requeued, with a clear error if it is missing.

Pre-emption and time limits: submitit starts nodes × tasks-per-node tasks, each calling
`TrainJob()` (rank, world and rendezvous come from SLURM_* in `dpcap.train.world`), and asks slurm
for SIGUSR1 `signal_delay_s` before the time limit. While the training loop runs, dpcap's own handler
takes that signal: every rank finishes the current logical step, rank 0 checkpoints, and
`dpcap train` returns. `TrainJob` then hands the signal back to submitit's handler, which on rank 0
calls `checkpoint()` — the same call again, since the run folder already holds the checkpoint — and
requeues the job; the next attempt resumes from RUN_DIR/LAST. Exit code 3 (the privacy budget
forbids the next step) raises BudgetExceededError and is never requeued.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpcap.errors import BudgetExceededError, DpcapError
from launch.status import run_status
from launch.train import EXIT_STOPPED

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_submitit() -> Any:
    """submitit, or a DpcapError (exit 2) saying how to install it."""
    try:
        import submitit
    except ImportError as err:
        raise DpcapError(
            "launch/submit.py needs submitit, which is not installed: pip install 'dpcap[dist]' "
            "(or use the sbatch templates in slurm/, which need nothing beyond slurm)"
        ) from err
    return submitit


@dataclass(frozen=True)
class TrainJob:
    """A picklable `dpcap train` call: `__call__` trains or resumes the run, `checkpoint()` requeues it."""

    run_dir: str
    train_args: tuple[str, ...] = ()  # CONFIG and key=value overrides, as for `dpcap train`

    def argv(self) -> list[str]:
        return ["train", *self.train_args, f"run_dir={self.run_dir}"]

    def __call__(self) -> dict:
        """Train on this task; returns the run folder's status (step, steps, done)."""
        from dpcap.cli import main
        from dpcap.train.world import shutdown_distributed

        try:
            code = main(self.argv())
        finally:
            shutdown_distributed()
        if code == BudgetExceededError.exit_code:
            raise BudgetExceededError(f"{self.run_dir}: the privacy budget forbids the next step (not requeued)")
        if code not in (0, EXIT_STOPPED):
            raise DpcapError(f"{self.run_dir}: dpcap train exited with code {code} (not requeued)")
        status = run_status(self.run_dir)
        if not status["done"]:
            _hand_signal_to_submitit()
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 at pre-emption/timeout: resubmit the same call.

        Nothing to save here: the training loop checkpoints at the step boundary itself (and a
        signal that arrives before the loop starts loses no step), so the requeued job resumes
        from RUN_DIR/LAST.
        """
        return import_submitit().helpers.DelayedSubmission(TrainJob(self.run_dir, self.train_args), *args, **kwargs)


def _hand_signal_to_submitit() -> None:
    """The loop stopped on SIGUSR1/SIGTERM before the end: let submitit's SIGUSR1 handler (installed at
    job start, restored when the loop exits) checkpoint and requeue. Outside submitit, do nothing."""
    if callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit.AutoExecutor.update_parameters(...) for one task per GPU (or --tasks-per-node on CPUs)."""
    params: dict[str, Any] = {
        "name": args.name,
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node or max(1, args.gpus_per_node),
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout_min,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_setup": ["export OMP_NUM_THREADS=1"],
        "slurm_additional_parameters": {"requeue": True, "chdir": str(REPO_ROOT)},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    return params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n")[0])
    parser.add_argument("train_args", nargs="+", metavar="CONFIG|KEY=VALUE", help="as for `dpcap train`")
    parser.add_argument("--run-dir", required=True, help="the run folder; requeued attempts resume from its LAST")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU; 0 for CPU-only (gloo)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node (1 on CPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--timeout-min", type=int, default=48 * 60)
    parser.add_argument(
        "--signal-delay-s", type=int, default=900, help="SIGUSR1 this long before the time limit (≥ one step)"
    )
    parser.add_argument("--max-requeues", type=int, default=100, help="submitit's slurm_max_num_timeout")
    parser.add_argument("--name", default="dpcap-train")
    parser.add_argument("--folder", default=None, help="submitit logs (default RUN_DIR/submitit/%%j)")
    return parser


def submit(args: argparse.Namespace) -> Any:
    """Submit TrainJob through submitit; returns the submitit Job."""
    submitit = import_submitit()
    folder = args.folder or str(Path(args.run_dir) / "submitit" / "%j")
    executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**executor_parameters(args))
    return executor.submit(TrainJob(args.run_dir, tuple(args.train_args)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        job = submit(args)
    except DpcapError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"submitted job {job.job_id}: run {args.run_dir}, logs in {job.paths.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
