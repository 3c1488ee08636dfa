"""Library-level workflows the CLI calls: load a run, export it, probe an encoder, the demo.

Each function returns a JSON-ready dict; printing is the CLI's job.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dpcap.config import RunConfig, load_config
from dpcap.errors import ConfigError, DataError
from dpcap.model import create_captioner, get_tokenizer
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


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Export the run's encoder (timm/transformers folder) with its privacy card (`use_ema`: its EMA weights).

    A non-empty `out_dir` is refused unless `overwrite`."""
    from dpcap.export import export_encoder

    model, state, config = load_run(run_dir, ema=use_ema)
    card = dict(state.privacy) | {"weights": "ema" if use_ema else "last"}
    if config.privacy.insecure_noise_seed is not None or config.privacy.insecure_sampler_seed is not None:
        card["private"] = False
    out = export_encoder(model, out_dir, privacy_card=card, overwrite=overwrite)
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


def _features(model, data_dir: str, label: str, pool: str, **extraction: Any) -> tuple[torch.Tensor, list]:
    """Features + labels of a shard folder or in-place index (label = a metadata field, or ``cls`` for
    WebDataset ``.cls`` members) or of an ImageFolder tree (label = folder). ``extraction``: as
    `_probe_features`."""
    data = _probe_features(model, data_dir, label, pool, **extraction)
    return data["features"], data["labels"]


def probe_encoder(
    encoder,
    *,
    train_dir: str,
    test_dir: str,
    val_dir: str | None = None,
    label: str | None = None,
    pool: str | None = None,
    protocol: str = "sweep",
    out: str | None = None,
    use_ema: bool = False,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    threads: int | None = None,
    l2_grid: tuple[float, ...] | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Linear probe of a frozen encoder: features of each split, one logistic-regression protocol.

    ``protocol="sweep"`` (default): L-BFGS logistic regression on standardised features, λ chosen
    on validation (``val_dir``, or 20% of train) over ``l2_grid`` (default `DEFAULT_L2_GRID`), refit
    on train + validation. ``protocol="dpcap"``: DP-Cap's released recipe (`dpcap_probe`): features
    row-centred and L2-normalised, λ = 0.0025/n, no intercept, one fit on train, no validation.
    ``pool`` defaults to ``"mean"`` (sweep) or ``"mean_all"`` (dpcap: every token, CLS included).
    ``label``: the metadata field of a shard folder; None takes the data's own label (an ImageFolder
    tree's folder names, a WebDataset index's label key or ``.cls``); a built shard folder needs one.

    The report records the encoder (and its run's privacy card summary), each split's path and
    size, protocol, pool, the λ grid and the chosen λ, seconds per stage and ``warnings`` (the
    chosen λ at the edge of the grid; train and test the same data; a label given for an ImageFolder
    tree, where it is ignored; ``val_dir`` given to the dpcap protocol). With ``out`` the report
    JSON goes there and a confusion-matrix PNG next to it, titled with ``name`` (default: the encoder
    spec), the protocol and the test top-1. ``log`` receives a line as each split's features start
    and end (count, dimension, seconds) and one with the result; ``progress`` shows a bar over each
    split's images and one over the fits; ``threads`` sets torch's CPU threads for the extraction
    and every fit (restored after). ``cache_dir``, ``batch_size``, ``workers``, ``device``: the
    feature extraction's (see `_probe_features`).
    """
    from tqdm.auto import tqdm

    from dpcap.eval.probe import (
        DEFAULT_L2_GRID,
        PROTOCOLS,
        confusion_matrix,
        dpcap_probe,
        l2_edge_warning,
        linear_probe,
        save_confusion_png,
        torch_threads,
    )
    from dpcap.train.world import detect_world

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown probe protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    pool = pool or ("mean_all" if protocol == "dpcap" else "mean")
    grid = tuple(float(v) for v in (l2_grid if l2_grid is not None else DEFAULT_L2_GRID))
    started_all = time.perf_counter()
    model, privacy = _probe_model(encoder, use_ema)
    name = name or (str(encoder) if isinstance(encoder, (str, os.PathLike)) else type(encoder).__name__)
    warnings: list[str] = []
    if protocol == "dpcap" and val_dir is not None:
        warnings.append(
            f"--val {val_dir} is not used: the dpcap protocol trains on --train and reports --test (no λ selection)"
        )
        val_dir = None
    dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
    features: dict[str, dict[str, Any]] = {}
    data: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    label_ignored = False
    with torch_threads(threads):
        for split, data_dir in dirs.items():
            if data_dir is None:
                continue
            split_label, kind = _probe_label(data_dir, label)
            if log is not None:
                log(f"{name}: {split} features from {data_dir} ({kind}) …")
            started = time.perf_counter()
            features[split] = _probe_features(
                model,
                data_dir,
                split_label,
                pool,
                cache_dir=cache_dir,
                batch_size=batch_size,
                workers=workers,
                device=device,
                progress=progress,
                desc=f"{split} features",
            )
            seconds[f"features_{split}"] = round(time.perf_counter() - started, 3)
            x = features[split]["features"]
            source = features[split].get("label_source")
            data[split] = {
                "path": str(data_dir),
                "kind": kind,
                "label": split_label if kind != "imagefolder" else f"label file {source}" if source else "folder name",
                "num_samples": int(x.shape[0]),
            }
            if kind == "imagefolder" and features[split].get("layout"):
                data[split]["layout"] = features[split]["layout"]
            if kind == "imagefolder" and label is not None and not label_ignored:
                label_ignored = True
                origin = f"its labels come from {source}" if source else "its class is the sub-folder name"
                warnings.append(
                    f"--label {label!r} is ignored for the image folder {data_dir}: {origin} "
                    "(leave --label out for image folders)"
                )
            if log is not None:
                log(f"{name}: {split} features {x.shape[0]} × {x.shape[1]} ({seconds[f'features_{split}']:.1f} s)")
        for first in ("train", "val"):
            if first in features:
                same = _same_data_warning(first, dirs[first], features[first], test_dir, features["test"])
                if same:
                    warnings.append(same)
        world = detect_world()
        if world.distributed and world.rank != 0:
            # Every rank extracted its share (gathered through the cache); one fit is enough.
            seconds["total"] = round(time.perf_counter() - started_all, 3)
            return {"rank": world.rank, "fit": "on rank 0", "data": data, "seconds": seconds}
        fit_on = fit_device(device, world)
        x_train, y_train = features["train"]["features"].to(fit_on), features["train"]["labels"]
        x_test, y_test = features["test"]["features"].to(fit_on), features["test"]["labels"]
        started = time.perf_counter()
        fits = 1 if protocol == "dpcap" else len(grid) + 1
        bar = tqdm(
            total=fits,
            desc=f"probe {name} ({protocol})",
            unit="fit",
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not progress,
        )

        def on_fit(l2: float, val_top1: float | None) -> None:
            bar.update(1)
            bar.set_postfix(l2=f"{l2:.0e}", val="refit" if val_top1 is None else f"{val_top1:.3f}")

        try:
            if protocol == "dpcap":
                result = dpcap_probe(x_train, y_train, x_test, y_test, return_predictions=bool(out), on_fit=on_fit)
                grid = (result["l2"],)
            else:
                x_val = features["val"]["features"].to(fit_on) if "val" in features else None
                y_val = features["val"]["labels"] if "val" in features else None
                result = linear_probe(
                    x_train,
                    y_train,
                    x_test,
                    y_test,
                    x_val=x_val,
                    y_val=y_val,
                    l2_grid=grid,
                    return_predictions=bool(out),
                    on_fit=on_fit,
                )
        finally:
            bar.close()
        seconds["fit"] = round(time.perf_counter() - started, 3)
    if protocol == "sweep":
        edge = l2_edge_warning(result["l2"], grid)
        if edge:
            warnings.append(edge)
    seconds["total"] = round(time.perf_counter() - started_all, 3)
    report = {
        "encoder": str(encoder) if isinstance(encoder, (str, os.PathLike)) else type(encoder).__name__,
        "name": name,
        "privacy": privacy,
        "protocol": protocol,
        "pool": pool,
        "label": data["train"]["label"],
        "data": data,
        "top1": result["top1"],
        "l2": result["l2"],
        "l2_grid": list(grid),
        **{k: v for k, v in result.items() if k not in ("top1", "l2")},
        "threads": threads,
        "fit_device": str(fit_on),
        "seconds": seconds,
        "warnings": warnings,
    }
    names = {c: n for split in features.values() for c, n in (split.get("class_names") or {}).items()}
    if names:  # ImageNet synset ids → their display names (LOC_synset_mapping.txt or the devkit)
        report["class_names"] = {c: names[c] for c in report["classes"] if c in names}
    if log is not None:
        val = f", val {report['val_top1']:.1%}" if report.get("val_top1") is not None else ""
        log(
            f"{name}: test top-1 {report['top1']:.1%} ({protocol}; λ = {report['l2']:.2g}{val}; "
            f"{fits} fit{'s' if fits > 1 else ''} in {seconds['fit']:.1f} s)"
        )
    if out:
        predictions = report.pop("predictions")
        classes = report["classes"]
        ids = {c: i for i, c in enumerate(classes)}
        known = [(ids[t], ids[p]) for t, p in zip(y_test, predictions) if t in ids]
        cm = confusion_matrix([t for t, _ in known], [p for _, p in known], len(classes))
        title = (
            f"{name}: {protocol} linear probe, top-1 {report['top1']:.1%} "
            f"({report['label']}, {len(classes)} classes, pool {pool})"
        )
        names = report.get("class_names", {})
        labels = [f"{names[c]} ({c})" if c in names else str(c) for c in classes]
        save_confusion_png(cm, Path(out).with_suffix(".png"), labels, title=title, top_classes=20)
        _write_json(Path(out), report)
    report.pop("per_l2", None)
    return report


def fit_device(device: str | torch.device, world: Any = None) -> torch.device:
    """Where the probe's fits run: the extraction's device, so ``auto`` and ``cuda`` fit on this rank's
    GPU (an ImageNet-1K fit is 1.28M × D features; L-BFGS there is matmul-bound) and ``cpu`` on the CPU."""
    from dpcap.train.world import detect_world, device_for

    return device_for(world or detect_world(), str(device))


def _probe_model(encoder, use_ema: bool) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The encoder to probe and, for a run folder, a summary of its privacy card (else None)."""
    if isinstance(encoder, (str, os.PathLike)) and not str(encoder).startswith("random:"):
        model, state, config = load_run(encoder, ema=use_ema)
        card = dict(state.privacy)
        private = card.get("private")
        if config.privacy.insecure_noise_seed is not None or config.privacy.insecure_sampler_seed is not None:
            private = False  # as export_run: a fixed seed voids the guarantee
        summary = {key: card.get(key) for key in ("epsilon", "delta", "sigma", "steps")}
        return model, {**summary, "private": private, "step": state.step, "weights": "ema" if use_ema else "last"}
    return encoder_for_probe(encoder, use_ema=use_ema), None


def _probe_label(data_dir: str, label: str | None) -> tuple[str | None, str]:
    """(label key, kind) of a probe split: kind ``shards`` (built), ``index`` (WebDataset index) or
    ``imagefolder`` (label key None: the folder name). ``label=None`` takes the data's own label."""
    from dpcap.data.layout import WDS_INDEX_FILE, is_shard_folder

    if not is_shard_folder(data_dir):
        return None, "imagefolder"
    index = Path(data_dir) / WDS_INDEX_FILE
    kind = "index" if index.is_file() else "shards"
    if label is not None:
        return label, kind
    if kind == "index":
        try:
            key = json.loads(index.read_text()).get("label_key")
        except (OSError, ValueError) as err:
            raise DataError(f"{index}: unreadable index ({err})") from None
        return key or "cls", kind
    raise ConfigError(
        f"{data_dir} is a built shard folder: give --label FIELD, the sample metadata field holding the class "
        "(e.g. --label group)"
    )


def _probe_features(
    model,
    data_dir: str,
    label: str | None,
    pool: str,
    *,
    cache_dir: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = False,
    desc: str | None = None,
) -> dict[str, Any]:
    """The whole result (features, labels, ids) of a split, for the report's checks: batches of
    ``batch_size``, ``workers`` decoding processes, on ``device`` (``auto``: this rank's GPU, else the
    CPU; bf16 autocast on CUDA), cached in chunks under ``cache_dir`` (resumable; required, and
    shared, when run on several ranks), a bar over the images with ``progress``."""
    from dpcap.data.layout import is_shard_folder
    from dpcap.eval.features import imagefolder_features, labelled_features

    options = dict(
        pool=pool,
        batch_size=batch_size,
        num_workers=workers,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
        desc=desc,
    )
    if is_shard_folder(data_dir):
        return labelled_features(model, data_dir, label_key=label, **options)
    return imagefolder_features(model, data_dir, **options)


def _same_data_warning(first: str, first_dir: str, first_data: dict, test_dir: str, test_data: dict) -> str | None:
    """A warning when split ``first`` and test are the same data: the same resolved folder, a
    WebDataset index of the same tar files, or test features all identical to rows of ``first`` (a
    copied folder). Sample ids cannot tell: every build numbers its samples 0, 1, …"""
    a, b = Path(first_dir).resolve(), Path(test_dir).resolve()
    what = f"{first} and test are the same data"
    if a == b:
        return f"{what} ({b}): the test top-1 measures memorisation, not generalisation"
    tars_a, tars_b = _index_tars(a), _index_tars(b)
    if tars_a is not None and tars_a == tars_b:
        return f"{what}: {a} and {b} index the same {len(tars_a)} tar files"
    files_a, files_b = _image_files(a, first_data), _image_files(b, test_data)
    if files_a and files_a == files_b:
        return f"{what}: {a} and {b} hold the same {len(files_a)} image files"
    n = int(test_data["features"].shape[0])
    shared = _shared_rows(first_data["features"], test_data["features"])
    if n and shared == n:
        return f"{what}: every one of the {n} test samples has features identical to a {first} sample ({a}, {b})"
    if shared:
        return (
            f"{shared} of {n} test samples have features identical to a {first} sample: "
            f"duplicate images in {a} and {b}?"
        )
    return None


def _index_tars(root: Path) -> frozenset[str] | None:
    from dpcap.data.layout import WDS_INDEX_FILE

    index = root / WDS_INDEX_FILE
    if not index.is_file():
        return None
    try:
        shards = json.loads(index.read_text())["shards"]
        return frozenset(str(Path(s["path"]).resolve()) for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _image_files(root: Path, data: dict) -> frozenset[str] | None:
    """The resolved image paths of an image-folder split (``files``, relative to its root), if known."""
    files = data.get("files")
    return frozenset(str((root / f).resolve()) for f in files) if files else None


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many rows of ``b`` equal (bit for bit) some row of ``a``: 62-bit row hashes, then exact checks."""
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] != b.shape[1]:
        return 0
    keys_a, keys_b = _row_hashes(a), _row_hashes(b)
    order = torch.argsort(keys_a)
    sorted_a = keys_a[order]
    pos = torch.searchsorted(sorted_a, keys_b).clamp_max(sorted_a.numel() - 1)
    candidates = (sorted_a[pos] == keys_b).nonzero().flatten()
    if candidates.numel() == 0:
        return 0
    rows_a = a[order[pos[candidates]]].contiguous().view(torch.int32)
    rows_b = b[candidates].contiguous().view(torch.int32)
    return int((rows_a == rows_b).all(dim=1).sum())


_HASH_PRIME = (1 << 31) - 1


def _row_hashes(x: torch.Tensor) -> torch.Tensor:
    """(N,) int64: two polynomial hashes mod 2³¹−1 of each float32 row's bits, combined (exact integer
    arithmetic, so identical rows always hash alike)."""
    bits = x.float().contiguous().view(torch.int32)
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.randint(1, _HASH_PRIME, (2, bits.shape[1]), generator=gen, dtype=torch.int64)
    out = []
    for chunk in bits.split(max(1, (1 << 20) // max(1, bits.shape[1]))):
        values = chunk.long().remainder(_HASH_PRIME)
        h1 = (values * coeffs[0]).remainder(_HASH_PRIME).sum(dim=1).remainder(_HASH_PRIME)
        h2 = (values * coeffs[1]).remainder(_HASH_PRIME).sum(dim=1).remainder(_HASH_PRIME)
        out.append(h1 * _HASH_PRIME + h2)
    return torch.cat(out)


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
    threads: int | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """k-shot logistic-regression accuracy (mean ± std over seeds) of a frozen encoder.

    ``threads`` sets torch's CPU threads for the feature extraction and the fits (restored after).
    ``cache_dir``, ``batch_size``, ``workers``, ``device``, ``progress``: the feature extraction's
    (see `_probe_features`)."""
    from dpcap.eval.fewshot import few_shot
    from dpcap.eval.probe import torch_threads
    from dpcap.train.world import detect_world

    model = encoder_for_probe(encoder, use_ema=use_ema)
    with torch_threads(threads):
        extraction = dict(cache_dir=cache_dir, batch_size=batch_size, workers=workers, device=device)
        x_train, y_train = _features(
            model, train_dir, label, pool, progress=progress, desc="train features", **extraction
        )
        x_test, y_test = _features(model, test_dir, label, pool, progress=progress, desc="test features", **extraction)
        world = detect_world()
        if world.distributed and world.rank != 0:
            return {"rank": world.rank, "fit": "on rank 0"}  # the features are shared; one rank fits
        fit_on = fit_device(device, world)
        report = few_shot(x_train.to(fit_on), y_train, x_test.to(fit_on), y_test, shots=shots, seeds=seeds)
    report = {"label": label, "pool": pool, "fit_device": str(fit_on), **report}
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


DEMO_ENCODERS = (("dp", "DP"), ("nonprivate", "non-private"), ("random_init", "random init"))
"""The three encoders the demo probes, in report order: (report key, display name)."""

DEMO_CAPTION_SAMPLES = 8
"""Test images the demo captions (spread evenly over the test split's ids, so every run shows the same)."""


class _Stages:
    """Numbered stage messages on stderr ("[demo 2/8] DP training …", then its seconds) and their timings.

    Messages go through ``tqdm.write`` so that they never tear a progress bar, and to stderr so that
    stdout's last line stays the JSON object under ``--json``.
    """

    def __init__(self, total: int, prefix: str = "demo") -> None:
        self.total, self.prefix = total, prefix
        self.seconds: dict[str, float] = {}
        self._index = 0

    @contextmanager
    def __call__(self, key: str, title: str) -> Iterator[None]:
        self._index += 1
        tag = f"[{self.prefix} {self._index}/{self.total}]"
        self._write(f"{tag} {title} …")
        started = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - started, 1)
        self._write(f"{tag} {title}: {self.seconds[key]:.1f} s")

    def note(self, text: str) -> None:
        """An indented detail line of the current stage."""
        self._write(f"    {text}")

    @staticmethod
    def _write(text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
        sys.stderr.flush()


def run_demo(config_path: str, out_dir: str, *, overrides: list[str] = (), label: str = "subgroup") -> dict[str, Any]:
    """Emoji data → DP training → non-private training → export → linear probes of the DP, non-private and
    random-init encoders → greedy captions of a few test images, with the figures (captions.png,
    probe.png, probe/<encoder>.png) and report.json in ``out_dir``.

    Each stage is announced on stderr with its seconds (also in the report's ``stage_seconds``).
    """
    from dpcap.data.demo import build_emoji_dataset
    from dpcap.eval.captions import caption_samples, save_captions_png
    from dpcap.eval.probe import save_accuracy_bars_png
    from dpcap.train.loop import train

    out = Path(out_dir)
    started = time.perf_counter()
    base = load_config(config_path, [*overrides, "data.shards=_", "run_dir=_"])
    stages = _Stages(total=4 + len(DEMO_ENCODERS) + 1)
    data_dir = out / "data"
    with stages("data", "rendering the emoji data"):
        if (data_dir / "test" / "sizes.json").is_file():
            stages.note(f"already built in {data_dir}")
        else:
            built = build_emoji_dataset(data_dir, image_size=base.model.image_size or 64, overwrite=True)
            stages.note(", ".join(f"{split} {built[split]['written']}" for split in ("train", "val", "test")))
    shared = [*overrides, f"data.shards={data_dir / 'train'}"]
    budget = f"ε = {base.privacy.epsilon:g}" if base.privacy.epsilon is not None else f"σ = {base.privacy.sigma}"
    with stages("train_dp", f"DP training ({base.train.steps} steps, {budget})"):
        dp = train(load_config(config_path, [*shared, f"run_dir={out / 'dp'}"]))
    if not dp["done"]:
        raise ConfigError(f"the DP run stopped early at step {dp['step']} ({dp['stopped_by']})")
    nonprivate_overrides = ["privacy.sigma=0", "privacy.epsilon=null", *demo_nonprivate_train(base)]
    nonprivate_config = load_config(config_path, [*shared, *nonprivate_overrides, f"run_dir={out / 'nonprivate'}"])
    nonprivate_train = {k: getattr(nonprivate_config.train, k) for k in ("steps", "batch_size", "lr")}
    with stages("train_nonprivate", f"non-private training ({nonprivate_train['steps']} steps, σ = 0)"):
        train(nonprivate_config)
    with stages("export", "exporting the DP encoder"):
        export = export_run(out / "dp", out / "export")
    models = {"dp": load_run(out / "dp")[0], "nonprivate": load_run(out / "nonprivate")[0]}
    models["random_init"] = build_model(base).eval()
    probes = {}
    for name, title in DEMO_ENCODERS:
        with stages(f"probe_{name}", f"linear probe of the {title} encoder (features, then λ fits)"):
            probes[name] = probe_encoder(
                models[name],
                train_dir=str(data_dir / "train"),
                val_dir=str(data_dir / "val"),
                test_dir=str(data_dir / "test"),
                label=label,
                out=str(out / "probe" / f"{name}.json"),
                name=f"{title} encoder",
                log=stages.note,
                progress=base.log.progress,
            )
    epsilon = dp["epsilon"]
    eps_text = f"ε = {epsilon:.2f}" if epsilon is not None and math.isfinite(epsilon) else "ε = ∞"
    with stages("captions", f"greedy captions of {DEMO_CAPTION_SAMPLES} test images, and the figures"):
        # The run's own tokenizer (its vocabulary and context length) turns the token rows into text.
        tokenizer = get_tokenizer(base.model.size, **base.model.overrides())
        samples = caption_samples(
            {"dp": models["dp"], "nonprivate": models["nonprivate"]},
            data_dir / "test",
            count=DEMO_CAPTION_SAMPLES,
            tokenizer=tokenizer,
            image_key="codepoints",
        )
        captions_png = save_captions_png(
            samples,
            out / "captions.png",
            labels={"dp": f"DP ({eps_text})", "nonprivate": "non-private"},
            title=(
                f"greedy captions of test images (DP {dp['steps']} steps of {base.train.batch_size}, non-private "
                f"{nonprivate_train['steps']} of {nonprivate_train['batch_size']})"
            ),
        )
        probe_png = save_accuracy_bars_png(
            {title: probes[name]["top1"] for name, title in DEMO_ENCODERS},
            out / "probe.png",
            title=f"linear probe on {label} ({probes['dp']['num_classes']} classes); DP encoder at {eps_text}",
        )
    report = {
        "epsilon": epsilon,
        "delta": dp["delta"],
        "sigma": dp["sigma"],
        "steps": dp["steps"],
        "sample_rate": dp["sample_rate"],
        "num_samples": dp["num_samples"],
        "nonprivate_train": nonprivate_train,
        "probe": {name: probes[name]["top1"] for name in ("dp", "random_init", "nonprivate")},
        "probe_label": probes["dp"]["label"],
        "num_classes": probes["dp"]["num_classes"],
        "captions": [sample.to_json() for sample in samples],
        "figures": {
            "captions": str(captions_png),
            "probe": str(probe_png),
            "confusion": {name: str(out / "probe" / f"{name}.png") for name, _ in DEMO_ENCODERS},
        },
        "export": export["out"],
        "stage_seconds": stages.seconds,
        "seconds": round(time.perf_counter() - started, 1),
        "note": "only the weights carry the DP guarantee; logged losses and probe numbers are for the operator",
    }
    _write_json(out / "report.json", report)
    print(format_report(report))
    return report


def demo_nonprivate_train(base: RunConfig) -> list[str]:
    """The ``train.*`` overrides of the demo's non-private baseline: its own lr and batch
    (``demo.nonprivate_lr``, ``demo.nonprivate_batch_size``), the steps and warm-up scaled so that it
    sees ``demo.nonprivate_sample_multiple`` times as many samples as the DP run."""
    demo, train = base.demo, base.train
    overrides = [] if demo.nonprivate_lr is None else [f"train.lr={demo.nonprivate_lr}"]
    batch = train.batch_size if demo.nonprivate_batch_size is None else demo.nonprivate_batch_size
    if batch < 1:
        raise ConfigError(f"demo.nonprivate_batch_size must be >= 1, got {batch}")
    multiple = demo.nonprivate_sample_multiple
    if not multiple > 0:
        raise ConfigError(f"demo.nonprivate_sample_multiple must be > 0, got {multiple}")
    if batch != train.batch_size or multiple != 1:
        scale = train.batch_size / batch * multiple
        overrides += [
            f"train.batch_size={batch}",
            f"train.steps={max(1, round(train.steps * scale))}",
            f"train.warmup_steps={round(train.warmup_steps * scale)}",
            f"train.checkpoint_every={max(1, round(train.checkpoint_every * scale))}",
        ]
    return overrides


_STAGE_NAMES = {
    "data": "data",
    "train_dp": "DP training",
    "train_nonprivate": "non-private training",
    "export": "export",
    "probe_dp": "probe DP",
    "probe_nonprivate": "probe non-private",
    "probe_random_init": "probe random",
    "captions": "captions",
}

_PRINTED_CAPTIONS = 4
"""Samples the printed report shows (all of them are in report.json and captions.png)."""


def _short(text: Any, width: int = 72) -> str:
    """``text`` on one line of at most ``width`` characters (an untrained captioner rambles)."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(report: dict) -> str:
    """The short human-readable table `dpcap demo` prints: ε, the probe results, a few captions, timings.

    Keys added after the first reports (captions, figures, stage_seconds) are shown when present.
    """
    eps = report["epsilon"]
    lines = [
        f"DP-Cap demo: ε = {eps:.2f} (δ = {report['delta']:.2g}, σ = {report['sigma']:.3f}, {report['steps']} steps, "
        f"q = {report['sample_rate']:.3f}, N = {report['num_samples']})"
        if eps is not None and math.isfinite(eps)
        else "",
        f"linear probe top-1 on {report['probe_label']} ({report['num_classes']} classes):",
    ]
    baseline = report.get("nonprivate_train")
    if baseline:
        lines.insert(
            1,
            f"non-private baseline: σ = 0, {baseline['steps']} steps of batch {baseline['batch_size']}, "
            f"lr {baseline['lr']:g}",
        )
    for name, label in (("dp", "DP encoder"), ("nonprivate", "non-private encoder"), ("random_init", "random init")):
        lines.append(f"  {label:<22} {100 * report['probe'][name]:6.2f}%")
    captions = report.get("captions") or []
    if captions:
        lines.append(f"greedy captions of test images ({min(len(captions), _PRINTED_CAPTIONS)} of {len(captions)}):")
        for sample in captions[:_PRINTED_CAPTIONS]:
            image = str(sample.get("image", ""))
            for key, label in (("true", "true"), ("dp", "DP"), ("nonprivate", "non-private")):
                lines.append(f"  {image if key == 'true' else '':<{len(image)}}  {label:<11} {_short(sample.get(key))}")
    figures = report.get("figures") or {}
    if figures:
        lines.append(f"figures: {', '.join(str(figures[k]) for k in ('probe', 'captions') if k in figures)}")
    stage_seconds = report.get("stage_seconds") or {}
    if stage_seconds:
        timing = ", ".join(f"{_STAGE_NAMES.get(k, k)} {v:.0f} s" for k, v in stage_seconds.items())
        lines.append(f"time: {report.get('seconds', sum(stage_seconds.values())):.0f} s ({timing})")
    return "\n".join(line for line in lines if line)
