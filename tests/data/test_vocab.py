"""Caption vocabularies: `clip` is open_clip's own ids; `clip16k` keeps its first 16,384 ids."""

import open_clip
import pytest
import torch

from dpcap.data.tokenizer import CaptionTokenizer, target_mask
from dpcap.data.vocab import COMPACT_SIZE, get_vocabulary
from dpcap.errors import ConfigError
from dpcap.model import create_captioner, get_config, get_tokenizer


def test_clip_is_the_identity() -> None:
    vocab = get_vocabulary("clip")
    assert torch.equal(vocab.lookup(), torch.arange(49408))
    assert (vocab.size, vocab.sot_id, vocab.eot_id, vocab.unk_id) == (49408, 49406, 49407, None)


def test_clip16k_against_open_clip_ids() -> None:
    """Each open_clip id below 16,384 keeps its value; the rest become the one unknown id (naive loop)."""
    tok = CaptionTokenizer(16, vocab="clip16k")
    captions = ["an emoji of waving hand: medium skin tone", "a glyph of latin small letter a", ""]
    reference = open_clip.tokenize(captions, context_length=16)
    got = tok(captions)
    for row_ref, row in zip(reference.tolist(), got.tolist()):
        end = row_ref.index(49407)
        expected = [16385] + [t if t < COMPACT_SIZE else COMPACT_SIZE for t in row_ref[1:end]] + [16386]
        assert row[: end + 1] == expected and all(t == 0 for t in row[end + 1 :])
    assert int(got.max()) < tok.vocab_size == COMPACT_SIZE + 3
    assert (got == COMPACT_SIZE).sum() >= 1  # "waving" is outside the first 16,384 ids


def test_clip16k_decode_marks_unknown_words() -> None:
    tok = CaptionTokenizer(16, vocab="clip16k")
    assert tok.decode(tok(["a glyph of latin small letter a"])) == ["a glyph of latin small letter a"]
    assert tok.decode(tok(["an emoji of waving hand"])) == ["an emoji of <unk> hand"]


def test_target_mask_uses_the_vocabulary_eot() -> None:
    tok = CaptionTokenizer(8, vocab="clip16k")
    tokens = tok(["a cat", "a"])
    mask = target_mask(tokens, eot_id=tok.eot_id)
    assert mask.sum(dim=1).tolist() == [3, 2]  # "a", "cat", EOT / "a", EOT


def test_model_head_follows_the_vocabulary() -> None:
    cfg = get_config("nano", vocab="clip16k")
    assert cfg.text.vocab_size == COMPACT_SIZE + 3 and get_config("nano").text.vocab_size == 49408
    model = create_captioner("nano", seed=0, vocab="clip16k", text_width=32, context_length=8)
    assert model.decoder.head.out_features == COMPACT_SIZE + 3
    tok = get_tokenizer("nano", vocab="clip16k", context_length=8)
    images = torch.zeros(2, 3, 32, 32)
    loss = model.per_sample_loss(images, tok(["a cat", "a dog"]))
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    generated = model.generate(images)
    assert (generated[:, 0] == tok.sot_id).all() and ((generated == tok.eot_id).sum(dim=1) == 1).all()
    assert isinstance(tok.decode(generated)[0], str)


def test_unknown_vocabulary_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="vocab"):
        get_config("nano", vocab="bert")
    with pytest.raises(ConfigError, match="vocabulary"):
        CaptionTokenizer(8, vocab="bert")


def test_unicode_vocabulary_is_the_tokens_of_public_unicode_names() -> None:
    """The shipped list equals a fresh derivation from UnicodeData.txt (independent naive loop)."""
    from pathlib import Path

    from open_clip.tokenizer import SimpleTokenizer

    from dpcap.data.vocab import UNICODE_DATA_CANDIDATES

    source = next((Path(p) for p in UNICODE_DATA_CANDIDATES if Path(p).is_file()), None)
    if source is None:  # `make test` installs unicode-data; a bare pytest elsewhere may not have it
        pytest.skip("unicode-data is not installed")
    bpe, expected = SimpleTokenizer(), set(range(512))
    for line in source.read_text(encoding="utf-8").splitlines():
        fields = line.split(";")
        for name in (fields[1], fields[10]):
            if name and not name.startswith("<"):
                expected.update(bpe.encode(name.lower()))
    vocab = get_vocabulary("unicode")
    assert set(vocab.listed) == expected - {49406, 49407} and list(vocab.listed) == sorted(vocab.listed)
    assert vocab.size == 4 + len(vocab.listed)


def test_unicode_vocabulary_round_trip_and_unknown() -> None:
    tok = CaptionTokenizer(20, vocab="unicode")
    tokens = tok(["an emoji of grinning face", "an emoji of flag: Afghanistan"])
    assert tokens[:, 0].tolist() == [2, 2] and int(tokens.max()) < tok.vocab_size
    assert tok.decode(tokens) == ["an emoji of grinning face", "an emoji of flag : <unk>"]
    assert int((tokens == 1).sum()) == 1  # "afghanistan" is not in any Unicode character name


def test_generate_never_emits_the_unknown_id() -> None:
    model = create_captioner("nano", seed=0, vocab="unicode", text_width=32, context_length=8)
    with torch.no_grad():  # make "unknown" the arg-max everywhere: generate must still avoid it
        model.decoder.head.bias.zero_()
        model.decoder.head.bias[1] = 100.0
    generated = model.generate(torch.zeros(3, 3, 32, 32))
    assert not bool((generated == 1).any()) and bool((generated[:, 0] == 2).all())


def test_unicode_decode_drops_pad_and_marks_only_unknown() -> None:
    tok = CaptionTokenizer(12, vocab="unicode")
    row = tok(["a cat"])[0].tolist()
    end = row.index(tok.eot_id)
    padded_inside = row[:end] + [tok.pad_id, 1] + row[end:]  # a pad and an unknown before EOT
    assert tok.decode([padded_inside]) == ["a cat <unk>"]
