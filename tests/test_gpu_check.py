"""benchmarks/gpu_check.sh in its CPU mode (small shapes, the Triton interpreter, 2 gloo ranks), as CI
runs it, so that the prepared GPU check keeps working between the occasions a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "small"
    stages = {s["stage"]: s["rc"] for s in summary["stages"]}
    assert set(stages) == {
        "cuda_tests", "dp_step_base", "dp_step_scaling", "ghost_kernel", "grad_checkpointing", "probe_imagenet",
        "synthetic_shards", "synthetic_index", "train_torchrun",
    }  # fmt: skip
    assert all(rc == 0 for rc in stages.values()), stages
    assert summary["cuda_tests"]["tests"] >= 2  # the marker selects the CUDA tests (skipped here)
    assert summary["dp_step_base"]["time_ratio_vs_nonprivate"] > 0
    check = summary["dp_step_base"]["gradient_check"]
    assert check["passed"] and check["grad_rel_err_vs_naive"] < 1e-4
    (row,) = summary["dp_step_scaling"]["scaling"]
    assert row["size"] == "nano" and row["T"] == 65 and row["image_size"] == 32 and row["time_ratio"] > 0
    assert all(r["kernel_max_rel_error"] < (2e-2 if r["dtype"] == "bfloat16" else 1e-4)
               for r in summary["ghost_kernel"]["rows"])  # fmt: skip
    memory = summary["grad_checkpointing"]
    assert memory["dp"]["max_abs_grad_diff"] < 1e-5 and memory["nonprivate"]["saving"] > 0
    train = summary["train"]
    assert train["ranks"] == 2 and train["backend"] == "gloo"
    assert len(train["summaries"]) == 2 and all(s["done"] and s["step"] == 3 for s in train["summaries"])
