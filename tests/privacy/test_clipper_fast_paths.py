"""The clipper's fast paths against the per-example loop oracle: a ghost Linear that drops its exactly-zero
output-gradient rows (both ways of finding them, the three ways to its Gram matrices), the
choice of the ghost branch where that makes it cheaper, and the norms formed in hooks during the backward
(with the fallback for a leaf tensor as a captured output, and hooks that stay out of other backwards)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpcap.privacy import Clipper
from dpcap.privacy.layers import LayerHandler, default_registry
from dpcap.privacy.layers import linear as linear_layers
from dpcap.privacy.layers.linear import DENSE, GHOST, INSTANTIATED, ONE_PAIR, PER_SAMPLE, nonzero_rows
from tests.privacy.oracle import naive_clipped_sum

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


class MaskedHead(nn.Module):
    """Linear → tanh → Linear on (B, T, d); sample i's loss reads only the positions where mask[i] is set,
    and only the output columns where `columns` is nonzero, so the other rows of the output gradient are
    exactly zero (and, with zero first/last columns, the cheap probe sees no row as nonzero)."""

    def __init__(self, d, hidden, p, dtype, columns=None):
        super().__init__()
        self.fc = nn.Linear(d, hidden, dtype=dtype)
        self.head = nn.Linear(hidden, p, dtype=dtype)
        self.register_buffer("columns", torch.ones(p, dtype=dtype) if columns is None else columns.to(dtype))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))

    def loss(self, x, mask):
        out = self(x)
        per_position = (torch.sin(out) * self.columns).sum(dim=-1) + (out * self.columns).pow(2).mean(dim=-1)
        return (per_position * mask).sum(dim=1)


def masks(batch, positions, kind, seed=0):
    """(B, T) float masks of the loss positions: prefixes (a causal decoder), suffixes, scattered, none."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(positions)
    lengths = torch.randint(1, positions, (batch,), generator=gen)
    if kind == "prefix":
        mask = order < lengths[:, None]
    elif kind == "suffix":
        mask = order >= positions - lengths[:, None]
    else:  # scattered: zero rows inside the span too
        mask = torch.rand(batch, positions, generator=gen) < 0.3
    mask[0] = False  # one sample with no loss position at all (gradient exactly zero)
    mask[1] = True  # and one with every position
    return mask


def run_and_compare(model, inputs, dtype, force=None):
    """Clipper vs the naive loop at C = median norm; returns the clipper's branch table."""
    _, probe = naive_clipped_sum(model, model.loss, inputs, float("inf"))
    bound = float(probe[probe > 0].median())
    expected, expected_norms = naive_clipped_sum(model, model.loss, inputs, bound)
    registry = default_registry()
    registry.lookup(model.head).force_branch = force
    clipper = Clipper(model, bound, registry=registry)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(model.loss(*inputs))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(norms, expected_norms.to(dtype), **tol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], **tol, msg=name)
    table = {row["name"]: row for row in clipper.branch_table()}
    clipper.remove()
    return table


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["prefix", "suffix", "scattered"])
@pytest.mark.parametrize("check", ["full", "spans"])  # every row's min/max, or only the rows outside spans
@pytest.mark.parametrize("gram", [DENSE, ONE_PAIR, PER_SAMPLE])
def test_ghost_branch_without_zero_rows_matches_naive(dtype, kind, check, gram, monkeypatch):
    if check == "spans":
        monkeypatch.setattr(linear_layers, "_FULL_CHECK_ELEMENTS", 0)
    monkeypatch.setattr(linear_layers, "_FORCE_GRAM", gram)
    torch.manual_seed(0)
    batch, positions, d, hidden, p = 6, 9, 5, 7, 4
    model = MaskedHead(d, hidden, p, dtype)
    x = torch.randn(batch, positions, d, dtype=dtype) * torch.logspace(-1, 1, batch, dtype=dtype)[:, None, None]
    mask = masks(batch, positions, kind).to(dtype)
    table = run_and_compare(model, [x, mask], dtype, force=GHOST)
    if kind != "scattered" or check == "full":  # spans keep the zero rows inside each, here most rows
        assert table["head"]["rows_kept"] == int((mask != 0).sum())
    # The hidden layer's output gradient is zero where the loss reads nothing too (positions do not mix).
    assert table["fc"]["rows_kept"] == table["head"]["rows_kept"]


@pytest.mark.parametrize("check", ["full", "spans"])
def test_rows_the_probe_misses_are_still_kept(check, monkeypatch):
    """Output columns 0 and p-1 never reach the loss, so every row's first and last gradient entries are 0:
    the probe sees no nonzero row and each row must be read in full before it is dropped."""
    if check == "spans":
        monkeypatch.setattr(linear_layers, "_FULL_CHECK_ELEMENTS", 0)
    torch.manual_seed(1)
    batch, positions, d, hidden, p = 5, 8, 4, 6, 5
    columns = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    model = MaskedHead(d, hidden, p, torch.float64, columns=columns)
    x = torch.randn(batch, positions, d, dtype=torch.float64)
    mask = masks(batch, positions, "prefix", seed=2).double()
    table = run_and_compare(model, [x, mask], torch.float64, force=GHOST)
    assert table["head"]["rows_kept"] == int(mask.sum())


def test_nonzero_rows_finds_exactly_the_zero_rows():
    g = torch.randn(3, 8, 6)
    g[0, 5:] = 0  # a zero tail
    g[1, :2] = 0  # zero head rows
    g[1, 4] = 0  # a zero row in the middle
    g[2] = 0
    g[2, 3, 2] = float("nan")  # NaN only in the middle of a row: kept
    g[2, 6, 1] = 1e-40  # a denormal: nonzero, kept
    g[0, 6] = -0.0  # negative zeros: a zero row, dropped
    rows = nonzero_rows(g)
    assert rows is not None
    expected = g.ne(0).any(dim=-1) | g.isnan().any(dim=-1)
    torch.testing.assert_close(rows.index, expected.reshape(-1).nonzero().squeeze(1))
    assert rows.counts == expected.sum(dim=1).tolist()
    torch.testing.assert_close(rows.sample, rows.index // 8)


def test_nonzero_rows_needs_enough_zero_rows():
    g = torch.randn(4, 10, 3)
    assert nonzero_rows(g) is None  # no zero row: the probe alone decides
    g[:, 8:] = 0  # 20% zero rows, under the threshold
    assert nonzero_rows(g) is None
    g[:, 6:] = 0  # 40%
    assert nonzero_rows(g).counts == [6, 6, 6, 6]
    assert nonzero_rows(torch.zeros(4, 10, 3, device="meta")) is None  # only on the CPU


def test_ghost_branch_chosen_where_zero_rows_make_it_cheaper():
    """Dense, T²(d+p) > p·d picks instantiated; with 2 of 32 rows per sample left, ghost on the kept rows."""
    torch.manual_seed(3)
    batch, positions, d, hidden, p = 4, 32, 16, 16, 16
    model = MaskedHead(d, hidden, p, torch.float64)
    x = torch.randn(batch, positions, d, dtype=torch.float64)
    dense = torch.ones(batch, positions, dtype=torch.float64)
    assert run_and_compare(model, [x, dense], torch.float64)["head"]["branch"] == INSTANTIATED
    sparse = torch.zeros(batch, positions, dtype=torch.float64)
    sparse[:, :2] = 1
    row = run_and_compare(model, [x, sparse], torch.float64)["head"]
    assert (row["branch"], row["rows_kept"], row["T"]) == (GHOST, 2 * batch, positions)


def test_plain_backward_after_a_recorded_forward_is_untouched():
    """The output hooks do nothing outside the clipper's own backward, and nothing after `clear`."""
    torch.manual_seed(4)
    model = MaskedHead(4, 6, 5, torch.float64)
    reference = MaskedHead(4, 6, 5, torch.float64)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    mask = masks(3, 7, "prefix").double()
    expected, expected_norms = naive_clipped_sum(model, model.loss, [x, mask], 0.5)
    clipper = Clipper(model, 0.5)
    model.loss(x, mask).sum().backward()  # recorded by the clipper, back-propagated by someone else
    reference.loss(x, mask).sum().backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=0, msg=name)
    stale = model.loss(x, mask)  # recorded, then dropped
    clipper.clear()
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(model.loss(x, mask))
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    clipped = [param.grad.clone() for param in model.parameters()]
    stale.sum().backward()  # the stale graph's hooks stay silent: plain accumulation only
    reference.zero_grad(set_to_none=True)
    reference.loss(x, mask).sum().backward()
    for (name, param), before, ref in zip(model.named_parameters(), clipped, reference.parameters()):
        torch.testing.assert_close(param.grad, before + ref.grad, rtol=1e-12, atol=1e-14, msg=name)
    clipper.remove()


class Gate(nn.Module):
    """y = inner(x) ⊙ s with `inner` an identity: tapped at `inner`, whose output is the input itself."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Identity()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x):
        return self.inner(x) * self.s


class GateHandler(LayerHandler):
    """∇_s ℓ_i = Σ_t (∂ℓ/∂y_t) ⊙ x_t = Σ_t (∂ℓ/∂x_t) ⊙ x_t / s, from the gradient at the identity's output x."""

    module_types = (Gate,)

    def covers(self, module):
        return {"s"}

    def tap(self, module):
        return module.inner

    def prepare(self, module, captures, grads):
        x, g = captures[0].inputs[0], grads[0]
        return (g * x / module.s).sum(dim=1)

    def sq_norms(self, module, prepared):
        return prepared.pow(2).sum(dim=1)

    def clipped_sums(self, module, prepared, clip):
        return {"s": clip @ prepared}


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate(4)
        self.fc = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        return self.fc(torch.tanh(self.gate(x)))

    def loss(self, x):
        return torch.sin(self(x)).sum(dim=(1, 2))


def test_leaf_tensor_as_captured_output_falls_back_and_keeps_its_grad_clean():
    """A captured output that is a leaf would get a `.grad` from a backward to it; the clipper then takes
    the gradients from `torch.autograd.grad` instead, with the same result and the leaf left untouched."""
    torch.manual_seed(5)
    model = GatedMLP()
    x = torch.randn(5, 6, 4, dtype=torch.float64, requires_grad=True)
    expected, expected_norms = naive_clipped_sum(model, model.loss, [x], 0.4)
    x.grad = None
    registry = default_registry()
    registry.register(GateHandler())
    clipper = Clipper(model, 0.4, registry=registry)
    norms = clipper.backward(model.loss(x))
    assert x.grad is None
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    clipper.remove()


def test_gradients_handed_over_after_the_backward_give_the_same_result():
    """The fallback path (`torch.autograd.grad`, then every layer prepared) equals the hooks path."""
    torch.manual_seed(6)
    model = MaskedHead(4, 6, 5, torch.float64)
    x = torch.randn(4, 7, 4, dtype=torch.float64)
    mask = masks(4, 7, "prefix").double()
    results = []
    for fallback in (False, True):
        clipper = Clipper(model, 0.5)
        model.zero_grad(set_to_none=True)
        losses = model.loss(x, mask)
        clipper._leaf_output = fallback
        norms = clipper.backward(losses)
        results.append((norms, [param.grad.clone() for param in model.parameters()]))
        clipper.remove()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    for hooked, handed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(hooked, handed, rtol=1e-12, atol=0)
