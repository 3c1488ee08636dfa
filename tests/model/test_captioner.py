"""Captioner: per-sample loss against a naive per-example loop, masking, causality, pooling,
generation, learnability, and the module/parameter structure the privacy engine relies on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpcap.data.tokenizer import EOT_ID, SOT_ID
from dpcap.errors import ConfigError, DataError
from dpcap.model import (
    ENCODER_ARCH,
    Captioner,
    LearnedPositions,
    create_captioner,
    encoder_model_args,
    get_config,
    get_tokenizer,
)

TINY = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2)
TINY |= dict(text_width=32, text_layers=2, text_heads=2, context_length=10)
CAPTIONS = ["a photo of a cat", "two dogs", "a red car on a street at night", ""]


@pytest.fixture(scope="module")
def model() -> Captioner:
    return create_captioner("nano", seed=0, **TINY).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return get_tokenizer("nano", context_length=10)(CAPTIONS)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def loss_alone(model: Captioner, image: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Oracle: one example, cut at its EOT (no padding at all), plain mean cross-entropy."""
    n = row.tolist().index(EOT_ID, 1) + 1
    seq = row[None, :n]
    logits = model.decoder(seq[:, :-1], model.encoder.forward_features(image[None]))
    return F.cross_entropy(logits[0].float(), seq[0, 1:])


def test_per_sample_loss_matches_naive_loop(model, images, tokens) -> None:
    losses = model.per_sample_loss(images, tokens)
    assert losses.shape == (4,) and losses.dtype == torch.float32
    oracle = torch.stack([loss_alone(model, images[i], tokens[i]) for i in range(4)])
    torch.testing.assert_close(losses, oracle, atol=1e-5, rtol=1e-5)


def test_no_batch_mixing(model, images, tokens) -> None:
    base = model.per_sample_loss(images, tokens)
    other = images.clone()
    other[1:] = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    changed = model.per_sample_loss(other, tokens)
    torch.testing.assert_close(changed[0], base[0], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[1:], base[1:])


def test_empty_batch(model, images, tokens) -> None:
    losses = model.per_sample_loss(images[:0], tokens[:0])
    assert losses.shape == (0,) and losses.dtype == torch.float32
    assert model.caption_logprob(images[:0], tokens[:0]).shape == (0,)


def test_pad_positions_do_not_matter(model, images, tokens) -> None:
    noisy = tokens.clone()
    after_eot = torch.cumsum(tokens == EOT_ID, dim=1) - (tokens == EOT_ID).long() > 0
    noisy[after_eot] = torch.randint(0, 49000, (int(after_eot.sum()),), generator=torch.Generator().manual_seed(2))
    assert not torch.equal(noisy, tokens)
    torch.testing.assert_close(model.per_sample_loss(images, noisy), model.per_sample_loss(images, tokens))


def test_decoder_is_causal(model, images, tokens) -> None:
    memory = model.image_tokens(images)
    changed = tokens.clone()
    changed[:, 5] = 1234
    a, b = model.decoder(tokens, memory), model.decoder(changed, memory)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_caption_logprob_is_sum_of_target_logprobs(model, images, tokens) -> None:
    logp = model.caption_logprob(images, tokens)
    logits = model.decoder(tokens[:, :-1], model.image_tokens(images)).log_softmax(-1)
    for i in range(4):
        n = tokens[i].tolist().index(EOT_ID)
        expected = sum(logits[i, j, tokens[i, j + 1]] for j in range(n))
        torch.testing.assert_close(logp[i], expected, atol=1e-4, rtol=1e-5)
    n_targets = (tokens[:, 1:] == EOT_ID).long().argmax(1) + 1
    torch.testing.assert_close(-logp / n_targets, model.per_sample_loss(images, tokens))


def test_bf16_autocast_loss_is_float32(model, images, tokens) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.per_sample_loss(images, tokens)
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, model.per_sample_loss(images, tokens), atol=0.1, rtol=0.02)


def test_encode_image_pools(model, images) -> None:
    toks = model.image_tokens(images)
    assert toks.shape == (4, 1 + 4, 32)
    torch.testing.assert_close(model.encode_image(images), toks[:, 1:].mean(1))
    torch.testing.assert_close(model.encode_image(images, pool="cls"), toks[:, 0])
    assert model.encode_image(images[:0]).shape == (0, 32)
    # the tokens are final-normed (the fresh LayerNorm is the identity affine map): zero mean, unit variance
    assert torch.equal(model.encoder.norm.weight, torch.ones(32)) and torch.equal(
        model.encoder.norm.bias, torch.zeros(32)
    )
    torch.testing.assert_close(toks.mean(-1), torch.zeros(4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(toks.var(-1, unbiased=False), torch.ones(4, 5), atol=1e-2, rtol=0)
    with pytest.raises(ConfigError, match="pool"):
        model.encode_image(images, pool="max")


def test_generate_is_greedy_and_eot_terminated(model, images) -> None:
    out = model.generate(images, max_length=7)
    assert out.shape == (4, 7) and out.dtype == torch.int64
    for row in out.tolist():
        assert row[0] == SOT_ID and EOT_ID in row
        end = row.index(EOT_ID)
        assert all(t == 0 for t in row[end + 1 :]) and SOT_ID not in row[1:]
    first = model.decoder(out[:, :1], model.image_tokens(images))[:, -1]
    first[:, SOT_ID] = -float("inf")
    assert torch.equal(out[:, 1], first.argmax(-1))
    assert model.generate(images).shape == (4, 10)
    with pytest.raises(ConfigError, match="max_length"):
        model.generate(images, max_length=11)


def test_learns_four_pairs() -> None:
    model = create_captioner("nano", seed=1, **TINY)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    tokens = get_tokenizer("nano", context_length=10)(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.per_sample_loss(images, tokens).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("images", "tokens", "needle"),
    [
        (torch.zeros(2, 3, 32, 32), torch.zeros(2, 10, dtype=torch.long), "shape"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long), "float"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(2, 10, dtype=torch.int32), "int64"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(3, 10, dtype=torch.long), "3 token rows"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(2, 12, dtype=torch.long), "token length"),
        (torch.zeros(2, 3, 16, 16), torch.full((2, 10), 60000), "token ids"),
        (torch.zeros(2, 3, 16, 16), torch.full((2, 10), SOT_ID), "no EOT"),
    ],
)
def test_bad_inputs_are_data_errors(model, images, tokens, needle) -> None:
    with pytest.raises(DataError, match=needle):
        model.per_sample_loss(images, tokens)


# ---- structure the privacy engine relies on -------------------------------------------------

ALLOWED = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding, LearnedPositions)


def test_encoder_requirements(model) -> None:
    enc = model.encoder
    assert type(enc).__name__ == "VisionTransformer"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(enc.pos_drop, nn.Identity) or enc.pos_drop.p == 0
    assert isinstance(enc.patch_drop, nn.Identity) and isinstance(enc.norm_pre, nn.Identity)
    assert isinstance(enc.norm, nn.LayerNorm) and isinstance(enc.fc_norm, nn.Identity)
    assert enc.reg_token is None and enc.num_prefix_tokens == 1 and not enc.dynamic_img_size
    assert all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in enc.blocks)
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    assert not any(type(m).__name__ in ("LayerScale", "DropPath", "PatchDropout") for m in model.modules())
    assert isinstance(enc.patch_embed.proj, nn.Conv2d)
    args = encoder_model_args(model.config)
    assert "num_classes" not in args and ENCODER_ARCH == "vit_base_patch16_224"


def test_parameter_owners_are_supported_kinds(model) -> None:
    owners = set()
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if module is model.encoder:
            assert sorted(own) == ["cls_token", "pos_embed"]
            continue
        assert isinstance(module, ALLOWED), f"{name}: {type(module).__name__}"
        owners.add(type(module))
        if isinstance(module, nn.Conv2d):
            assert name == "encoder.patch_embed.proj"
    assert {nn.Linear, nn.Conv2d, nn.Embedding, LearnedPositions} <= {c for o in owners for c in o.__mro__}
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert model.decoder.head.weight.data_ptr() != model.decoder.token_embedding.weight.data_ptr()


def test_learned_positions_is_additive_broadcast() -> None:
    pos = LearnedPositions(6, 4)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(pos(x), x + pos.weight[0, :5])
    assert pos.weight.shape == (1, 6, 4)


def test_bias_flag_removes_linear_biases() -> None:
    model = create_captioner("nano", seed=0, bias=False, **TINY)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    assert model.encoder.patch_embed.proj.bias is not None  # documented: timm keeps the conv bias
    assert get_config("nano").bias is True


def test_trailing_padding_is_cut_without_changing_the_loss(model, images, tokens) -> None:
    eot = (tokens == EOT_ID).float().argmax(dim=1)
    rows = eot < eot.max()  # the captions shorter than the longest one
    short = tokens[rows][:, : int(eot[rows].max()) + 1]
    assert rows.any() and short.shape[1] < tokens.shape[1]
    torch.testing.assert_close(
        model.per_sample_loss(images[rows], short), model.per_sample_loss(images[rows], tokens[rows])
    )
