"""Caption vocabularies: open_clip's full BPE vocabulary, or a compact one that depends on public text only.

A vocabulary maps open_clip BPE ids to the ids the model embeds and predicts.

- ``clip``: the identity on all 49,408 ids (SOT 49406, EOT 49407, pad 0 = the real token "!"),
  the default for real runs.
- ``clip16k``: open_clip's ids below 16,384 keep their id (the 512 byte tokens and the first
  15,872 merges, which BPE learns most frequent first); every other BPE token becomes one
  unknown id (16,384), SOT is 16,385 and EOT 16,386. About 4% of the emoji captions' tokens and 9%
  of Unicode character names' tokens are unknown.
- ``unicode``: the 512 byte tokens and the BPE tokens of the character names in Unicode's
  ``UnicodeData.txt`` (shipped as ``unicode_vocab.json``; ``python -m dpcap.data.vocab`` regenerates
  it from Debian's ``unicode-data``), 6,473 ids: 0 pad, 1 unknown, 2 SOT, 3 EOT, then those tokens
  in open_clip order. About 13% of the emoji captions' tokens (country names, some verbs) are
  unknown. The demo uses it: its captions are emoji names from ``emoji-test.txt``, a different
  text, and its small head leaves the per-sample clipping budget to the encoder.

Why a compact vocabulary must not come from the training captions: a vocabulary read off the
private captions would reveal which words occur in them, and nothing about it would be covered by
the DP guarantee. ``clip16k`` depends only on open_clip's public BPE, learned on other text; ``unicode`` only on the
published Unicode name list (so do not use it to train on captions made of Unicode names). The
49,408-way head is also most of a small captioner's compute and of its per-sample gradient norm,
so a small demo learns far more within the same privacy budget with a compact head.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
CLIP_PAD_ID = 0
COMPACT_SIZE = 16384  # open_clip ids kept by ``clip16k``
VOCABS = ("clip", "clip16k", "unicode")
UNICODE_VOCAB_FILE = Path(__file__).with_name("unicode_vocab.json")
UNICODE_DATA_CANDIDATES = ("/usr/share/unicode/UnicodeData.txt", "/usr/share/unicode-data/UnicodeData.txt")
_BYTE_TOKENS = 512  # open_clip's first 512 ids: each byte, alone and word-final ("a", "a</w>")
_LISTED_FIRST = 4  # ``unicode``: pad, unknown, SOT, EOT come before the listed tokens


@dataclass(frozen=True)
class Vocabulary:
    """A map from open_clip BPE ids to model ids.

    Either a prefix (`listed` empty: open_clip ids below `kept` keep their value) or a list
    (`listed[k]` is the open_clip id of model id ``4 + k``); every other BPE token is `unk_id`.
    """

    name: str
    size: int
    sot_id: int
    eot_id: int
    pad_id: int
    unk_id: int | None
    kept: int = 0
    listed: tuple[int, ...] = ()

    def lookup(self) -> torch.Tensor:
        """(49408,) int64: the model id of every open_clip id."""
        if self.listed:
            table = torch.full((CLIP_VOCAB_SIZE,), self.unk_id, dtype=torch.long)
            table[list(self.listed)] = torch.arange(len(self.listed)) + _LISTED_FIRST
        else:
            table = torch.arange(CLIP_VOCAB_SIZE)
            if self.unk_id is not None:
                table[self.kept :] = self.unk_id
        table[CLIP_SOT_ID], table[CLIP_EOT_ID] = self.sot_id, self.eot_id
        return table

    def to_clip(self, model_id: int) -> int | None:
        """The open_clip id of a model id (None for pad, unknown, SOT and EOT of a compact vocabulary)."""
        if self.listed:
            k = model_id - _LISTED_FIRST
            return self.listed[k] if 0 <= k < len(self.listed) else None
        return model_id if model_id < self.kept else None


def get_vocabulary(name: str) -> Vocabulary:
    """The vocabulary `name` (one of VOCABS); ValueError otherwise (configs validate the name first)."""
    if name == "clip":
        return Vocabulary("clip", CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID, CLIP_PAD_ID, None, CLIP_SOT_ID)
    if name == "clip16k":
        k = COMPACT_SIZE
        return Vocabulary("clip16k", k + 3, k + 1, k + 2, CLIP_PAD_ID, k, k)
    if name == "unicode":
        ids = _shipped_unicode_ids()
        return Vocabulary("unicode", _LISTED_FIRST + len(ids), 2, 3, 0, 1, listed=ids)
    raise ValueError(f"unknown vocabulary {name!r}; valid: {', '.join(VOCABS)}")


@cache
def _shipped_unicode_ids() -> tuple[int, ...]:
    return tuple(json.loads(UNICODE_VOCAB_FILE.read_text())["clip_ids"])


def unicode_names(path: str | os.PathLike) -> list[str]:
    """Lower-cased character names and Unicode 1.0 names in ``UnicodeData.txt`` (``<…>`` entries skipped)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        fields = line.split(";")
        if len(fields) >= 11:
            names += [n.lower() for n in (fields[1], fields[10]) if n and not n.startswith("<")]
    return names


def build_unicode_vocab(path: str | os.PathLike) -> list[int]:
    """Sorted open_clip ids: every byte token plus the BPE tokens of every name in ``UnicodeData.txt``."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    ids = set(range(_BYTE_TOKENS))
    for name in unicode_names(path):
        ids.update(bpe.encode(name))
    return sorted(ids - {CLIP_SOT_ID, CLIP_EOT_ID})


def write_unicode_vocab(unicode_data: str | os.PathLike, out: str | os.PathLike = UNICODE_VOCAB_FILE) -> Path:
    """Regenerate the shipped ``unicode`` vocabulary from a ``UnicodeData.txt`` (atomically)."""
    payload = {"source": "UnicodeData.txt", "clip_ids": build_unicode_vocab(unicode_data)}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":  # python -m dpcap.data.vocab [UnicodeData.txt]
    source = sys.argv[1] if len(sys.argv) > 1 else next(p for p in UNICODE_DATA_CANDIDATES if Path(p).is_file())
    print(write_unicode_vocab(source))
