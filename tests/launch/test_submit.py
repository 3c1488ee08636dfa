"""launch/submit.py without submitit: executor parameters, the job function, the hand-off, the error."""

from __future__ import annotations

import importlib.util
import signal
from argparse import Namespace

import pytest

from dpcap.errors import BudgetExceededError, DpcapError
from dpcap.privacy.accountant import epsilon
from launch.submit import REPO_ROOT, TrainJob, _hand_signal_to_submitit, executor_parameters, import_submitit, main
from tests.conftest import train_overrides

HAVE_SUBMITIT = importlib.util.find_spec("submitit") is not None


def namespace(**overrides) -> Namespace:
    defaults = dict(
        name="dpcap-train",
        nodes=16,
        gpus_per_node=8,
        tasks_per_node=None,
        cpus_per_task=10,
        timeout_min=2880,
        signal_delay_s=900,
        partition="learn",
        account=None,
    )
    return Namespace(**{**defaults, **overrides})


def test_executor_parameters_dpcap_scale():
    params = executor_parameters(namespace())
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (16, 8, 8)  # one task per GPU
    assert params["slurm_signal_delay_s"] == 900 and params["timeout_min"] == 2880
    assert params["slurm_partition"] == "learn" and "slurm_account" not in params
    assert params["slurm_additional_parameters"] == {"requeue": True, "chdir": str(REPO_ROOT)}
    assert "export OMP_NUM_THREADS=1" in params["slurm_setup"]


def test_executor_parameters_cpu_only():
    params = executor_parameters(namespace(nodes=1, gpus_per_node=0, partition=None))
    assert params["tasks_per_node"] == 1 and "gpus_per_node" not in params and "slurm_partition" not in params
    assert executor_parameters(namespace(gpus_per_node=0, tasks_per_node=2))["tasks_per_node"] == 2


@pytest.mark.skipif(HAVE_SUBMITIT, reason="submitit is installed")
def test_missing_submitit_is_a_clear_user_error(capsys, tmp_path):
    with pytest.raises(DpcapError, match=r"pip install 'dpcap\[dist\]'"):
        import_submitit()
    with pytest.raises(DpcapError, match="submitit"):
        TrainJob(str(tmp_path)).checkpoint()
    assert main(["configs/demo-cpu.yaml", "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: launch/submit.py needs submitit")


def test_train_job_runs_and_refuses_past_the_budget(tiny_shards, tmp_path):
    """Outside submitit the job trains in-process; exit 3 raises (never requeued)."""
    run_dir = tmp_path / "run"
    args = [o for o in train_overrides(tiny_shards, run_dir, **{"train.steps": 1}) if not o.startswith("run_dir=")]
    assert TrainJob(str(run_dir), tuple(args))() == {"run_dir": str(run_dir), "step": 1, "steps": 1, "done": True}
    budget = epsilon(1.0, 16 / 48, 1, 1 / 48) * 1.05  # one step fits, the second does not
    over = tuple(args) + ("train.steps=3", f"privacy.epsilon={budget}")
    with pytest.raises(BudgetExceededError, match="not requeued"):
        TrainJob(str(tmp_path / "over"), over)()


def test_signal_handed_back_only_to_an_installed_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        _hand_signal_to_submitit()
        assert calls == [signal.SIGUSR1]
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        _hand_signal_to_submitit()  # the default action would kill this process: must not be raised
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1]
