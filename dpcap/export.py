"""Export a captioner's image encoder as a folder that stock timm and transformers load.

Layout (timm's ``save_for_hf``): ``config.json`` + ``model.safetensors`` + ``MODEL_CARD.md``.

- ``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds the VisionTransformer exactly;
- ``transformers.AutoModel.from_pretrained(DIR)`` loads it as ``TimmWrapperModel``
  (``last_hidden_state`` = timm's ``forward_features``, ``pooler_output`` = the mean of the
  final-normed patch tokens = ``Captioner.encode_image(pool="mean")``).

timm 1.0.31's ``save_for_hf`` records ``num_classes`` inside ``config.json``'s ``model_args``;
transformers' TimmWrapper passes ``num_classes=0`` itself and fails with "got multiple values for
keyword argument 'num_classes'", so the export removes it there (the top-level ``num_classes`` and
``pretrained_cfg.num_classes`` stay 0, which is what timm uses to rebuild the model headless).

The privacy card (ε, δ, σ, q, steps, N, C, accountant, sampling, and ``private``) is written into
the safetensors header metadata — readable with `read_privacy_card` without loading or unpickling
any tensor — and, for people, into ``MODEL_CARD.md``. Only the weights carry the guarantee.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dpcap.errors import ConfigError, DataError, PrivacyError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "MODEL_CARD.md"
CARD_KEYS = (
    "epsilon",
    "delta",
    "sigma",
    "sample_rate",
    "steps",
    "num_samples",
    "max_grad_norm",
    "accountant",
    "sampling",
)
_RESERVED_KEYS = frozenset({"format"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
_UNSET_WORDS = frozenset({"", "none", "null", "false"})


def _card_value(value: Any) -> str:
    """Card values are strings: bools → "true"/"false", floats → repr (round-trips), None → ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):  # ledger segments, recorded plan changes
        return json.dumps(value, sort_keys=True)
    return str(value)


def not_private_reasons(card: Mapping[str, Any]) -> list[str]:
    """Why a card gives no privacy guarantee: σ = 0, an insecure noise seed, or ``private`` false.

    A fixed noise seed makes the noise predictable, so the run is not private whatever σ is
    (invariant 4); σ = 0 or ε = ∞ means no noise or no finite bound at all.
    """
    reasons = []
    sigma = _as_float(card.get("sigma"), "sigma")
    if sigma is not None and sigma <= 0:
        reasons.append("trained without noise (sigma = 0): a non-private baseline")
    seed = card.get("insecure_noise_seed")
    if seed is not None and str(seed).strip().lower() not in _UNSET_WORDS:
        reasons.append(f"noise drawn from a fixed, known seed (privacy.insecure_noise_seed = {seed})")
    if str(card.get("insecure_seed_ever", "false")).strip().lower() not in _UNSET_WORDS | _FALSE_WORDS and not seed:
        reasons.append("a fixed, known noise or sampler seed was used at some point of the run")
    segments = card.get("segments") or []
    if isinstance(segments, str):
        segments = json.loads(segments) if segments.strip() else []
    if any(float(seg["sigma"]) <= 0 for seg in segments) and not (sigma is not None and sigma <= 0):
        reasons.append("some steps were taken without noise (a sigma = 0 segment in the ledger)")
    epsilon = _as_float(card.get("epsilon"), "epsilon")
    if epsilon is None or not math.isfinite(epsilon):
        reasons.append("no finite epsilon")
    if str(card.get("private", "true")).strip().lower() in _FALSE_WORDS and not reasons:
        reasons.append("the training run marked itself not private")
    return reasons


def _as_float(value: Any, key: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"privacy card {key!r} must be a number, got {value!r}") from None


def privacy_metadata(privacy_card: Mapping[str, Any]) -> dict[str, str]:
    """The card as safetensors metadata: every value a string, plus ``private`` = "true"/"false"."""
    missing = [k for k in CARD_KEYS if k not in privacy_card]
    if missing:
        raise PrivacyError(f"privacy card lacks {', '.join(missing)} (needs {', '.join(CARD_KEYS)})")
    reserved = _RESERVED_KEYS.intersection(privacy_card)
    if reserved:
        raise PrivacyError(f"privacy card may not use the reserved key(s) {', '.join(sorted(reserved))}")
    meta = {str(k): _card_value(v) for k, v in privacy_card.items()}
    meta["private"] = "false" if not_private_reasons(privacy_card) else "true"
    return meta


def export_encoder(
    captioner: nn.Module,
    out_dir: str | os.PathLike,
    *,
    privacy_card: Mapping[str, Any],
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> Path:
    """Write ``captioner.encoder`` to ``out_dir`` for timm / transformers, with its privacy card.

    Built in a temporary sibling folder and moved into place at the end, so a crash never leaves a
    half-written export. An existing non-empty ``out_dir`` is a ConfigError unless ``overwrite``.
    """
    from dpcap.model.encoder import encoder_model_args

    metadata = privacy_metadata(privacy_card)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"export folder {out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model_args = {k: v for k, v in encoder_model_args(captioner.config).items() if k != "num_classes"}
        _save_timm(captioner.encoder, tmp, model_args, _pretrained_cfg(captioner.config, license))
        _stamp_metadata(tmp / WEIGHTS_FILE, metadata)
        _atomic_write_text(tmp / CARD_FILE, model_card(captioner.config, metadata, model_args, license))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pretrained_cfg(cfg: Any, license: str) -> dict[str, Any]:
    size = cfg.vision.image_size
    return {
        "tag": "dpcap",
        "input_size": (3, size, size),
        "fixed_input_size": True,
        "mean": tuple(float(m) for m in cfg.image_mean),
        "std": tuple(float(s) for s in cfg.image_std),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
        "license": license,
    }


def _save_timm(encoder: nn.Module, folder: Path, model_args: dict[str, Any], pretrained_cfg: dict[str, Any]) -> None:
    """timm's ``save_for_hf``, then drop ``model_args.num_classes`` from config.json (see module doc)."""
    from timm.models import save_for_hf

    data_config = {k: pretrained_cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    save_for_hf(
        encoder,
        str(folder),
        model_config={"pretrained_cfg": dict(pretrained_cfg)},
        model_args=dict(model_args),
        safe_serialization=True,
        data_config=data_config,
    )
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    _atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def _stamp_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite the safetensors file with the card in its header (``format: pt`` kept for transformers)."""
    tensors = load_file(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp, metadata={**metadata, "format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto ``out``; an old export is renamed aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def read_privacy_card(path: str | os.PathLike) -> dict[str, str]:
    """The privacy card of an export folder (or of a ``.safetensors`` file), from the header only.

    Uses ``safetensors.safe_open(...).metadata()``: no tensor is loaded and nothing is unpickled.
    """
    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise DataError(f"{file} not found: not a dpcap export folder")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{file} is not a readable safetensors file: {exc}") from None
    card = {k: v for k, v in metadata.items() if k not in _RESERVED_KEYS}
    if "private" not in card:
        raise DataError(f"{file} carries no dpcap privacy card in its metadata")
    return card


def model_card(cfg: Any, metadata: Mapping[str, str], model_args: Mapping[str, Any], license: str) -> str:
    """MODEL_CARD.md: what the model is, how to load it, the privacy card and what it covers."""
    private = metadata.get("private") == "true"
    parts = [
        _front_matter(license),
        f"# dpcap image encoder ({cfg.name})\n",
        _banner(metadata) if not private else "",
        _description(cfg, private, metadata),
        _usage(cfg),
        _card_table(metadata),
        _guarantee(metadata, private),
    ]
    return "\n".join(p for p in parts if p)


def _front_matter(license: str) -> str:
    tags = ["image-feature-extraction", "timm", "dpcap", "differential-privacy"]
    return "---\n" + f"license: {license}\nlibrary_name: timm\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"


def _banner(metadata: Mapping[str, str]) -> str:
    reasons = not_private_reasons(metadata) or ["the privacy card says private = false"]
    lines = "".join(f"> - {r}\n" for r in reasons)
    return (
        "> **⚠ NOT PRIVATE.** These weights carry NO differential-privacy guarantee, whatever the\n"
        "> epsilon below says:\n" + lines
    )


def _description(cfg: Any, private: bool, metadata: Mapping[str, str]) -> str:
    v = cfg.vision
    how = "with differentially private SGD (DP-Cap: per-sample clipping, Gaussian noise)" if private else "by SGD"
    start = "warm-started from public weights" if metadata.get("init_from") else "trained from scratch"
    weights = " These are the exponential moving average of the weights." if metadata.get("weights") == "ema" else ""
    return (
        f"A Vision Transformer image encoder (timm `VisionTransformer`: {v.layers} layers, width {v.width}, "
        f"{v.heads} heads, {v.patch_size}×{v.patch_size} patches, {v.image_size}×{v.image_size} px input) "
        f"{start}, as the image tower of an image-captioning model {how}.{weights} The text decoder "
        "is not included. Features: the mean of the final-normed patch tokens (CLS excluded), which is "
        "timm's pooled output here.\n"
    )


def _usage(cfg: Any) -> str:
    size = cfg.vision.image_size
    return (
        "## How to load\n\n"
        "```python\n"
        "import timm\n"
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()\n'
        "features = model(images)                   # (B, D) pooled features\n"
        "tokens = model.forward_features(images)    # (B, 1 + patches, D), CLS first\n\n"
        "from transformers import AutoModel\n"
        'model = AutoModel.from_pretrained("PATH/TO/THIS/FOLDER")   # TimmWrapperModel\n'
        "out = model(pixel_values=images)           # out.pooler_output, out.last_hidden_state\n"
        "```\n\n"
        f"Preprocessing as in training: RGB, centre crop to a square, bicubic resize to {size}×{size}, "
        f"scale to [0, 1], normalise with mean {tuple(cfg.image_mean)} and std {tuple(cfg.image_std)} "
        "(also in `config.json` → `pretrained_cfg`).\n"
    )


def _card_table(metadata: Mapping[str, str]) -> str:
    rows = [k for k in CARD_KEYS if k in metadata] + sorted(k for k in metadata if k not in CARD_KEYS)
    table = "".join(f"| {k} | {metadata[k] or '—'} |\n" for k in rows)
    return (
        "## Privacy card\n\n"
        "Also stored in the `model.safetensors` header metadata "
        "(`dpcap.export.read_privacy_card(folder)` or `safetensors.safe_open(...).metadata()`).\n\n"
        "| key | value |\n|---|---|\n" + table
    )


def _guarantee(metadata: Mapping[str, str], private: bool) -> str:
    if not private:
        return (
            "## What this means\n\nNOT PRIVATE: no differential-privacy claim can be made for these weights. "
            "Treat them like any model trained on the raw data.\n"
        )
    return (
        "## What this guarantee covers\n\n"
        f"The weights are ({metadata['epsilon']}, {metadata['delta']})-differentially private with respect to "
        "adding or removing one image–caption pair of the training set of "
        f"{metadata['num_samples']} samples ({metadata['sampling']} sampling at rate {metadata['sample_rate']}, "
        f"noise multiplier {metadata['sigma']}, clipping norm {metadata['max_grad_norm']}, {metadata['steps']} "
        f"steps, {metadata['accountant']} accountant). **Only the weights carry the guarantee**: training "
        "logs, loss curves, gradient-norm statistics and any hyper-parameter search run on the same data "
        "carry none.\n" + _public_note(metadata)
    )


def _public_note(metadata: Mapping[str, str]) -> str:
    """Public inputs are outside the guarantee: say which ones shaped these weights."""
    used = [f"public weights `{metadata['init_from']}` (warm start)"] if metadata.get("init_from") else []
    if metadata.get("public_data"):
        used.append(
            f"public image–caption data `{metadata['public_data']}` (gradients mixed in without clipping or noise)"
        )
    if not used:
        return ""
    return (
        "\nThe weights also depend on " + " and ".join(used) + ". The guarantee is about the private training "
        "set only; it says nothing about the public data, which is treated as already public.\n"
    )
