"""Activation checkpointing (train.grad_checkpointing) with the clipper: the same clipped sums, or a refusal.

Non-reentrant checkpointing re-runs each block's forward inside the backward; the clipper must ignore
those hook calls. Reentrant checkpointing hides the blocks' layers from the hooks and must be refused.
Float32 like test_clipper_captioner.py: the captioner's loss is computed in float32.
"""

from __future__ import annotations

import pytest
import timm.layers
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpcap.config import load_config
from dpcap.errors import ConfigError, PrivacyError
from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper
from dpcap.train.loop import train
from tests.conftest import train_overrides
from tests.privacy.oracle import naive_clipped_sum

SIZE = dict(image_size=16, patch_size=8, vision_width=16, vision_layers=2, vision_heads=2)
SIZE |= dict(text_width=16, text_layers=2, text_heads=2, context_length=10, vocab="unicode")
CAPTIONS = ["an emoji of a cat", "a dog", "flag: Afghanistan", "grinning face"]
C = 5.0  # the batch's norms are 4.4 to 5.9: some rows clipped, some not


def captioner(grad_checkpointing: bool):
    model = create_captioner("nano", seed=0, **SIZE)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def batch():
    images = torch.randn(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return images, get_tokenizer("nano", **SIZE)(CAPTIONS)


def clipped(model, precision: str = "fp32"):
    """(norms, {name: grad}) of one Clipper.backward on `batch()`."""
    images, tokens = batch()
    clipper = Clipper(model, C)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        losses = model.per_sample_loss(images, tokens)
    norms = clipper.backward(losses)
    clipper.remove()
    return norms, {name: p.grad.clone() for name, p in model.named_parameters()}


def count_calls(modules) -> list[int]:
    calls = [0]
    for module in modules:
        # A pre-hook: the recomputation stops early, once the last tensor saved for backward is back.
        module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_checkpointed_captioner_matches_naive_and_unchecked():
    model = captioner(True)
    calls = count_calls([model.encoder.blocks[0], model.decoder.blocks[0]])
    norms, grads = clipped(model)
    assert calls[0] == 4  # each block ran twice (forward, recomputation): checkpointing really was on
    reference = captioner(False)
    expected, expected_norms = naive_clipped_sum(reference, reference.per_sample_loss, list(batch()), C)
    assert bool((expected_norms > C).any()) and bool((expected_norms < C).any())  # clipped and unclipped rows
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-6)
    unchecked_norms, unchecked = clipped(reference)
    torch.testing.assert_close(norms, unchecked_norms, rtol=1e-6, atol=1e-8)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(grad, unchecked[name], rtol=1e-6, atol=1e-8, msg=name)


def test_bf16_recomputation_matches_unchecked():
    """The clipper's backward runs with autocast off; the recomputation restores the forward's bf16."""
    norms, grads = clipped(captioner(True), "bf16")
    unchecked_norms, unchecked = clipped(captioner(False), "bf16")
    torch.testing.assert_close(norms, unchecked_norms, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, unchecked[name], rtol=1e-5, atol=1e-7, msg=name)


def test_plain_backward_with_checkpointing_and_attached_clipper():
    """The non-private and public-batch paths: a plain autograd.grad, whose recomputation is not recorded."""
    images, tokens = batch()
    model, reference = captioner(True), captioner(False)
    clipper = Clipper(model, C)
    losses = model.per_sample_loss(images, tokens)
    recorded = {i: len(c) for i, c in clipper._captures.items()}
    grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
    assert {i: len(c) for i, c in clipper._captures.items()} == recorded
    clipper.remove()
    expected = torch.autograd.grad(reference.per_sample_loss(images, tokens).sum(), list(reference.parameters()))
    for (name, _), grad, want in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8, msg=name)


def test_timm_reentrant_checkpointing_is_refused():
    model = captioner(True)
    clipper = Clipper(model, C)
    images, tokens = batch()
    timm.layers.set_reentrant_ckpt(True)
    try:
        losses = model.per_sample_loss(images, tokens)
        with pytest.raises(PrivacyError, match="reentrant"):
            clipper.backward(losses)
    finally:
        timm.layers.set_reentrant_ckpt(False)
    assert all(p.grad is None for p in model.parameters())  # refused before anything reached .grad


class ReentrantBlock(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.stem, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))

    def forward(self, x):
        return self.head(checkpoint(self.block, self.stem(x), use_reentrant=self.use_reentrant)).squeeze(-1)


def test_reentrant_torch_checkpoint_is_refused_and_non_reentrant_matches_naive():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    model = ReentrantBlock(use_reentrant=True)
    with pytest.raises(PrivacyError, match=r"use_reentrant=True.*block\.0 \(Linear\)"):
        Clipper(model, 0.1).backward(model(x))
    assert all(p.grad is None for p in model.parameters())
    model.use_reentrant = False
    expected, expected_norms = naive_clipped_sum(model, model, [x], 0.1)
    norms = Clipper(model, 0.1).backward(model(x))
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_with_grad_checkpointing_equals_without(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        load_config(None, train_overrides(tiny_shards, tmp_path / "x", **{"train.grad_checkpointing": 1}))
    runs = {}
    for sigma in (1.0, 0.0):  # private (the clipper) and non-private (plain backward)
        for on in (True, False):
            run = tmp_path / f"sigma{sigma}-{on}"
            settings = {"train.steps": 2, "train.grad_checkpointing": on, "privacy.sigma": sigma}
            result = train(load_config(None, train_overrides(tiny_shards, run, **settings)))
            assert result["done"] and result["step"] == 2
            runs[on] = load_file(run / "checkpoints" / (run / "LAST").read_text().strip() / "model.safetensors")
        for name, weight in runs[True].items():
            torch.testing.assert_close(weight, runs[False][name], rtol=1e-5, atol=1e-6, msg=f"σ={sigma} {name}")
