"""The one-backward clipped sum equals a naive per-example loop (and opacus) on every layer kind."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dpcap.errors import PrivacyError
from dpcap.privacy import Clipper

from .oracle import naive_clipped_sum

RTOL = 1e-5


def assert_matches_naive(model: nn.Module, loss_fn, inputs: list, max_grad_norm: float) -> torch.Tensor:
    expected, expected_norms = naive_clipped_sum(model, loss_fn, inputs, max_grad_norm)
    clipper = Clipper(model, max_grad_norm)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(loss_fn(*inputs))
    torch.testing.assert_close(norms.double(), expected_norms.double(), rtol=RTOL, atol=1e-9)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=RTOL, atol=1e-9, msg=name)
        else:
            assert param.grad is None, name
    clipper.remove()
    return norms


class TokenMLP(nn.Module):
    """Embedding → LayerNorm → Linear (3-D input) → Linear head, per-position loss summed per sample."""

    def __init__(self, vocab=11, width=6, hidden=5, bias=True, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.norm(self.embed(ids)))))


def token_loss(model):
    def loss(ids, targets):
        logits = model(ids)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    return loss


@pytest.fixture(autouse=True)
def _double():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_tokens(batch, length, vocab=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen), torch.randint(
        0, vocab, (batch, length), generator=gen
    )


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.5, 1e6])  # all clipped, mixed, none clipped
def test_token_model_matches_naive(max_grad_norm):
    torch.manual_seed(0)
    model = TokenMLP()
    assert_matches_naive(model, token_loss(model), list(make_tokens(5, 7)), max_grad_norm)


def test_repeated_tokens_embedding_ghost_norm():
    torch.manual_seed(1)
    model = TokenMLP(vocab=3)
    ids = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 2, 2], [0, 1, 2, 0, 1]])
    assert_matches_naive(model, token_loss(model), [ids, ids.flip(1)], 0.7)


def test_padding_idx_and_bias_free():
    torch.manual_seed(2)
    model = TokenMLP(bias=False, padding_idx=0)
    assert_matches_naive(model, token_loss(model), list(make_tokens(4, 6)), 0.3)


@pytest.mark.parametrize("positions,width", [(2, 16), (40, 3)])  # ghost (2T² ≤ pd) and instantiated branches
def test_linear_both_branches(positions, width):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(width, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(3, positions, width)

    def loss(x):
        return model(x).pow(2).mean(dim=(1, 2))

    assert_matches_naive(model, loss, [x], 0.05)


def test_linear_on_2d_input_and_called_twice():
    torch.manual_seed(4)
    layer = nn.Linear(5, 5)
    model = nn.Sequential(layer)

    def loss(x):
        return torch.sin(layer(torch.tanh(layer(x)))).sum(dim=1)

    assert_matches_naive(model, loss, [torch.randn(6, 5)], 0.2)


def test_conv2d_with_stride_and_padding():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 2, stride=2))

    def loss(x):
        return model(x).pow(2).sum(dim=(1, 2, 3))

    assert_matches_naive(model, loss, [torch.randn(3, 3, 8, 8)], 0.1)


def tiny_vit(**kwargs):
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=16,
        patch_size=8,
        embed_dim=12,
        depth=1,
        num_heads=2,
        **kwargs,
    )


def test_timm_vit_including_cls_and_pos_embed():
    torch.manual_seed(6)
    model = tiny_vit()
    labels = torch.tensor([0, 1, 2, 1])

    def loss(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    assert_matches_naive(model, loss, [torch.randn(4, 3, 16, 16), labels], 0.05)


def test_frozen_parameters_stay_out_of_the_norm():
    torch.manual_seed(7)
    model = TokenMLP()
    model.embed.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    assert_matches_naive(model, token_loss(model), list(make_tokens(4, 5)), 0.4)


def test_micro_batches_accumulate():
    torch.manual_seed(8)
    model = TokenMLP()
    ids, targets = make_tokens(6, 5)
    expected, _ = naive_clipped_sum(model, token_loss(model), [ids, targets], 0.3)
    clipper = Clipper(model, 0.3)
    for part in (slice(0, 2), slice(2, 2), slice(2, 6)):  # includes an empty micro-batch
        clipper.backward(token_loss(model)(ids[part], targets[part]))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=RTOL, atol=1e-9)


def test_empty_batch_gives_zero_grads_and_no_norms():
    model = TokenMLP()
    clipper = Clipper(model, 1.0)
    ids, targets = make_tokens(0, 4)
    norms = clipper.backward(token_loss(model)(ids, targets))
    assert norms.shape == (0,)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_clipped_norm_never_exceeds_bound():
    torch.manual_seed(9)
    model = TokenMLP()
    ids, targets = make_tokens(1, 6)
    Clipper(model, 1e-2).backward(token_loss(model)(ids, targets))
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert total <= 1e-2 * (1 + 1e-6)


def test_batchnorm_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(PrivacyError, match="mix samples"):
        Clipper(model, 1.0)


def test_uncovered_parameter_is_named():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(PrivacyError, match=r"scale"):
        Clipper(Scaled(), 1.0)


def test_tied_weights_are_refused():
    model = TokenMLP(hidden=6)
    model.head.weight = model.embed.weight
    with pytest.raises(PrivacyError, match="shared"):
        Clipper(model, 1.0)


def test_no_grad_forward_keeps_nothing():
    model = TokenMLP()
    clipper = Clipper(model, 1.0)
    with torch.no_grad():
        model(make_tokens(3, 4)[0])
    assert not clipper._captures


def test_matches_opacus_per_sample_gradients():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(10)
    model = TokenMLP()
    ids, targets = make_tokens(5, 6)
    reference = opacus.GradSampleModule(TokenMLP(), loss_reduction="sum")
    reference.load_state_dict({f"_module.{k}": v for k, v in model.state_dict().items()})
    token_loss(reference)(ids, targets).sum().backward()
    grad_samples = {n.removeprefix("_module."): p.grad_sample for n, p in reference.named_parameters()}
    norms = torch.sqrt(sum(g.reshape(5, -1).pow(2).sum(1) for g in grad_samples.values()))
    factors = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    clipper_norms = Clipper(model, 0.3).backward(token_loss(model)(ids, targets))
    torch.testing.assert_close(clipper_norms, norms, rtol=RTOL, atol=1e-9)
    for name, param in model.named_parameters():
        expected = torch.einsum("b,b...->...", factors, grad_samples[name])
        torch.testing.assert_close(param.grad, expected, rtol=RTOL, atol=1e-9)
