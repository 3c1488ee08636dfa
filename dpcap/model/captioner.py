"""Captioner: ViT encoder + causal text decoder, trained by next-token prediction (DP-Cap).

The per-sample loss is the mean cross-entropy over that sample's own target tokens (up to and
including its first EOT), computed independently for each sample: nothing mixes samples, which
per-sample clipping requires. `encode_image` is the representation evaluated downstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dpcap.data.tokenizer import target_mask
from dpcap.data.vocab import get_vocabulary
from dpcap.errors import ConfigError, DataError
from dpcap.model.decoder import TextDecoder
from dpcap.model.encoder import create_encoder

if TYPE_CHECKING:
    from dpcap.model.configs import CaptionerConfig

POOLS = ("mean", "cls", "mean_all")
"""`encode_image` pools: the patch tokens' mean (CLS excluded), the CLS token, the mean of all tokens."""


class Captioner(nn.Module):
    """Image captioner built from a `CaptionerConfig` (use ``dpcap.model.create_captioner``)."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.vision.image_size
        self.context_length = config.text.context_length
        self.vocabulary = get_vocabulary(config.text.vocab)  # its special ids frame every caption
        self.encoder = create_encoder(config)
        self.decoder = TextDecoder(config.text, image_width=config.vision.width, bias=config.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every encoder and decoder block (non-reentrant ``torch.utils.checkpoint``):
        less activation memory for one more forward through the blocks in the backward. Same gradients,
        with the clipper as with a plain backward."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"images must have shape (B, {', '.join(map(str, expected))}), got {shape}")
        if not images.is_floating_point():
            raise DataError(f"images must be a float tensor, got {images.dtype}")

    def _check_tokens(self, tokens: torch.Tensor, batch: int) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            desc = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise DataError(f"tokens must be an int64 tensor of shape (B, L), got {desc}")
        if tokens.shape[0] != batch:
            raise DataError(f"{tokens.shape[0]} token rows for {batch} images")
        if not 2 <= tokens.shape[1] <= self.context_length + 1:
            raise DataError(f"token length {tokens.shape[1]} outside [2, {self.context_length + 1}]")
        vocab = self.config.text.vocab_size
        if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= vocab)):
            raise DataError(f"token ids must lie in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed encoder tokens ``(B, 1 + patches, Dv)`` (CLS first): timm's ``forward_features``."""
        self._check_images(images)
        return self.encoder.forward_features(images)

    def _token_nll(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position negative log-likelihood ``(B, L-1)`` in float32 and its target mask."""
        self._check_images(images)
        self._check_tokens(tokens, images.shape[0])
        mask = target_mask(tokens, eot_id=self.vocabulary.eot_id)
        # Positions after every row's EOT cannot change earlier logits (causal decoder) and carry no
        # loss, so they are cut: the result is identical and short captions cost less.
        used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        tokens, mask = tokens[:, : used + 1], mask[:, :used]
        logits = self.decoder(tokens[:, :-1], self.image_tokens(images)).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        return nll.view(mask.shape), mask

    def per_sample_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 losses: ``ℓ_i = (1/|M_i|) Σ_{j∈M_i} −log p(t_{i,j+1} | t_{i,≤j}, x_i)``.

        Teacher forcing on ``tokens[:, :-1]``; ``M_i`` holds sample i's target positions up to and
        including its first EOT, so padding never enters the loss. Works for B = 0.
        """
        nll, mask = self._token_nll(images, tokens)
        return (nll * mask).sum(dim=1) / mask.sum(dim=1)

    def caption_logprob(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 ``Σ_{j∈M_i} log p(t_{i,j+1} | t_{i,≤j}, x_i)``: the caption's log-likelihood."""
        nll, mask = self._token_nll(images, tokens)
        return -(nll * mask).sum(dim=1)

    def encode_image(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """``(B, Dv)`` image features from the final-normed tokens: ``"mean"`` over the patch tokens (CLS
        excluded), ``"cls"`` the CLS token, ``"mean_all"`` over every token, CLS included (the pooling of
        DP-Cap's released linear probe, ``z.mean(dim=1)`` over ``linear_prob_forward``'s tokens)."""
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
        tokens = self.image_tokens(images)
        if pool == "cls":
            return tokens[:, 0]
        if pool == "mean_all":
            return tokens.mean(dim=1)
        return tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """Greedy captions ``(B, max_length)`` int64: ``[SOT, …, EOT, 0, …]`` (the tokenizer's format).

        Decodes from SOT, taking the arg-max token (SOT and a compact vocabulary's unknown id
        excluded) at each step; the image tokens are computed once. A row that has not emitted EOT
        by the last position gets EOT there, so every row is EOT-terminated like a truncated
        tokenized caption.
        """
        length = self.context_length if max_length is None else max_length
        if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= self.context_length:
            raise ConfigError(f"max_length must be an int in [2, {self.context_length}], got {max_length!r}")
        memory = self.image_tokens(images)
        batch = images.shape[0]
        sot, eot, pad = self.vocabulary.sot_id, self.vocabulary.eot_id, self.vocabulary.pad_id
        seq = torch.full((batch, length), pad, dtype=torch.long, device=images.device)
        seq[:, 0] = sot
        done = torch.zeros(batch, dtype=torch.bool, device=images.device)
        for pos in range(1, length):
            logits = self.decoder(seq[:, :pos], memory)[:, -1].float()
            logits[:, sot] = float("-inf")
            if self.vocabulary.unk_id is not None:  # "unknown word" is no caption (it is also frequent)
                logits[:, self.vocabulary.unk_id] = float("-inf")
            step = torch.where(done, pad, logits.argmax(dim=-1))
            seq[:, pos] = step
            done |= step == eot
            if bool(done.all()):
                return seq
        seq[~done, -1] = eot
        return seq
