"""Caption vocabularies: open_clip's full BPE vocabulary, or its first 16,384 ids.

A vocabulary maps open_clip BPE ids to the ids the model embeds and predicts.

- ``clip``: the identity on all 49,408 ids (SOT 49406, EOT 49407, pad 0 = the real token "!"),
  the default for real runs.
- ``clip16k``: open_clip's ids below 16,384 keep their id (the 512 byte tokens and the first
  15,872 merges, which BPE learns most frequent first); every other BPE token becomes one
  unknown id (16,384), SOT is 16,385 and EOT 16,386. About 4% of the demo's emoji caption tokens
  and 9% of its glyph caption tokens are unknown.

Why a compact vocabulary must not come from the training captions: a vocabulary read off the
private captions would reveal which words occur in them, and nothing about it would be covered by
the DP guarantee. ``clip16k`` depends only on open_clip's public BPE, learned on other text. The
49,408-way head is also most of a small captioner's compute and of its per-sample gradient norm,
so a small demo learns far more within the same privacy budget with a compact head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
CLIP_PAD_ID = 0
COMPACT_SIZE = 16384  # open_clip ids kept by ``clip16k``
VOCABS = ("clip", "clip16k")


@dataclass(frozen=True)
class Vocabulary:
    """A map from open_clip BPE ids to model ids: ids below `kept` stay, the others become `unk_id`."""

    name: str
    size: int
    sot_id: int
    eot_id: int
    pad_id: int
    unk_id: int | None
    kept: int

    def lookup(self) -> torch.Tensor:
        """(49408,) int64: the model id of every open_clip id."""
        table = torch.arange(CLIP_VOCAB_SIZE)
        if self.unk_id is not None:
            table[self.kept :] = self.unk_id
        table[CLIP_SOT_ID], table[CLIP_EOT_ID] = self.sot_id, self.eot_id
        return table

    def to_clip(self, model_id: int) -> int | None:
        """The open_clip id of a model id below `kept` (None for unknown, SOT and EOT)."""
        return model_id if model_id < self.kept else None


def get_vocabulary(name: str) -> Vocabulary:
    """The vocabulary `name` (one of VOCABS); ValueError otherwise (configs validate the name first)."""
    if name == "clip":
        return Vocabulary("clip", CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID, CLIP_PAD_ID, None, CLIP_SOT_ID)
    if name == "clip16k":
        k = COMPACT_SIZE
        return Vocabulary("clip16k", k + 3, k + 1, k + 2, CLIP_PAD_ID, k, k)
    raise ValueError(f"unknown vocabulary {name!r}; valid: {', '.join(VOCABS)}")
