"""Caption tokenizer: open_clip's bundled BPE at a fixed length, with a separate loss mask.

A tokenized caption is ``[SOT, bpe…, EOT, pad, pad, …]`` in the ids of a `Vocabulary` (``clip``:
open_clip's own ids; ``clip16k`` and ``unicode``: compact ones with an unknown id, see `dpcap.data.vocab`). Under
``clip`` the pad id 0 is a real BPE token ("!"), so padding can never be told apart from text by
its value: the loss mask is derived from the position of the first EOT instead (`target_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

from dpcap.data.vocab import CLIP_EOT_ID, CLIP_PAD_ID, CLIP_SOT_ID, CLIP_VOCAB_SIZE, VOCABS, get_vocabulary
from dpcap.errors import ConfigError, DataError

# open_clip's ids (the ``clip`` vocabulary, the default)
SOT_ID = CLIP_SOT_ID
EOT_ID = CLIP_EOT_ID
PAD_ID = CLIP_PAD_ID
VOCAB_SIZE = CLIP_VOCAB_SIZE
UNK_TEXT = "<unk>"  # how `decode` shows a BPE token outside a compact vocabulary


class CaptionTokenizer:
    """Fixed-length BPE tokenizer (works offline: the vocabulary ships with open_clip).

    Args:
        context_length: total length of each row, SOT and EOT included (at least 2).
        vocab: ``"clip"`` (open_clip's 49,408 ids), ``"clip16k"`` (its first 16,384 ids + unknown) or
            ``"unicode"`` (the tokens of Unicode's character names + unknown).
    """

    def __init__(self, context_length: int, vocab: str = "clip") -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"context_length must be an integer >= 2, got {context_length!r}")
        if vocab not in VOCABS:
            raise ConfigError(f"unknown vocabulary {vocab!r}; valid: {', '.join(VOCABS)}")
        self.context_length = context_length
        self.vocabulary = get_vocabulary(vocab)
        self._to_model = self.vocabulary.lookup().tolist()
        self._bpe = SimpleTokenizer(context_length=context_length)
        if self._bpe.sot_token_id != SOT_ID or self._bpe.eot_token_id != EOT_ID:
            raise ConfigError("open_clip's BPE vocabulary changed: unexpected SOT/EOT ids")

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for ``clip``)."""
        return self.vocabulary.size

    @property
    def sot_id(self) -> int:
        """Start-of-text id."""
        return self.vocabulary.sot_id

    @property
    def eot_id(self) -> int:
        """End-of-text id."""
        return self.vocabulary.eot_id

    @property
    def pad_id(self) -> int:
        """Id written after EOT."""
        return self.vocabulary.pad_id

    def encode_one(self, caption: str) -> list[int]:
        """``[SOT, bpe…, EOT]`` truncated to `context_length`, so that EOT is always the last kept token."""
        body = [self._to_model[t] for t in self._bpe.encode(caption)[: self.context_length - 2]]
        return [self.sot_id, *body, self.eot_id]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Tokenize captions into a ``(B, context_length)`` int64 tensor padded with `pad_id` after EOT."""
        if isinstance(captions, str):
            raise DataError("CaptionTokenizer expects a list of captions, got a single string")
        out = torch.full((len(captions), self.context_length), self.pad_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise DataError(f"caption {row} is {type(caption).__name__}, expected str")
            ids = self.encode_one(caption)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Text of each row: the tokens after a leading SOT and before the first EOT (pad dropped)."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
        return [self._decode_row(row) for row in rows]

    def _decode_row(self, row: list[int]) -> str:
        sot, eot = self.sot_id, self.eot_id
        if row and row[0] == sot:
            row = row[1:]
        if eot in row:
            row = row[: row.index(eot)]
        row = [t for t in row if t != sot]
        if self.vocabulary.unk_id is None:
            return self._bpe.decode(row).strip()
        pieces, run = [], []
        for t in row:
            clip_id = self.vocabulary.to_clip(t)
            if clip_id is not None:
                run.append(clip_id)
            elif t == self.vocabulary.unk_id:  # the other special ids (pad) carry no text
                pieces += [self._bpe.decode(run), UNK_TEXT + " "]
                run = []
        return " ".join("".join([*pieces, self._bpe.decode(run)]).split())


def target_mask(tokens: torch.Tensor, *, eot_id: int = EOT_ID) -> torch.Tensor:
    """Loss mask for next-token targets ``tokens[:, 1:]``: True up to and including the first EOT.

    With ``e_b`` the index of row b's first EOT among the targets, ``mask[b, j] = (j <= e_b)``,
    computed as "no EOT strictly before j": ``cumsum(is_eot)[j] - is_eot[j] == 0``.

    Raises:
        DataError: a row has no EOT among its targets. `CaptionTokenizer` and `Captioner.generate`
            always write one, so this only happens for hand-made token tensors (the loss of such a
            row would silently include padding).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise DataError(f"tokens must have shape (B, L) with L >= 2, got {tuple(tokens.shape)}")
    is_eot = tokens[:, 1:] == eot_id
    before = torch.cumsum(is_eot.to(torch.int32), dim=1) - is_eot.to(torch.int32)
    missing = ~is_eot.any(dim=1)
    if bool(missing.any()):
        rows = missing.nonzero().flatten().tolist()[:5]
        raise DataError(f"token rows {rows} have no EOT ({eot_id}) after position 0; tokenize with CaptionTokenizer")
    return before == 0
