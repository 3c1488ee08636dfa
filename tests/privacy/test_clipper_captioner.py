"""Clipper on a whole captioner as the demo trains it, against the per-example loop oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper
from dpcap.privacy.clipper import _accumulate
from dpcap.privacy.layers.base import MatmulSum
from dpcap.privacy.layers.linear import GHOST, INSTANTIATED, LinearHandler
from tests.privacy.oracle import naive_clipped_sum

# A demo-like captioner small enough for the per-example loop: `unicode` vocabulary, one block each side.
TINY = dict(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2)
TINY |= dict(text_width=16, text_layers=1, text_heads=2, context_length=10, vocab="unicode")


def test_demo_captioner_with_compact_vocabulary_matches_naive():
    """The demo's configuration: a `unicode`-vocabulary captioner, every parameter trained (invariant 2).

    Kept apart from test_clipper.py, whose tests run in float64: the captioner's loss is float32.
    """

    model = create_captioner("nano", seed=0, **TINY)  # float32: the captioner's loss is computed in float32
    tokens = get_tokenizer("nano", **TINY)(["an emoji of a cat", "a dog", "flag: Afghanistan", "grinning face"])
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected, expected_norms = naive_clipped_sum(model, model.per_sample_loss, [images, tokens], 0.5)
    clipper = Clipper(model, 0.5)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(model.per_sample_loss(images, tokens))
    assert bool((expected_norms > 0.5).any())  # some samples are clipped
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    clipper.remove()


@pytest.mark.parametrize("branch", [None, GHOST, INSTANTIATED])
def test_micro_batches_accumulate_in_place_on_every_branch(branch, monkeypatch):
    """Gradient accumulation as `dpcap train` does it: the second micro-batch's clipped sums are added into
    the `.grad` the first left (in place, `LazySum.add_to`), equal to the per-example loop over both.

    Captions of different lengths give the ghost branch zero rows (its compacted sum); the patch
    embedding is a Conv2d, the norms LayerNorms, the token table an Embedding."""
    monkeypatch.setattr(LinearHandler, "force_branch", branch)
    model = create_captioner("nano", seed=0, **TINY)
    captions = ["an emoji of a cat", "a dog", "flag: Afghanistan", "grinning face", "a red heart on a white card"]
    tokens = get_tokenizer("nano", **TINY)(captions)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected, _ = naive_clipped_sum(model, model.per_sample_loss, [images, tokens], 0.5)
    clipper = Clipper(model, 0.5)
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 2), slice(2, 5)):
        clipper.backward(model.per_sample_loss(images[part], tokens[part]))
    if branch is not None:
        assert {row["branch"] for row in clipper.branch_table()} == {branch}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    clipper.remove()


@pytest.mark.parametrize("layout", ["transposed", "float64"])
def test_lazy_sum_falls_back_where_grad_cannot_take_it_in_place(layout):
    """A `.grad` that is not contiguous, or not of the sum's dtype, gets the formed sum added (same values)."""
    param = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64 if layout == "float64" else torch.float32))
    earlier = torch.randn(4, 3).T if layout == "transposed" else torch.randn(3, 4, dtype=torch.float64)
    param.grad = earlier.clone()
    left, right = torch.randn(3, 6), torch.randn(6, 4)
    _accumulate(param, MatmulSum(left, right))
    assert param.grad.is_contiguous() == (layout != "transposed")  # updated where it is, not replaced
    torch.testing.assert_close(param.grad, earlier + (left @ right).to(earlier.dtype), rtol=1e-6, atol=1e-6)
