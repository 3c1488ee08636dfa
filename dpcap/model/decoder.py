"""Causal text decoder with cross-attention to all image tokens (DP-Cap's captioning head).

Only nn.Linear, nn.Embedding, nn.LayerNorm and `LearnedPositions` own parameters, so the privacy
engine can compute every per-sample gradient norm layer by layer. No dropout, no weight tying (a
shared weight would make per-layer per-sample norms wrong), nothing that mixes samples.

`set_grad_checkpointing` (timm's name) recomputes each block's activations in the backward instead of
keeping them, with non-reentrant ``torch.utils.checkpoint`` (the form the privacy engine supports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpcap.errors import DataError

if TYPE_CHECKING:
    from dpcap.model.configs import TextConfig

LN_EPS = 1e-6
INIT_STD = 0.02


class LearnedPositions(nn.Module):
    """Learned absolute positions: ``y = x + P[:, :T]`` with ``P`` of shape (1, context_length, width).

    The output is exactly this additive broadcast, so the per-sample gradient of ``P`` is the
    gradient of the output at that sample (zero past T), which the privacy engine relies on.
    """

    def __init__(self, context_length: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, context_length, width))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[:, : x.shape[1]]


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v and output nn.Linear layers.

    ``softmax(Q Kᵀ / √d_head) V`` per head (Vaswani et al., 2017), via ``F.scaled_dot_product_attention``.
    Keys and values are projected from `kv_width` (the vision width for cross-attention).
    """

    def __init__(self, width: int, heads: int, kv_width: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=bias)
        self.k = nn.Linear(kv_width, width, bias=bias)
        self.v = nn.Linear(kv_width, width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).flatten(2))


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the image tokens, then a GELU MLP."""

    def __init__(self, width: int, heads: int, image_width: int, mlp_ratio: float, bias: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
        self.self_attn = Attention(width, heads, width, bias)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
        self.cross_attn = Attention(width, heads, image_width, bias)
        self.ln3 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, width, bias=bias))

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.ln2(x), image_tokens)
        return x + self.mlp(self.ln3(x))


class TextDecoder(nn.Module):
    """Token embedding + learned positions → pre-LN blocks → final LayerNorm → untied vocabulary head."""

    def __init__(self, cfg: TextConfig, image_width: int, bias: bool) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positions = LearnedPositions(cfg.context_length, cfg.width)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.width, cfg.heads, image_width, cfg.mlp_ratio, bias) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=bias)
        self.grad_checkpointing = False
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block: its activations are recomputed in the backward, not kept (as timm's)."""
        self.grad_checkpointing = bool(enable)

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for `tokens` ``(B, T)`` given `image_tokens` ``(B, N, Dv)``."""
        if tokens.shape[1] > self.context_length:
            raise DataError(f"{tokens.shape[1]} decoder positions exceed context_length {self.context_length}")
        x = self.positions(self.token_embedding(tokens))
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: the first forward runs with autograd on, so the clipper's hooks record it
            # (a reentrant checkpoint would hide the block's layers from them; see dpcap/privacy/clipper.py).
            x = checkpoint(block, x, image_tokens, use_reentrant=False) if recompute else block(x, image_tokens)
        return self.head(self.ln_final(x))


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases, as timm's ViT init."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
