"""One training entry point for torchrun, the deepspeed launcher and srun.

    torchrun --nproc_per_node 8 launch/train.py CONFIG [key=value …] [--resume RUN_DIR] [--json]
    deepspeed --num_gpus 8 launch/train.py CONFIG [key=value …]    # adds --local_rank=N: ignored
    srun python launch/train.py CONFIG [key=value …]                 # one task per GPU

The arguments are those of `dpcap train`. Rank, world size and the rendezvous come from the
launcher's environment, read only by `dpcap.train.world` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* or
SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST, with MASTER_PORT derived from SLURM_JOB_ID).

Exit codes are those of `dpcap train` — 0 finished; 2 a user error; 3 the privacy budget forbids
the next step (never requeue); 4 (EXIT_STOPPED) stopped by SIGTERM/SIGUSR1 at a step boundary after
checkpointing, or before training started (imports, rendezvous, model build): resume from LAST.
"""

from __future__ import annotations

import signal
import sys

from dpcap.errors import EXIT_STOPPED  # a light import: no torch yet

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_LAUNCHER_FLAGS = ("--local_rank", "--local-rank")


class StartupInterrupted(BaseException):
    """Raised by the start-up signal handler; BaseException so no library `except Exception` eats it."""


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` that the deepspeed launcher (or torch.distributed.launch)
    adds: LOCAL_RANK is in the environment, which is what `dpcap.train.world` reads."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_FLAGS:
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _interrupt(signum: int, frame: object) -> None:
    raise StartupInterrupted(signal.Signals(signum).name)


def run(argv: list[str]) -> int:
    """`dpcap train ARGV` in this process, then leave the process group. Returns the exit code.

    SIGTERM/SIGUSR1 abort start-up cleanly (EXIT_STOPPED) instead of killing the process; the
    training loop installs its own handlers (finish the step, checkpoint) while it runs.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in _STOP_SIGNALS}
    try:
        return _train(strip_launcher_args(argv))
    except StartupInterrupted as stop:
        print(f"[launch] {stop} outside the training loop: nothing new to save, resume from LAST", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(argv: list[str]) -> int:
    # Imported once the handlers are in place: importing torch takes seconds.
    from dpcap.cli import main
    from dpcap.train.world import detect_world, shutdown_distributed

    world = detect_world()
    print(
        f"[launch] rank {world.rank} of {world.world_size} (local rank {world.local_rank}, "
        f"rendezvous {world.master_addr}:{world.master_port})",
        file=sys.stderr,
        flush=True,
    )
    try:
        return main(["train", *argv])
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
