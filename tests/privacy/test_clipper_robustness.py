"""The clipper holds C whatever the caller does (issue 11, cases 5 and 6).

* inside an enclosing bf16 autocast its own maths stays in float32, so no example's clipped
  contribution exceeds C;
* a float64 model whose loss is float32 is clipped in float64 (no dtype clash, no float32 norms);
* LayerNorm on a (B, D) input (timm's `fc_norm` after average pooling) matches the per-example loop;
* a layer it cannot handle is refused with an error naming the module — at construction where the
  module alone says so, else at the first forward (input ranks) or before anything reaches `.grad`
  (a batch that is not the first dimension) — never an IndexError mid-step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers.norm import LayerNorm2d
from torch import nn

from dpcap.errors import PrivacyError
from dpcap.privacy import Clipper

from .oracle import naive_clipped_sum
from .test_clipper import tiny_vit


class TokenMLP(nn.Module):
    """Embedding → LayerNorm → Linear → Linear head, wide enough for bf16 rounding to matter."""

    def __init__(self, vocab=50, width=96, hidden=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.norm(self.embed(ids)))))


def token_loss(model):
    def loss(ids, targets):
        logits = model(ids)
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(dim=1)

    return loss


def assert_matches_naive(model, loss_fn, inputs, max_grad_norm, rtol, atol):
    expected, expected_norms = naive_clipped_sum(model, loss_fn, inputs, max_grad_norm)
    clipper = Clipper(model, max_grad_norm)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(loss_fn(*inputs))
    torch.testing.assert_close(norms.double(), expected_norms.double(), rtol=rtol, atol=atol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=rtol, atol=atol, msg=name)
    clipper.remove()
    return norms, expected_norms


def max_clipped_contribution_ratio(seeds, max_grad_norm, batch=8, length=12, vocab=50):
    """max_i ‖what example i adds to `.grad`‖ / C, the batch forward and clipper under bf16 autocast.

    Example i's contribution is isolated by giving every other example zero loss weight: their output
    gradients are exactly zero, while example i's norm and clip factor are those of the full batch.
    """
    worst = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        model = TokenMLP(vocab=vocab)
        ids = torch.randint(0, vocab, (batch, length))
        targets = torch.randint(0, vocab, (batch, length))
        clipper = Clipper(model, max_grad_norm)
        for i in range(batch):
            model.zero_grad(set_to_none=True)
            weight = torch.zeros(batch)
            weight[i] = 1.0
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                assert model(ids[:1]).dtype == torch.bfloat16  # the forward really runs in bf16
                clipper.clear()
                norms = clipper.backward(token_loss(model)(ids, targets) * weight)
                assert torch.is_autocast_enabled("cpu")  # the caller's autocast is left as it was
            assert norms[i] > max_grad_norm  # clipped
            contribution = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
            worst = max(worst, float(contribution) / max_grad_norm)
        clipper.remove()
    return worst


def test_clipped_contribution_within_bound_under_bf16_autocast():
    ratio = max_clipped_contribution_ratio(seeds=range(3), max_grad_norm=1e-3)
    assert ratio <= 1 + 1e-5, f"an example's clipped contribution reached {ratio:.7f}·C"


def test_clipped_sum_under_bf16_autocast_matches_its_own_norms():
    """Unclipped (C huge): the clipper's norms are those of the sums it adds, to float32 precision."""
    torch.manual_seed(3)
    model = TokenMLP()
    ids, targets = torch.randint(0, 50, (1, 12)), torch.randint(0, 50, (1, 12))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        norms = Clipper(model, 1e6).backward(token_loss(model)(ids, targets))
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert norms.dtype == torch.float32
    torch.testing.assert_close(total, norms[0].double(), rtol=1e-5, atol=0)


def test_float64_model_with_float32_loss_matches_float64_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)

    def loss(x):  # a float32 loss, as the captioner computes it
        return model(x).float().pow(2).mean(dim=(1, 2))

    norms, expected = assert_matches_naive(model, loss, [x], 0.75, rtol=1e-10, atol=1e-13)
    assert norms.dtype == torch.float64
    assert bool((expected > 0.75).any()) and bool((expected < 0.75).any())  # clipped and unclipped


class PooledHead(nn.Module):
    """Linear over tokens, mean-pool, LayerNorm on the (B, D) pooled vector, Linear head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.fc_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.fc_norm(torch.tanh(self.fc(x)).mean(dim=1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layernorm_on_pooled_2d_input_matches_naive(dtype):
    torch.manual_seed(1)
    model = PooledHead().to(dtype)
    x = torch.randn(5, 4, 6, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 1, 0])

    def loss(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    _, expected = assert_matches_naive(model, loss, [x, labels], 0.3, **tol)
    assert bool((expected > 0.3).any())


def test_timm_vit_with_average_pool_and_fc_norm_matches_naive():
    """timm's default with global_pool='avg': `fc_norm` is a LayerNorm applied to (B, D)."""
    torch.manual_seed(2)
    model = tiny_vit(global_pool="avg").double()
    assert isinstance(model.fc_norm, nn.LayerNorm)
    labels = torch.tensor([0, 1, 2, 1])

    def loss(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    assert_matches_naive(model, loss, [torch.randn(4, 3, 16, 16, dtype=torch.float64), labels], 0.05, 1e-8, 1e-11)


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize(
    "layer,match",
    [
        (LayerNorm2d(4), r"layer \(LayerNorm2d\).*overrides forward"),  # channels-first: other maths
        (nn.Embedding(5, 3, scale_grad_by_freq=True), r"layer \(Embedding\).*scale_grad_by_freq"),
    ],
)
def test_unsupported_module_is_refused_at_construction(layer, match):
    with pytest.raises(PrivacyError, match=match):
        Clipper(Wrap(layer), 1.0)


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Conv2d(3, 2, 2), torch.randn(3, 4, 4)),  # unbatched (C, H, W)
        (nn.Linear(4, 2), torch.randn(4)),  # unbatched vector
        (nn.LayerNorm(4), torch.randn(4)),
        (nn.Embedding(5, 3), torch.tensor(2)),  # a single 0-d token id
    ],
)
def test_unbatched_input_is_refused_at_first_forward(layer, x):
    model = Wrap(layer)
    clipper = Clipper(model, 1.0)
    with pytest.raises(PrivacyError, match=rf"layer \({type(layer).__name__}\).*no batch dimension"):
        model(x)
    clipper.remove()


def test_batch_not_first_is_refused_before_any_gradient():
    """A sequence-first (T, B, D) layout: dim 0 is not the batch, so per-sample norms would be wrong."""
    model = Wrap(nn.Linear(4, 2))
    clipper = Clipper(model, 1.0)
    x = torch.randn(7, 3, 4)  # (T, B, D)
    losses = model(x).pow(2).sum(dim=(0, 2))  # (B,)
    with pytest.raises(PrivacyError, match=r"layer \(Linear\).*\(7, 3, 2\).*batch \(3 samples\)"):
        clipper.backward(losses)
    assert all(p.grad is None for p in model.parameters())
