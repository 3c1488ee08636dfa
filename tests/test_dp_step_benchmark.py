"""benchmarks/dp_step.py's logical step of K micro-batches (``--accumulation``): every DP method hands
AdamW the same averaged clipped gradient as at K = 1, the naive per-example loop being the oracle; the
non-private method hands it the summed gradient, K times the K = 1 one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _dp_step():
    spec = importlib.util.spec_from_file_location("dp_step_benchmark", REPO / "benchmarks" / "dp_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _update_gradients(bench, name: str, accumulation: int) -> list[torch.Tensor]:
    """The gradients one step of method ``name`` hands to AdamW (σ = 0, so no noise)."""
    args = bench.parse_args(
        ["--batch-size", "3", "--sigma", "0", "--max-grad-norm", "0.05", "--accumulation", str(accumulation),
         "--override", "image_size=16", "--override", "context_length=12"]
    )  # fmt: skip
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    tokenizer = bench.get_tokenizer(args.size, **args.overrides)
    images, tokens = bench.make_batch(bench.build_model(args, cpu), tokenizer, 3, 0, cpu)
    method = next(cls for cls in bench.method_classes(args) if cls.name == name)(args, images, tokens)
    seen = []
    method.optimizer.step = lambda: seen.append([p.grad.clone() for p in method.params])
    method.step()
    (grads,) = seen
    return grads


@pytest.mark.parametrize("name", ["nonprivate", "dpcap", "opacus_ghost", "naive"])
def test_accumulated_step_averages_its_micro_batches(name: str) -> None:
    bench = _dp_step()
    once, twice = (_update_gradients(bench, name, k) for k in (1, 2))
    scale = 2.0 if name == "nonprivate" else 1.0  # the sum for non-private, the average ÷ K·B for DP
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, scale * a, rtol=1e-5, atol=1e-7)


def test_accumulated_dp_steps_match_the_per_example_loop() -> None:
    bench = _dp_step()
    naive = _update_gradients(bench, "naive", 2)
    for name in ("dpcap", "opacus_ghost"):
        for a, c in zip(_update_gradients(bench, name, 2), naive, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    # The clip bound binds: B × the averaged clipped gradient is not the unclipped sum.
    plain = _update_gradients(bench, "nonprivate", 1)
    assert max((3 * c - p).abs().max().item() for c, p in zip(naive, plain)) > 1e-3


def test_accumulation_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        _dp_step().parse_args(["--accumulation", "0"])
    assert "--accumulation" in capsys.readouterr().err


def test_projected_branches_follow_the_cost_model() -> None:
    bench = _dp_step()
    from dpcap.privacy.layers.linear import branch_costs, choose_branch

    budget = 64 << 20
    costs = branch_costs(4, 224, 512, 512, 4)
    row = {"name": "blocks.0.attn.proj", "B": 4, "T": 224, "d": 512, "p": 512, "rows_kept": 4 * 224,
           "branch": choose_branch(costs, budget), "ghost_flops": costs["ghost"]["flops"],
           "instantiated_flops": costs["instantiated"]["flops"], "ghost_cost": costs["ghost"]["cost"],
           "instantiated_cost": costs["instantiated"]["cost"], "ghost_bytes": costs["ghost"]["bytes"],
           "instantiated_bytes": costs["instantiated"]["bytes"], "extra_bytes": 0,
           "memory_budget_bytes": budget}  # fmt: skip
    assert row["branch"] == "instantiated"  # the cheaper (multiply-adds + κ·scratch), and 4 MiB fits
    (same,) = bench.project_branches([row], 4)
    assert same["branch"] == "instantiated" and same["ghost_cost"] == row["ghost_cost"]
    (big,) = bench.project_branches([row], 128)
    # 128 per-sample 512 × 512 gradients (134 MB) exceed a 64 MiB budget; the Gram pairs (51 MB) do not.
    assert big["branch"] == "ghost" and big["projected_from_B"] == 4
    assert big["ghost_cost"] == 32 * row["ghost_cost"]
    assert big["instantiated_bytes"] == 128 * 512 * 512 * 4 > budget >= big["extra_bytes"] == big["ghost_bytes"]
    legacy = {k: v for k, v in row.items() if not k.endswith("_cost")}  # a table from before the cost key
    assert bench.project_branches([legacy], 4)[0]["ghost_cost"] == row["ghost_cost"]
    other = {"name": "patch_embed", "B": 4, "branch": "ghost"}
    assert bench.project_branches([other], 128) == [other]
