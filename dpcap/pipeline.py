"""Library-level workflows the CLI calls: load a run, export it, probe an encoder, the demo.

Each function returns a JSON-ready dict; printing is the CLI's job.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from dpcap.config import RunConfig, load_config
from dpcap.errors import ConfigError, DataError
from dpcap.model import create_captioner
from dpcap.train.loop import build_model
from dpcap.train.state import TrainState, latest_checkpoint, load_checkpoint, load_ema


def load_run(run_dir: str | os.PathLike, *, ema: bool = False) -> tuple[torch.nn.Module, TrainState, RunConfig]:
    """The captioner of a run's LAST checkpoint, its train state and resolved config.

    `ema=True` loads the EMA of the weights (train.ema_decay) instead: post-processing of the DP
    iterates, so it carries the same privacy card.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir} is not a run folder (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise DataError(f"{run_dir} has no checkpoint yet (no LAST)")
    model = build_model(config)
    state = load_checkpoint(checkpoint, model)
    if ema:
        model.load_state_dict(load_ema(checkpoint), strict=True)
    return model.eval(), state, config


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = False) -> dict[str, Any]:
    """Export the run's encoder (timm/transformers folder) with its privacy card (`use_ema`: its EMA weights)."""
    from dpcap.export import export_encoder

    model, state, config = load_run(run_dir, ema=use_ema)
    card = dict(state.privacy) | {"weights": "ema" if use_ema else "last"}
    if config.privacy.insecure_noise_seed is not None or config.privacy.insecure_sampler_seed is not None:
        card["private"] = False
    out = export_encoder(model, out_dir, privacy_card=card)
    return {"out": str(out), "step": state.step, **card}


def encoder_for_probe(spec: str | torch.nn.Module, *, use_ema: bool = False) -> torch.nn.Module:
    """`random:SIZE[:SEED]` (a randomly initialised captioner), a run folder (its LAST checkpoint, or
    its EMA), or a model already built (returned as it is)."""
    if isinstance(spec, torch.nn.Module):
        return spec
    if spec.startswith("random:"):
        if use_ema:
            raise ConfigError(f"{spec} is a random initialisation: it has no EMA weights (drop --ema)")
        _, size, *seed = spec.split(":")
        return create_captioner(size, seed=int(seed[0]) if seed else 0).eval()
    return load_run(spec, ema=use_ema)[0]


def _features(model, data_dir: str, label: str, pool: str) -> tuple[torch.Tensor, list]:
    """Features + labels of a shard folder (label = a metadata field) or an ImageFolder tree (label = folder)."""
    from dpcap.eval.features import imagefolder_features, labelled_features

    if (Path(data_dir) / "sizes.json").is_file():
        data = labelled_features(model, data_dir, label_key=label, pool=pool, batch_size=256)
    else:
        data = imagefolder_features(model, data_dir, pool=pool)
    return data["features"], data["labels"]


def probe_encoder(
    encoder,
    *,
    train_dir: str,
    test_dir: str,
    val_dir: str | None = None,
    label: str = "group",
    pool: str = "mean",
    out: str | None = None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """Linear probe (L-BFGS logistic regression, λ chosen on validation) of a frozen encoder."""
    from dpcap.eval.probe import confusion_matrix, linear_probe, save_confusion_png

    model = encoder_for_probe(encoder, use_ema=use_ema)
    x_train, y_train = _features(model, train_dir, label, pool)
    x_test, y_test = _features(model, test_dir, label, pool)
    x_val, y_val = _features(model, val_dir, label, pool) if val_dir else (None, None)
    report = linear_probe(x_train, y_train, x_test, y_test, x_val=x_val, y_val=y_val, return_predictions=bool(out))
    report = {"label": label, "pool": pool, **report}
    if out:
        predictions = report.pop("predictions")
        classes = report["classes"]
        ids = {c: i for i, c in enumerate(classes)}
        known = [(ids[t], ids[p]) for t, p in zip(y_test, predictions) if t in ids]
        cm = confusion_matrix([t for t, _ in known], [p for _, p in known], len(classes))
        save_confusion_png(cm, Path(out).with_suffix(".png"), [str(c) for c in classes])
        _write_json(Path(out), report)
    report.pop("per_l2", None)
    return report


def fewshot_encoder(
    encoder,
    *,
    train_dir: str,
    test_dir: str,
    label: str = "group",
    pool: str = "mean",
    shots=(1, 2, 5, 10),
    seeds=(0, 1, 2),
    out: str | None = None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """k-shot logistic-regression accuracy (mean ± std over seeds) of a frozen encoder."""
    from dpcap.eval.fewshot import few_shot

    model = encoder_for_probe(encoder, use_ema=use_ema)
    x_train, y_train = _features(model, train_dir, label, pool)
    x_test, y_test = _features(model, test_dir, label, pool)
    report = {"label": label, "pool": pool, **few_shot(x_train, y_train, x_test, y_test, shots=shots, seeds=seeds)}
    if out:
        _write_json(Path(out), report)
    return report


def zeroshot_encoder(
    run_dir: str,
    *,
    data_dir: str,
    label: str = "subgroup",
    template: str = "an emoji of {}",
    out: str | None = None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-1 by caption likelihood: each class is scored by log p(template(label) | image)."""
    from dpcap.eval.zeroshot import zero_shot_accuracy

    if "{}" not in template:
        raise ConfigError(f"--template must contain '{{}}' where the class name goes, got {template!r}")
    model = encoder_for_probe(run_dir, use_ema=use_ema)
    report = zero_shot_accuracy(model, data_dir, label_key=label, prompts_for=lambda name: [template.format(name)])
    report = {"label": label, "template": template, **report}
    if out:
        _write_json(Path(out), report)
    for bulky in ("predictions", "labels", "ids", "per_class_top1"):
        report.pop(bulky, None)
    return report


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_demo(config_path: str, out_dir: str, *, overrides: list[str] = (), label: str = "subgroup") -> dict[str, Any]:
    """Emoji data → DP training → export → linear probes of DP, non-private and random-init encoders."""
    from dpcap.data.demo import build_emoji_dataset
    from dpcap.train.loop import train

    out = Path(out_dir)
    started = time.perf_counter()
    base = load_config(config_path, [*overrides, "data.shards=_", "run_dir=_"])
    data_dir = out / "data"
    if not (data_dir / "test" / "sizes.json").is_file():
        build_emoji_dataset(data_dir, image_size=base.model.image_size or 64, overwrite=True)
    shared = [*overrides, f"data.shards={data_dir / 'train'}"]
    dp = train(load_config(config_path, [*shared, f"run_dir={out / 'dp'}"]))
    if not dp["done"]:
        raise ConfigError(f"the DP run stopped early at step {dp['step']} ({dp['stopped_by']})")
    nonprivate_overrides = ["privacy.sigma=0", "privacy.epsilon=null"]
    train(load_config(config_path, [*shared, *nonprivate_overrides, f"run_dir={out / 'nonprivate'}"]))
    export = export_run(out / "dp", out / "export")
    probes = {}
    for name, encoder in (("dp", str(out / "dp")), ("nonprivate", str(out / "nonprivate")), ("random_init", None)):
        model = encoder_for_probe(encoder) if encoder else build_model(base).eval()
        probes[name] = probe_encoder(
            model,
            train_dir=str(data_dir / "train"),
            val_dir=str(data_dir / "val"),
            test_dir=str(data_dir / "test"),
            label=label,
            out=str(out / "probe" / f"{name}.json"),
        )
    report = {
        "epsilon": dp["epsilon"],
        "delta": dp["delta"],
        "sigma": dp["sigma"],
        "steps": dp["steps"],
        "sample_rate": dp["sample_rate"],
        "num_samples": dp["num_samples"],
        "probe": {name: probes[name]["top1"] for name in ("dp", "random_init", "nonprivate")},
        "probe_label": probes["dp"]["label"],
        "num_classes": probes["dp"]["num_classes"],
        "export": export["out"],
        "seconds": round(time.perf_counter() - started, 1),
        "note": "only the weights carry the DP guarantee; logged losses and probe numbers are for the operator",
    }
    _write_json(out / "report.json", report)
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    eps = report["epsilon"]
    lines = [
        f"DP-Cap demo: ε = {eps:.2f} (δ = {report['delta']:.2g}, σ = {report['sigma']:.3f}, {report['steps']} steps, "
        f"q = {report['sample_rate']:.3f}, N = {report['num_samples']})"
        if eps is not None and math.isfinite(eps)
        else "",
        f"linear probe top-1 on {report['probe_label']} ({report['num_classes']} classes):",
    ]
    for name, label in (("dp", "DP encoder"), ("nonprivate", "non-private encoder"), ("random_init", "random init")):
        lines.append(f"  {label:<22} {100 * report['probe'][name]:6.2f}%")
    return "\n".join(line for line in lines if line)
