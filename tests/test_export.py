"""Export: stock timm and transformers rebuild the encoder; the privacy card round-trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from dpcap.errors import ConfigError, DataError, PrivacyError
from dpcap.export import export_encoder, read_privacy_card
from dpcap.model import Captioner, create_captioner, get_config

CARD = {
    "epsilon": 7.347123456789,
    "delta": 4.277e-09,
    "sigma": 0.728,
    "sample_rate": 0.005606,
    "steps": 5708,
    "num_samples": 233804767,
    "max_grad_norm": 1.0,
    "accountant": "prv",
    "sampling": "poisson",
}


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return create_captioner("nano", image_size=16, patch_size=8, vision_layers=2, text_layers=1, seed=0).eval()


@pytest.fixture(scope="module")
def exported(captioner: Captioner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_encoder(captioner, tmp_path_factory.mktemp("exp") / "encoder", privacy_card=CARD)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_timm_local_dir_rebuilds_encoder(captioner: Captioner, exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(tokens, captioner.encoder.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), captioner.encoder(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captioner.encode_image(x, pool="mean"), tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captioner.encode_image(x, pool="cls"), tokens[:, 0], rtol=1e-5, atol=1e-5)
    assert model.num_classes == 0


def test_transformers_automodel_loads(captioner: Captioner, exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(exported)).eval()
    assert type(model).__name__ == "TimmWrapperModel"
    x = images()
    with torch.no_grad():
        out = model(pixel_values=x)
        tokens = captioner.encoder.forward_features(x)
        torch.testing.assert_close(out.last_hidden_state, tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, captioner.encode_image(x, pool="mean"), rtol=1e-5, atol=1e-5)


def test_config_records_training_preprocessing(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        get_config("nano", image_size=16, patch_size=8, vision_layers=1, text_layers=1, bias=False),
        image_mean=(0.48, 0.46, 0.41),
        image_std=(0.27, 0.26, 0.28),
    )
    model = Captioner(cfg).eval()
    out = export_encoder(model, tmp_path / "enc", privacy_card=CARD, license="mit")
    config = json.loads((out / "config.json").read_text())
    assert "num_classes" not in config["model_args"]
    assert config["model_args"]["qkv_bias"] is False and config["model_args"]["proj_bias"] is False
    pcfg = config["pretrained_cfg"]
    assert pcfg["mean"] == [0.48, 0.46, 0.41] and pcfg["std"] == [0.27, 0.26, 0.28]
    assert pcfg["input_size"] == [3, 16, 16] and pcfg["num_classes"] == 0 and pcfg["license"] == "mit"
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert rebuilt.blocks[0].attn.qkv.bias is None
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(x), model.encoder.forward_features(x))
    assert tuple(timm.data.resolve_data_config({}, model=rebuilt)["mean"]) == (0.48, 0.46, 0.41)
    assert "license: mit" in (out / "MODEL_CARD.md").read_text()


def test_privacy_card_round_trips(exported: Path) -> None:
    card = read_privacy_card(exported)
    assert card == {**{k: str(v) for k, v in CARD.items()}, "private": "true"}
    assert float(card["epsilon"]) == CARD["epsilon"] and float(card["delta"]) == CARD["delta"]
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["sigma"] == "0.728"
    text = (exported / "MODEL_CARD.md").read_text()
    assert "NOT PRIVATE" not in text
    assert "Only the weights carry the guarantee" in text
    assert "| epsilon | 7.347123456789 |" in text and "| sampling | poisson |" in text
    assert 'timm.create_model("local-dir:' in text and "AutoModel.from_pretrained" in text
    assert "trained from scratch" in text and "public" not in text


def test_card_names_public_inputs_outside_the_guarantee(captioner: Captioner, tmp_path: Path) -> None:
    recipe = {"init_from": "pub/init.safetensors", "public_data": "pub/shards", "public_weight": 0.2}
    out = export_encoder(captioner, tmp_path / "enc", privacy_card={**CARD, **recipe})
    card = read_privacy_card(out)
    assert card["private"] == "true" and card["public_data"] == "pub/shards" and card["public_weight"] == "0.2"
    text = (out / "MODEL_CARD.md").read_text()
    assert "warm-started from public weights" in text and "trained from scratch" not in text
    guarantee = text.split("## What this guarantee covers")[1]
    assert "`pub/init.safetensors`" in guarantee and "`pub/shards`" in guarantee
    assert "private training set only" in guarantee


@pytest.mark.parametrize(
    "change",
    [{"sigma": 0.0, "epsilon": float("inf")}, {"insecure_noise_seed": 1234}, {"sigma": 0, "private": "true"}],
    ids=["sigma0", "insecure-seed", "sigma0-claims-private"],
)
def test_not_private_card(captioner: Captioner, tmp_path: Path, change: dict) -> None:
    out = export_encoder(captioner, tmp_path / "enc", privacy_card={**CARD, **change})
    assert read_privacy_card(out)["private"] == "false"
    text = (out / "MODEL_CARD.md").read_text()
    assert "NOT PRIVATE" in text.split("## How to load")[0]  # prominent: before anything else
    assert "differentially private with respect to" not in text


def test_export_refusals(captioner: Captioner, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        export_encoder(captioner, tmp_path / "a", privacy_card={k: v for k, v in CARD.items() if k != "max_grad_norm"})
    with pytest.raises(ConfigError, match="not empty"):
        export_encoder(captioner, exported, privacy_card=CARD)
    out = export_encoder(captioner, exported, privacy_card={**CARD, "steps": 10}, overwrite=True)
    assert read_privacy_card(out)["steps"] == "10"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["encoder"]  # no temporary folders left
    with pytest.raises(DataError, match="not found"):
        read_privacy_card(tmp_path)
