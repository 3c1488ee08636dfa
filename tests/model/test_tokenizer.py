"""CaptionTokenizer and target_mask against open_clip's own tokenize and a naive loop."""

import open_clip
import pytest
import torch

from dpcap.data.tokenizer import EOT_ID, SOT_ID, CaptionTokenizer, target_mask
from dpcap.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer(12)


def naive_mask(tokens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        for j, t in enumerate(row[1:]):
            out[b, j] = True
            if t == EOT_ID:
                break
    return out


def test_properties(tok: CaptionTokenizer) -> None:
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.context_length) == (49408, 49406, 49407, 12)


def test_matches_open_clip_tokenize(tok: CaptionTokenizer) -> None:
    captions = ["a photo of a cat", "Hello, World!", "", "a very long caption " * 5]
    expected = open_clip.tokenize(captions, context_length=12)
    assert torch.equal(tok(captions), expected)
    assert tok(captions).dtype == torch.int64


def test_round_trip_decode(tok: CaptionTokenizer) -> None:
    captions = ["a photo of a cat", "two dogs playing", ""]
    assert tok.decode(tok(captions)) == captions
    assert tok.decode([[SOT_ID, 320, 0, EOT_ID, 0, 0]]) == ["a !"]


def test_truncation_keeps_eot_last(tok: CaptionTokenizer) -> None:
    caption = "one two three four five six seven eight nine ten eleven twelve thirteen"
    row = tok([caption])[0]
    assert row[0] == SOT_ID and row[-1] == EOT_ID
    assert (row == EOT_ID).sum() == 1 and (row == 0).sum() == 0
    assert tok.decode(row[None]) == ["one two three four five six seven eight nine ten"]


def test_padding_is_zero_after_eot(tok: CaptionTokenizer) -> None:
    row = tok(["a cat"])[0].tolist()
    assert row[:4] == [SOT_ID, 320, 2368, EOT_ID] and row[4:] == [0] * 8


def test_mask_covers_through_first_eot(tok: CaptionTokenizer) -> None:
    tokens = tok(["a photo of a cat", "", "one two three four five six seven eight nine ten eleven"])
    mask = target_mask(tokens)
    assert torch.equal(mask, naive_mask(tokens))
    assert mask.sum(dim=1).tolist() == [6, 1, 11]


def test_bang_token_zero_does_not_extend_mask() -> None:
    tokens = torch.tensor([[SOT_ID, 0, 320, 0, EOT_ID, 0, 0], [SOT_ID, 0, EOT_ID, 0, EOT_ID, 5, 0]])
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(target_mask(tokens), expected)


def test_mask_random_rows_against_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (20, 9), generator=gen)
    tokens[:, 0] = SOT_ID
    eot_at = torch.randint(1, 9, (20,), generator=gen)
    tokens[torch.arange(20), eot_at] = EOT_ID
    tokens[::3, -1] = EOT_ID
    assert torch.equal(target_mask(tokens), naive_mask(tokens))


def test_mask_empty_batch() -> None:
    assert target_mask(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 4)


def test_row_without_eot_is_an_error() -> None:
    tokens = torch.tensor([[SOT_ID, 5, 6, 7], [SOT_ID, 5, EOT_ID, 0]])
    with pytest.raises(DataError, match=r"\[0\]"):
        target_mask(tokens)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="context_length"):
        CaptionTokenizer(1)
    with pytest.raises(DataError):
        CaptionTokenizer(8)("a single string")
