"""Clipper on a whole captioner as the demo trains it, against the per-example loop oracle."""

from __future__ import annotations

import torch

from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper
from tests.privacy.oracle import naive_clipped_sum


def test_demo_captioner_with_compact_vocabulary_matches_naive():
    """The demo's configuration: a `unicode`-vocabulary captioner, every parameter trained (invariant 2).

    Kept apart from test_clipper.py, whose tests run in float64: the captioner's loss is float32.
    """

    tiny = dict(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2)
    tiny |= dict(text_width=16, text_layers=1, text_heads=2, context_length=10, vocab="unicode")
    model = create_captioner("nano", seed=0, **tiny)  # float32: the captioner's loss is computed in float32
    tokens = get_tokenizer("nano", **tiny)(["an emoji of a cat", "a dog", "flag: Afghanistan", "grinning face"])
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
