"""The sbatch templates on a real slurm (Debian's slurmctld/slurmd/munge on loopback, started here).

One 2-task CPU job (gloo) trains a few DP steps; one is sent SIGUSR1 mid-run, stops at a step
boundary, requeues itself and finishes exactly like the uninterrupted run; one runs out of ε budget
(exit 3) and is not requeued. The cluster comes from the repo's slurm/local/start_local_slurm.sh
(it installs the Debian packages when missing); it is stopped at the end if this session started it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpcap.privacy.accountant import Ledger, epsilon
from tests.conftest import train_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "slurm" / "local"  # the local cluster bring-up travels with the repo
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 8
SIGMA, Q, DELTA = 1.0, 16 / 48, 1 / 48  # train_overrides: σ = 1, batch 16 of N = 48, δ = 1/N


def _slurm_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def local_slurm():
    """A single-node slurm on loopback; reuses one that is already up (and then leaves it up)."""
    if not (TOOLS / "start_local_slurm.sh").is_file():
        pytest.skip(f"no {TOOLS}/start_local_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the local slurm cluster must be started as root")
    started = not _slurm_up()
    if started:
        env = {**os.environ, "LOCAL_SLURM_ACCOUNTING": "0"}
        subprocess.run([str(TOOLS / "start_local_slurm.sh")], env=env, check=True, capture_output=True, timeout=900)
    yield
    if started:
        subprocess.run([str(TOOLS / "stop_local_slurm.sh")], capture_output=True, timeout=120)


def sbatch(template: str, run_dir: Path, out: Path, extra: list[str], *options: str) -> str:
    """Submit slurm/TEMPLATE as 2 CPU tasks on one node; returns the job id."""
    env = {**os.environ, "RUN_DIR": str(run_dir), "EXTRA": " ".join(extra), "PYTHON": sys.executable}
    env.pop("CONFIG", None)
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        "--signal=B:USR1@30",
        f"--output={out}",
        *options,
        str(REPO / "slurm" / template),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=60)
    return done.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no output yet)"
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job output:\n{text[-4000:]}")
        time.sleep(0.1)


def wait_job(job_id: str, log: Path, timeout: float = 600) -> dict[str, str]:
    wait_until(lambda: job_info(job_id).get("JobState") in FINAL_STATES, timeout, f"job {job_id} to end", log)
    return job_info(job_id)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def last_state(run_dir: Path) -> dict:
    last = (run_dir / "LAST").read_text().strip()
    return json.loads((run_dir / "checkpoints" / last / "state.json").read_text())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / (run_dir / "LAST").read_text().strip() / "model.safetensors")


def run_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """The tiny deterministic run, checkpointed only at the end (or when stopped); run_dir comes from RUN_DIR."""
    base = {"train.steps": STEPS, "train.checkpoint_every": 100, **extra}
    return [o for o in train_overrides(shards, run_dir, **base) if not o.startswith("run_dir=")] + ["--json"]


def rank_summaries(text: str) -> dict[int, list[dict]]:
    """The `--json` summaries each rank printed (srun --label prefixes lines with the task id)."""
    found: dict[int, list[dict]] = {}
    for rank, line in re.findall(r"^(\d+): (\{.*\})$", text, flags=re.M):
        found.setdefault(int(rank), []).append(json.loads(line))
    return found


@pytest.fixture(scope="module")
def uninterrupted(local_slurm, tiny_shards, tmp_path_factory) -> tuple[Path, str, dict]:
    """Job (a): 2 tasks, STEPS steps, through slurm/train_1node.sbatch."""
    root = tmp_path_factory.mktemp("slurm_a")
    run_dir, log = root / "run", root / "job.out"
    job_id = sbatch("train_1node.sbatch", run_dir, log, run_overrides(tiny_shards, run_dir))
    info = wait_job(job_id, log)
    return run_dir, log.read_text(), info


def test_two_task_job_trains_and_keeps_the_ledger(uninterrupted):
    run_dir, output, info = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), output
    assert "0: [launch] rank 0 of 2" in output and "1: [launch] rank 1 of 2" in output
    summaries = rank_summaries(output)
    assert sorted(summaries) == [0, 1]
    assert all(s[-1]["step"] == STEPS and s[-1]["done"] for s in summaries.values())
    assert (run_dir / "LAST").read_text().strip() == f"step_{STEPS:08d}"
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))
    state = last_state(run_dir)
    ledger = Ledger.from_state_dict(state["ledger"])
    assert [tuple(seg) for seg in ledger.segments] == [(SIGMA, pytest.approx(Q), STEPS)]
    assert state["privacy"]["epsilon"] == pytest.approx(epsilon(SIGMA, Q, STEPS, DELTA))


def test_preempted_job_requeues_and_resumes_exactly(uninterrupted, tiny_shards, tmp_path):
    """(b) SIGUSR1 to the batch shell mid-run → step boundary, checkpoint, requeue, resume, no double count."""
    reference, _, _ = uninterrupted
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch("train_multinode.sbatch", run_dir, log, run_overrides(tiny_shards, run_dir))
    wait_until(lambda: len(metrics_steps(run_dir)) >= 1, 600, "the first logical step", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)

    def requeued_or_over() -> bool:
        info = job_info(job_id)
        state = info.get("JobState")
        return (info.get("Restarts", "0") != "0" and state in ("PENDING", "RUNNING")) or state in FINAL_STATES

    wait_until(requeued_or_over, 600, "the job to requeue itself", log)
    if job_info(job_id).get("JobState") == "PENDING":
        # Slurm holds a requeued job ~2 min (credential expiry). Release it sooner, but not within the
        # second the old credential was revoked: a start then is killed ("Job credential revoked").
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], check=True, timeout=30)
    info = wait_job(job_id, log)
    output = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    assert "received SIGUSR1" in output and f"requeueing job {job_id}" in output and "attempt 2" in output
    stops = [s for runs in rank_summaries(output).values() for s in runs if s["stopped_by"] == "SIGUSR1"]
    assert len(stops) == 2 and 1 <= stops[0]["step"] < STEPS and not stops[0]["done"]  # both ranks stopped
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))  # each step logged once
    ledger = Ledger.from_state_dict(last_state(run_dir)["ledger"])
    assert ledger.steps == STEPS  # the interrupted step count is not counted twice
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon(SIGMA, Q, STEPS, DELTA))
    resumed, straight = final_weights(run_dir), final_weights(reference)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7, msg=name)


def test_budget_exhausted_job_is_not_requeued(local_slurm, tiny_shards, tmp_path):
    """(c) ε budget just above one step's: step 2 is refused (exit 3) and the job fails without requeue."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    budget = epsilon(SIGMA, Q, 1, DELTA) * 1.05
    extra = run_overrides(tiny_shards, run_dir, **{"privacy.epsilon": budget, "train.checkpoint_every": 1})
    job_id = sbatch("train_1node.sbatch", run_dir, log, extra)
    info = wait_job(job_id, log)
    output = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), output
    assert "srun exited with code 3" in output and "NOT requeueing" in output
    assert "the next step would spend" in output  # the budget guard's message, from the ranks
    state = last_state(run_dir)
    assert state["step"] == 1 and Ledger.from_state_dict(state["ledger"]).steps == 1
    assert metrics_steps(run_dir) == [1]
