"""Zero-shot classification over a prompt trie; oracle: brute-force ``Captioner.caption_logprob`` per pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpcap.data.build import build_shards
from dpcap.data.tokenizer import CaptionTokenizer, target_mask
from dpcap.errors import ConfigError, DataError
from dpcap.eval.zeroshot import PromptTrie, template_prompts, tokenize_prompts, zero_shot, zero_shot_accuracy
from dpcap.model import create_captioner

TINY = dict(
    image_size=16,
    patch_size=8,
    vision_layers=1,
    text_layers=2,
    text_width=32,
    vision_width=32,
    vision_heads=2,
    text_heads=2,
    context_length=12,
)
PROMPTS = {
    "cat": ["an emoji of cat", "a cat"],
    "cat face": ["an emoji of cat face", "a cat face"],  # "a cat" is a prefix of "a cat face"
    "hot dog": ["an emoji of hot dog", "a cat"],  # a prompt shared by two classes
    "owl": "an emoji of owl",
}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_captioner("nano", seed=0, **TINY)


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer(12)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def brute_force(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, P) caption_logprob of every (image, prompt) pair, one padded prompt row at a time."""
    model.eval()
    with torch.no_grad():
        cols = [model.caption_logprob(images, row.expand(images.shape[0], -1).contiguous()) for row in tokens]
    return torch.stack(cols, dim=1).double()


def test_scores_match_brute_force(tiny: torch.nn.Module, tok: CaptionTokenizer, images: torch.Tensor) -> None:
    tiny.train()
    out = zero_shot(tiny, images, PROMPTS, tokenizer=tok, batch_size=2, positions_per_step=3)
    assert tiny.training  # mode restored
    tokens = tok(out["prompts"])
    oracle = brute_force(tiny, images, tokens)
    torch.testing.assert_close(out["prompt_scores"], oracle, rtol=0, atol=1e-4)
    owner = [0, 0, 1, 1, 2, 2, 3]
    expected = torch.stack([oracle[:, [j for j, o in enumerate(owner) if o == c]].mean(1) for c in range(4)], 1)
    torch.testing.assert_close(out["scores"], expected, rtol=0, atol=1e-4)
    assert out["classes"] == list(PROMPTS)
    assert out["predictions"] == [list(PROMPTS)[i] for i in expected.argmax(1).tolist()]
    assert all(isinstance(p, str) for p in out["predictions"])


@pytest.mark.parametrize("reduce", ["max", "logmeanexp"])
@pytest.mark.parametrize("length_norm", [False, True])
def test_reductions_and_length_norm(
    tiny: torch.nn.Module, tok: CaptionTokenizer, images: torch.Tensor, reduce: str, length_norm: bool
) -> None:
    out = zero_shot(tiny, images, PROMPTS, tokenizer=tok, reduce=reduce, length_norm=length_norm)
    tokens = tok(out["prompts"])
    oracle = brute_force(tiny, images, tokens)
    if length_norm:
        oracle = oracle / target_mask(tokens).sum(1).double()
    groups = [[0, 1], [2, 3], [4, 5], [6]]
    for c, cols in enumerate(groups):
        vals = oracle[:, cols]
        ref = vals.max(1).values if reduce == "max" else torch.log(vals.exp().mean(1))
        torch.testing.assert_close(out["scores"][:, c], ref, rtol=0, atol=1e-4)


def test_trie_evaluates_fewer_decoder_positions(tiny: torch.nn.Module, tok: CaptionTokenizer) -> None:
    names = ["cat", "dog", "owl", "bee", "hot dog", "red apple", "green apple", "cat face"]
    prompts = {n: [f"an emoji of {n}", f"a photo of a {n}"] for n in names}
    seqs = tokenize_prompts(tok, [p for ps in prompts.values() for p in ps])
    distinct_prefixes = {tuple(s[:j]) for s in seqs for j in range(1, len(s))}
    rows = []
    hook = tiny.decoder.head.register_forward_hook(lambda m, args, y: rows.append(y.shape[0] * y.shape[1]))
    try:
        images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        out = zero_shot(tiny, images, prompts, tokenizer=tok, positions_per_step=7)
    finally:
        hook.remove()
    assert out["trie_nodes"] == len(distinct_prefixes)
    assert sum(rows) == out["decoder_tokens"] == 3 * len(distinct_prefixes)  # positions the decoder really ran
    assert out["brute_force_decoder_tokens"] == 3 * sum(len(s) - 1 for s in seqs)
    assert out["decoder_tokens"] < 0.7 * out["brute_force_decoder_tokens"]
    # sharing grows with the number of classes: one more class adds only its own suffix
    more = PromptTrie.from_sequences(seqs + tokenize_prompts(tok, ["an emoji of zebra"]))
    assert more.num_nodes - out["trie_nodes"] == len(tokenize_prompts(tok, ["zebra"])[0]) - 2


def test_list_and_int_labels(tiny: torch.nn.Module, tok: CaptionTokenizer, images: torch.Tensor) -> None:
    as_list = zero_shot(tiny, images, ["a cat", "a dog", "an owl"], tokenizer=tok)
    as_dict = zero_shot(tiny, images, {7: "a cat", 8: "a dog", 9: "an owl"}, tokenizer=tok)
    assert as_list["classes"] == [0, 1, 2] and as_dict["classes"] == [7, 8, 9]
    torch.testing.assert_close(as_list["scores"], as_dict["scores"], rtol=0, atol=0)
    assert [v + 7 for v in as_list["predictions"]] == as_dict["predictions"]
    assert zero_shot(tiny, images[:0], ["a cat", "a dog"], tokenizer=tok)["scores"].shape == (0, 2)


def test_default_tokenizer_matches_model_context(tiny: torch.nn.Module, tok: CaptionTokenizer) -> None:
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a = zero_shot(tiny, images, PROMPTS)
    b = zero_shot(tiny, images, PROMPTS, tokenizer=tok)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)


def test_bad_inputs(tiny: torch.nn.Module, tok: CaptionTokenizer, images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="owl"):
        zero_shot(tiny, images, {"cat": ["a cat"], "owl": []}, tokenizer=tok)
    with pytest.raises(ConfigError, match="reduce"):
        zero_shot(tiny, images, PROMPTS, tokenizer=tok, reduce="median")
    with pytest.raises(ConfigError, match="empty"):
        zero_shot(tiny, images, {}, tokenizer=tok)
    with pytest.raises(ConfigError, match="decoder positions"):
        zero_shot(tiny, images, [" ".join(["word"] * 14)], tokenizer=CaptionTokenizer(20))
    with pytest.raises(ConfigError, match="batch_size"):
        zero_shot(tiny, images, PROMPTS, tokenizer=tok, batch_size=0)
    with pytest.raises(ConfigError, match="templates"):
        template_prompts(["no placeholder"])


# ---------------------------------------------------------------- a captioner that learned 3 patterns

NAMES = ("cat", "dog", "owl")


def pattern_pixels(n_per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 16, 16, 3) images: red field, green horizontal stripes, blue vertical stripes, plus noise."""
    base = torch.zeros(3, 16, 16, 3)
    base[0, :, :, 0] = 1.0
    base[1, ::2, :, 1] = 1.0
    base[2, :, ::2, 2] = 1.0
    y = torch.arange(3).repeat_interleave(n_per_class)
    noisy = base[y] + 0.15 * torch.randn(len(y), 16, 16, 3, generator=gen)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8), y


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """The reader's transform at the model's own size: [0, 1] then (x − 0.5) / 0.5."""
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


@pytest.fixture(scope="module")
def trained(tok: CaptionTokenizer) -> torch.nn.Module:
    """36 non-private AdamW steps on captions "an emoji of {name}" of the 3 patterns."""
    model = create_captioner("nano", seed=0, **TINY)
    gen = torch.Generator().manual_seed(0)
    tokens = tok([f"an emoji of {n}" for n in NAMES])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(36):
        pixels, y = pattern_pixels(4, gen)
        loss = model.per_sample_loss(to_model_input(pixels), tokens[y]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_captioner_classifies_zero_shot(trained: torch.nn.Module, tok: CaptionTokenizer) -> None:
    pixels, y = pattern_pixels(4, torch.Generator().manual_seed(99))
    prompts = {n: [f"an emoji of {n}"] for n in NAMES}
    out = zero_shot(trained, to_model_input(pixels), prompts, tokenizer=tok, batch_size=5)
    assert out["predictions"] == [NAMES[i] for i in y.tolist()]


def test_zero_shot_accuracy_on_shards(trained: torch.nn.Module, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels, y = pattern_pixels(3, torch.Generator().manual_seed(7))
    for i, (img, label) in enumerate(zip(pixels.numpy(), y.tolist())):
        Image.fromarray(np.ascontiguousarray(img)).save(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text("unused caption")
        meta = {"animal": NAMES[label], "split": "test" if i % 3 else "train"}
        (src / f"im{i}.json").write_text(json.dumps(meta))
    shards = tmp_path / "shards"
    build_shards(src, shards, samples_per_shard=4)
    report = zero_shot_accuracy(trained, shards, label_key="animal", split="test", batch_size=4)
    assert report["num_samples"] == 6 and report["classes"] == list(NAMES)
    assert report["top1"] == 1.0 and report["per_class_top1"] == {n: 1.0 for n in NAMES}
    assert report["decoder_tokens"] < report["brute_force_decoder_tokens"]
    json.dumps(report)
    # wrong prompts for every class → the classifier is no longer right everywhere
    swapped = {"cat": "dog", "dog": "owl", "owl": "cat"}
    bad = zero_shot_accuracy(
        trained, shards, label_key="animal", prompts_for=lambda c: [f"an emoji of {swapped[c]}"], batch_size=4
    )
    assert bad["num_samples"] == 9 and bad["top1"] == 0.0
    with pytest.raises(DataError, match="colour"):
        zero_shot_accuracy(trained, shards, label_key="colour")
    assert math.isclose(report["top1"], 1.0)
