"""nn.Linear's two exact branches (ghost norm, instantiated per-sample gradients), the cost-based choice
between them within a memory budget, and the Clipper's branch table, against the per-example loop oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpcap.errors import PrivacyError
from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper
from dpcap.privacy.layers import default_registry
from dpcap.privacy.layers.base import DEFAULT_MEMORY_BUDGET_BYTES as DEFAULT_BUDGET
from dpcap.privacy.layers.linear import (
    GHOST,
    INSTANTIATED,
    SCRATCH_ELEMENT_COST,
    MatrixLayer,
    branch_costs,
    choose_branch,
)
from tests.privacy.oracle import naive_clipped_sum

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


class Head(nn.Module):
    """Linear(s) on (B, T, d) or (B, d) inputs; a per-sample loss non-linear in the outputs."""

    def __init__(self, d, p, bias, dtype, hidden=None):
        super().__init__()
        widths = [d, p] if hidden is None else [d, hidden, p]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias, dtype=dtype) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.tanh(x))
        return x

    def loss(self, x, target):
        out = self(x)
        return (torch.sin(out) * target).reshape(out.shape[0], -1).sum(dim=1) + out.pow(2).reshape(
            out.shape[0], -1
        ).mean(dim=1)


def make_inputs(batch, positions, d, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, d) if positions is None else (batch, positions, d)
    out_shape = (batch, p) if positions is None else (batch, positions, p)
    # Samples of very different scales, so a mid-range bound clips some and leaves others.
    scale = torch.logspace(-2, 1, batch, dtype=dtype).reshape(batch, *[1] * (len(shape) - 1))
    return torch.randn(shape, generator=gen, dtype=dtype) * scale, torch.randn(out_shape, generator=gen, dtype=dtype)


def clip_and_compare(model, inputs, dtype, *, force=None, budget=None):
    """Clipper (branch forced or chosen) vs the naive loop at C = median norm; returns the branch table."""
    _, probe = naive_clipped_sum(model, model.loss, inputs, float("inf"))
    bound = float(probe.median())
    expected, expected_norms = naive_clipped_sum(model, model.loss, inputs, bound)
    assert bool((expected_norms > bound).any()) and bool((expected_norms < bound).any())  # clipped and not
    registry = default_registry()
    registry.lookup(model.layers[0]).force_branch = force
    kwargs = {} if budget is None else {"memory_budget_bytes": budget}
    clipper = Clipper(model, bound, registry=registry, **kwargs)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(model.loss(*inputs))
    tol = TOLERANCE[dtype]
    assert norms.dtype == dtype
    torch.testing.assert_close(norms, expected_norms.to(dtype), **tol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], **tol, msg=name)
    table = clipper.branch_table()
    clipper.remove()
    return table


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("branch", [GHOST, INSTANTIATED, None])  # None: the cost-based choice
@pytest.mark.parametrize("positions", [7, 1, None])  # odd T; T = 1; a 2-D (B, d) input
def test_linear_branch_matches_naive(positions, branch, bias, dtype):
    torch.manual_seed(0)
    d, p = 5, 3
    model = Head(d, p, bias, dtype)
    table = clip_and_compare(model, list(make_inputs(6, positions, d, p, dtype)), dtype, force=branch)
    (row,) = table
    assert (row["name"], row["B"], row["T"], row["d"], row["p"]) == ("layers.0", 6, positions or 1, d, p)
    if branch is not None:
        assert row["branch"] == branch
    else:  # ghost iff 2T²(d + p + κ) < p·d(κ + 2): never at T = 7 (98·392 > 15·386), always at T = 1 (784 < 5790)
        assert row["branch"] == (GHOST if (positions or 1) == 1 else INSTANTIATED)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_layers_on_different_branches_share_one_norm(dtype):
    """Both layers are cheaper instantiated (T = 32 is long for widths 8 → 384 → 2); a budget that holds the
    wide layer's Gram pairs but not its per-sample gradients puts it on ghost while the narrow one
    instantiates; the norms summed over both branches and the clipped sums still match the naive loop."""
    torch.manual_seed(1)
    batch, positions, d, hidden, p = 4, 32, 8, 384, 2
    size = torch.finfo(dtype).bits // 8
    wide, narrow, gram = batch * hidden * d * size, batch * p * hidden * size, 2 * batch * positions**2 * size
    for a, b in ((d, hidden), (hidden, p)):
        costs = branch_costs(batch, positions, a, b, size)
        assert choose_branch(costs, float("inf")) == INSTANTIATED
    assert narrow < gram < wide
    model = Head(d, p, True, dtype, hidden=hidden)
    inputs = list(make_inputs(batch, positions, d, p, dtype, seed=3))
    table = clip_and_compare(model, inputs, dtype, budget=(gram + wide) // 2)
    assert [(r["name"], r["branch"]) for r in table] == [("layers.0", GHOST), ("layers.1", INSTANTIATED)]
    assert table[0]["extra_bytes"] == gram
    assert table[1]["extra_bytes"] == narrow


def test_budget_zero_takes_the_smaller_memory_branch():
    torch.manual_seed(2)
    model = Head(5, 3, True, torch.float64)
    inputs = list(make_inputs(6, 7, 5, 3, torch.float64))
    (row,) = clip_and_compare(model, inputs, torch.float64, budget=0)
    # instantiated: 6·3·5 floats < ghost: 2·6·49 floats
    assert row["branch"] == INSTANTIATED and row["instantiated_bytes"] < row["ghost_bytes"]
    model = Head(40, 30, True, torch.float64)
    (row,) = clip_and_compare(model, list(make_inputs(6, 3, 40, 30, torch.float64)), torch.float64, budget=0)
    assert row["branch"] == GHOST and row["ghost_bytes"] < row["instantiated_bytes"]


def test_cost_model_formulas():
    costs = branch_costs(batch=3, positions=5, d=7, p=11, element_size=4)
    kappa = SCRATCH_ELEMENT_COST
    ghost_flops, inst_flops = 2 * 3 * 25 * 18 + 3 * 5 * 11 * 7, 3 * 5 * 11 * 7 + 2 * 3 * 11 * 7
    assert costs[GHOST] == {
        "flops": ghost_flops, "bytes": 2 * 3 * 25 * 4, "held": 0, "cost": ghost_flops + kappa * 2 * 3 * 25
    }  # fmt: skip
    # G (3·11·7 floats) holds less than the x and g it replaces (3·5·18): nothing held beyond them.
    assert costs[INSTANTIATED] == {
        "flops": inst_flops, "bytes": 3 * 11 * 7 * 4, "held": 0, "cost": inst_flops + kappa * 3 * 11 * 7
    }  # fmt: skip
    short = branch_costs(batch=3, positions=2, d=7, p=11, element_size=4)
    assert short[INSTANTIATED]["held"] == 3 * (11 * 7 - 2 * 18) * 4


@pytest.mark.parametrize(
    ("shape", "winner"),
    [
        # short sequence, wide layer: 2T²(d + p + κ) = 32·1920 ≪ p·d(κ + 2) = 2^19·386 → ghost
        ((32, 4, 512, 1024), GHOST),
        # long sequence, narrow layer: 2T²(d + p + κ) = 8192·512 ≫ p·d(κ + 2) = 4096·386 → instantiated
        ((32, 64, 64, 64), INSTANTIATED),
        ((32, 1, 8, 8), GHOST),  # T = 1: 2(d + p + κ) < p·d(κ + 2)
        # 512 wide at T = 224: instantiated in multiply-adds and in cost, its G written and read (κ) included
        ((32, 224, 512, 512), INSTANTIATED),
    ],
)
def test_automatic_choice_picks_the_clear_winner(shape, winner):
    batch, positions, d, p = shape
    costs = branch_costs(batch, positions, d, p, element_size=4)
    assert choose_branch(costs, memory_budget_bytes=float("inf")) == winner
    loser = INSTANTIATED if winner == GHOST else GHOST
    assert costs[winner]["cost"] < 0.9 * costs[loser]["cost"]
    # ... and agrees with the closed form: instantiated iff p·d(κ + 2) < 2T²(d + p + κ)
    kappa = SCRATCH_ELEMENT_COST
    assert (winner == INSTANTIATED) == (p * d * (kappa + 2) < 2 * positions**2 * (d + p + kappa))


@pytest.mark.parametrize(
    ("name", "positions", "width", "winner"),
    [
        ("small", 65, 384, GHOST),
        ("small", 197, 384, GHOST),
        ("base", 197, 768, GHOST),
        ("tiny", 197, 192, INSTANTIATED),
    ],
)
def test_cost_model_picks_the_measured_fastest_branch(name, positions, width, winner):
    """κ's calibration points (benchmarks/README.md, DP step ÷ non-private at B = 16 on CPU): the encoder
    qkv (d → 3d) and MLP (d → 4d, 4d → d) layers of `small` and `base` ran faster on ghost, tiny's on the
    instantiated branch, though multiply-adds alone pick instantiated for all of them."""
    for d, p in ((width, 3 * width), (width, 4 * width), (4 * width, width)):
        costs = branch_costs(16, positions, d, p, element_size=4)
        assert costs[INSTANTIATED]["flops"] < costs[GHOST]["flops"], (name, d, p)
        assert choose_branch(costs, memory_budget_bytes=float("inf")) == winner, (name, d, p)


def test_choice_respects_the_budget():
    # T = 224, d = p = 512: instantiated is the cheaper but needs 32 MiB against ghost's 12 MiB
    costs = branch_costs(32, 224, 512, 512, element_size=4)
    assert costs[INSTANTIATED]["cost"] < costs[GHOST]["cost"]
    assert costs[GHOST]["bytes"] < costs[INSTANTIATED]["bytes"]
    assert choose_branch(costs, costs[INSTANTIATED]["bytes"]) == INSTANTIATED
    assert choose_branch(costs, costs[INSTANTIATED]["bytes"] - 1) == GHOST  # only ghost fits
    assert choose_branch(costs, costs[GHOST]["bytes"] - 1) == GHOST  # nothing fits: the smaller
    small = branch_costs(32, 64, 64, 64, element_size=4)  # here instantiated is also the smaller
    assert choose_branch(small, 0) == INSTANTIATED
    with pytest.raises(ValueError, match="unknown branch"):
        choose_branch(costs, 0, force="naive")


def test_instantiated_branch_reuses_and_frees_per_sample_gradients():
    """x and g are dropped once G is formed; G is dropped once the clipped sum is; the sum is Σ c_i G_i."""
    layer = nn.Linear(5, 3, dtype=torch.float64)
    x, g = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64)
    clip = torch.rand(4, dtype=torch.float64)
    per_sample = torch.einsum("btp,btd->bpd", g, x)
    state = MatrixLayer.of(layer, x, g)
    assert state.plan(layer, 0, force=INSTANTIATED)["branch"] == INSTANTIATED
    norms = state.sq_norms(layer)
    assert state.x is None and state.g is None and state.weight_grads is not None
    expected_norms = per_sample.pow(2).sum(dim=(1, 2)) + g.sum(dim=1).pow(2).sum(dim=1)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-12, atol=0)
    sums = state.clipped_sums(layer, clip)
    assert state.weight_grads is None  # handed to the sum, which the Clipper drops once it is added
    expected = {"weight": torch.einsum("b,bpd->pd", clip, per_sample), "bias": clip @ g.sum(dim=1)}
    for name, value in sums.items():  # formed afresh (a first micro-batch) and added in place (the next ones)
        formed = value.materialize().reshape(expected[name].shape)
        torch.testing.assert_close(formed, expected[name], rtol=1e-12, atol=0)
        earlier = torch.randn_like(expected[name])
        accumulated = earlier.clone()
        value.add_to(accumulated)
        torch.testing.assert_close(accumulated, earlier + expected[name], rtol=1e-12, atol=1e-15)


def test_negative_budget_refused():
    with pytest.raises(PrivacyError, match="memory_budget_bytes"):
        Clipper(nn.Linear(2, 2), 1.0, memory_budget_bytes=-1)


def test_branch_table_lists_every_linear_of_the_nano_captioner():
    model = create_captioner("nano", seed=0)
    tokens = get_tokenizer("nano")(["a dog on a sofa", "two cats", "a red bicycle against a wall"])
    images = torch.rand(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clipper = Clipper(model, 1.0)
    clipper.backward(model.per_sample_loss(images, tokens))
    table = clipper.branch_table()
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert sorted(row["name"] for row in table) == sorted(linears)  # each Linear once, nothing else
    for row in table:
        assert row["B"] == 3 and row["branch"] in (GHOST, INSTANTIATED)
        assert row["extra_bytes"] == row[f"{row['branch']}_bytes"]
        module = model.get_submodule(row["name"])
        assert (row["d"], row["p"]) == (module.in_features, module.out_features)
    clipper.remove()


def test_step_budget_caps_what_instantiated_layers_hold_together():
    """Both layers would instantiate (cheaper, and within the per-layer budget), and both hold more than the
    x and g they drop (p·d > T·(d + p)): both hold only for wide layers at long sequences, here 512 wide at
    T = 224. A micro-batch budget for one of them goes to the layer whose gradient arrives first in the
    backward (the last layer), the other takes the ghost branch, and the norms and clipped sums still
    match the naive loop."""
    torch.manual_seed(2)
    dtype, batch, positions, d, hidden, p = torch.float64, 4, 224, 512, 512, 512
    size = 8
    held = [
        batch * (hidden * d - positions * (d + hidden)) * size,
        batch * (p * hidden - positions * (hidden + p)) * size,
    ]
    model = Head(d, p, True, dtype, hidden=hidden)
    inputs = list(make_inputs(batch, positions, d, p, dtype, seed=4))

    def table_with(step_budget):
        _, probe = naive_clipped_sum(model, model.loss, inputs, float("inf"))
        bound = float(probe.median())
        expected, expected_norms = naive_clipped_sum(model, model.loss, inputs, bound)
        clipper = Clipper(model, bound, step_memory_budget_bytes=step_budget)
        model.zero_grad(set_to_none=True)
        norms = clipper.backward(model.loss(*inputs))
        torch.testing.assert_close(norms, expected_norms, **TOLERANCE[dtype])
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], **TOLERANCE[dtype], msg=name)
        table = {r["name"]: r for r in clipper.branch_table()}
        clipper.remove()
        return table

    free = table_with(float("inf"))
    assert [free[n]["branch"] for n in ("layers.0", "layers.1")] == [INSTANTIATED, INSTANTIATED]
    assert [free[n]["held_bytes"] for n in ("layers.0", "layers.1")] == held and min(held) > 0
    capped = table_with(held[1] + held[0] // 2)
    assert (capped["layers.1"]["branch"], capped["layers.0"]["branch"]) == (INSTANTIATED, GHOST)
    assert capped["layers.1"]["held_budget_bytes"] == held[1] + held[0] // 2
    assert capped["layers.0"]["held_budget_bytes"] == held[0] // 2 and capped["layers.0"]["held_bytes"] == 0
    none = table_with(0)
    assert [none[n]["branch"] for n in ("layers.0", "layers.1")] == [GHOST, GHOST]


def test_instantiated_layers_that_hold_less_than_x_and_g_take_no_step_budget():
    """At T = 197 a 192 × 192 layer's G (B·p·d) is smaller than the x and g it replaces: held 0, so even a
    zero micro-batch budget leaves it the cheaper instantiated branch; a 512 × 512 layer at T = 224 holds
    more than its x and g, and instantiates only where what is left of the budget covers that."""
    costs = branch_costs(16, 197, 192, 192, 4)
    assert costs[INSTANTIATED]["held"] == 0 and costs[GHOST]["held"] == 0
    assert choose_branch(costs, DEFAULT_BUDGET, held_budget_bytes=0) == INSTANTIATED
    wide = branch_costs(16, 224, 512, 512, 4)  # G holds 16·(512·512 − 224·1024) floats more than x and g
    assert wide[INSTANTIATED]["held"] == 16 * (512 * 512 - 224 * 1024) * 4
    assert choose_branch(wide, DEFAULT_BUDGET, held_budget_bytes=wide[INSTANTIATED]["held"]) == INSTANTIATED
    assert choose_branch(wide, DEFAULT_BUDGET, held_budget_bytes=wide[INSTANTIATED]["held"] - 1) == GHOST


def test_negative_step_budget_refused():
    with pytest.raises(PrivacyError, match="step_memory_budget_bytes"):
        Clipper(nn.Linear(2, 2), 1.0, step_memory_budget_bytes=-1)
