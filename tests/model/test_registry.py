"""Named sizes, overrides, parameter counts (against config arithmetic) and seeded construction."""

import pytest
import torch

from dpcap.errors import ConfigError
from dpcap.model import (
    Captioner,
    CaptionerConfig,
    TextConfig,
    VisionConfig,
    create_captioner,
    get_config,
    get_tokenizer,
    list_sizes,
)

SMALL = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2)
SMALL |= dict(text_width=32, text_layers=1, text_heads=2, context_length=8)


def expected_params(cfg: CaptionerConfig) -> int:
    """Independent count from the architecture description (ViT + pre-LN cross-attention decoder)."""
    v, t, b = cfg.vision, cfg.text, int(cfg.bias)
    d, hv = v.width, int(v.width * v.mlp_ratio)
    patches = (v.image_size // v.patch_size) ** 2
    enc = 3 * v.patch_size**2 * d + d + d + (patches + 1) * d + 2 * d
    enc += v.layers * (4 * d + 3 * d * d + b * 3 * d + d * d + b * d + 2 * d * hv + b * (hv + d))
    w, ht = t.width, int(t.width * t.mlp_ratio)
    attn_self = 4 * (w * w + b * w)
    attn_cross = 2 * (w * w + b * w) + 2 * (d * w + b * w)
    mlp = 2 * w * ht + b * (ht + w)
    dec = t.vocab_size * w + t.context_length * w + 2 * w + w * t.vocab_size + b * t.vocab_size
    dec += t.layers * (6 * w + attn_self + attn_cross + mlp)
    return enc + dec


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_list_sizes_and_spec_numbers() -> None:
    assert list_sizes() == ["nano", "tiny", "small", "base", "large"]
    nano = get_config("nano")
    assert nano.vision == VisionConfig(32, 4, 128, 4, 4) and nano.text == TextConfig(32, 128, 2, 4)
    assert get_config("tiny").vision == VisionConfig(64, 8, 192, 6, 3)
    base = get_config("base")
    assert base.vision == VisionConfig(224, 16, 768, 12, 12) and base.text == TextConfig(40, 768, 6, 12)
    assert int(base.text.width * base.text.mlp_ratio) == 3072 and base.vision.num_tokens == 197
    assert get_config("large").vision.layers == 24 and get_config("small").text.context_length == 40
    assert all(get_config(n).name == n for n in list_sizes())


def test_overrides_apply_to_the_right_tower() -> None:
    cfg = get_config("nano", mlp_ratio=2, bias=False, text_layers=3, image_size=64)
    assert cfg.vision.mlp_ratio == cfg.text.mlp_ratio == 2.0 and isinstance(cfg.vision.mlp_ratio, float)
    assert cfg.bias is False and cfg.text.layers == 3 and cfg.vision.layers == 4 and cfg.vision.image_size == 64
    assert get_config("nano") == get_config("nano")  # overrides never leak into the registry


@pytest.mark.parametrize(
    ("name", "overrides", "needle"),
    [
        ("huge", {}, "huge"),
        ("nano", {"depth": 3}, "depth"),
        ("nano", {"image_size": "32"}, "image_size"),
        ("nano", {"vision_layers": 2.0}, "vision_layers"),
        ("nano", {"bias": 1}, "bias"),
        ("nano", {"text_heads": True}, "text_heads"),
        ("nano", {"image_size": 30}, "divisible"),
        ("nano", {"vision_width": 130}, "divisible"),
        ("nano", {"context_length": 1}, "context_length"),
        ("nano", {"mlp_ratio": -1.0}, "mlp_ratio"),
    ],
)
def test_bad_size_or_override_is_config_error(name: str, overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        get_config(name, **overrides)


def test_error_lists_valid_choices() -> None:
    with pytest.raises(ConfigError, match="nano, tiny, small, base, large"):
        create_captioner("xl")
    with pytest.raises(ConfigError, match="vision_width"):
        get_config("nano", width=3)


@pytest.mark.parametrize("bias", [True, False])
def test_built_params_match_arithmetic(bias: bool) -> None:
    model = create_captioner("nano", seed=0, bias=bias, mlp_ratio=3.0, **SMALL)
    assert count(model) == expected_params(model.config)


def test_base_param_count() -> None:
    cfg = get_config("base")
    with torch.device("meta"):
        model = Captioner(cfg)
    n = count(model)
    assert n == expected_params(cfg)
    assert count(model.encoder) == 85_798_656  # timm ViT-B/16 without head
    # DP-Cap's ~190M used BERT's 30,522-token vocabulary; same architecture with that vocabulary:
    bert = CaptionerConfig("base-bert", cfg.vision, TextConfig(40, 768, 6, 12, vocab_size=30522))
    assert abs(expected_params(bert) - 190e6) / 190e6 < 0.05
    # CLIP's 49,408-token BPE adds 2 x (49,408 - 30,522) x 768 = 29M (untied embedding and head)
    assert 210e6 < n < 225e6


def test_same_seed_same_weights_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    a = create_captioner("nano", seed=3, **SMALL)
    b = create_captioner("nano", seed=3, **SMALL)
    c = create_captioner("nano", seed=4, **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.head.weight"], sc["decoder.head.weight"])
    assert not torch.equal(sa["encoder.pos_embed"], sc["encoder.pos_embed"])


def test_seed_must_be_int() -> None:
    with pytest.raises(ConfigError, match="seed"):
        create_captioner("nano", seed="1", **SMALL)


def test_get_tokenizer_matches_size() -> None:
    assert get_tokenizer("base").context_length == 40
    assert get_tokenizer("nano", context_length=8)(["a cat"]).shape == (1, 8)
    with pytest.raises(ConfigError):
        get_tokenizer("nope")
