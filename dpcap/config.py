"""Run configuration: dataclasses are the schema, YAML files are data, `key=value` overrides.

Strict like big_vision's locked configs: an unknown key, a wrong type or an impossible value is a
ConfigError naming the key (and the file), never silently ignored. The resolved config is written
into the run folder as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpcap.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class DataConfig:
    shards: str = ""  # a folder written by `dpcap data build` (sizes.json + shard-*.tar + *.idx)
    num_workers: int = 0  # DataLoader workers prefetching micro-batches
    # Public image-caption shards mixed into every step without clipping or noise (train.public_*);
    # they must really be public: they are outside N and q and carry no guarantee.
    public_shards: str | None = None


@dataclass
class ModelConfig:
    size: str = "nano"  # a name from dpcap.model.list_sizes()
    seed: int = 0  # initialisation seed (public: the initial weights carry no private data)
    image_size: int | None = None  # None keeps the size's default
    patch_size: int | None = None
    vision_width: int | None = None
    vision_layers: int | None = None
    vision_heads: int | None = None
    text_width: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    context_length: int | None = None
    # Caption vocabulary: "clip" (open_clip's 49,408 BPE ids, the default), "clip16k" (its first 16,384 ids
    # + one unknown) or "unicode" (the tokens of Unicode's character names; see dpcap/data/vocab.py).
    vocab: str | None = None
    bias: bool | None = None
    # Parameters whose names start with one of these prefixes stay at their (public) initial values:
    # no gradient, no noise, not in the per-sample norm. E.g. ["decoder.token_embedding", "decoder.head"].
    freeze: list[str] = field(default_factory=list)
    # Public warm start: a model.safetensors (e.g. a run trained on public data) loaded before DP training.
    init_from: str | None = None

    def overrides(self) -> dict[str, Any]:
        skip = {"size", "seed", "freeze", "init_from"}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }


@dataclass
class TrainConfig:
    steps: int = 100  # logical (noisy) steps
    batch_size: int = 256  # expected logical batch qN (Poisson: each sample included w.p. q = batch_size / N)
    micro_batch_size: int = 64  # physical batch per process; the logical batch is accumulated
    lr: float = 1e-3
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr·min_lr_ratio
    precision: Literal["fp32", "bf16"] = "fp32"
    # Activation checkpointing of every encoder and decoder block (non-reentrant): less activation memory
    # for one more forward through the blocks in the backward; the same gradients, private or not.
    grad_checkpointing: bool = False
    # The per-sample clipper's memory for faster exact branches (see dpcap/privacy/layers/linear.py): scratch
    # one layer may use, and what the layers of one micro-batch may hold together until the clipped sums.
    # The defaults are the Clipper's; larger values trade memory for speed, 0 takes the smallest branches.
    clip_layer_memory_mib: float = 256.0
    clip_step_memory_mib: float = 1024.0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    checkpoint_every: int = 50  # logical steps; the last step is always checkpointed
    keep_checkpoints: int = 2
    log_every: int = 1
    backend: Literal["ddp", "deepspeed"] = "ddp"  # multi-process engine: torch.distributed or DeepSpeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2 (train.backend=deepspeed only)
    # Tricks (De et al. 2022; Sander et al. 2023), all off by default. Each is post-processing of the DP
    # update or internal to the per-example function, so none changes the privacy accounting.
    ema_decay: float | None = None  # keep an EMA of the weights for evaluation (ema.safetensors)
    augmentation_multiplicity: int = 1  # K: each example's loss is averaged over K augmented views before clipping
    public_pull: float = 0.0  # λ: add λ·(θ − θ_public) to the update (needs model.init_from)
    public_batch_size: int = 0  # public samples drawn per logical step (needs data.public_shards)
    public_weight: float = 0.0  # w: update = (1 − w)·DP update + w·public mean gradient


@dataclass
class PrivacyConfig:
    max_grad_norm: float = 1.0  # C
    sigma: float | None = None  # noise multiplier; 0 = non-private baseline; None = calibrate from epsilon
    epsilon: float | None = None  # the budget; training never steps past it
    delta: float | None = None  # None = 1/N
    accountant: Literal["prv", "rdp"] = "prv"
    insecure_noise_seed: int | None = None  # tests only: the run is marked NOT PRIVATE
    insecure_sampler_seed: int | None = None  # tests only: public batch membership voids amplification


@dataclass
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "dpcap"
    progress: bool = True


@dataclass
class DemoConfig:
    """Read by `dpcap demo` only (training ignores it)."""

    # The non-private baseline's own learning rate (None: the DP run's). Each side is tuned on its own:
    # without noise a smaller step learns better features; DP's noisy steps need a larger one.
    nonprivate_lr: float | None = None
    # The baseline's own logical batch (None: the DP run's). Its step count is scaled so that it sees as
    # many samples as the DP run (steps × batch, warm-up alike; times nonprivate_sample_multiple below):
    # the same compute, at the small batches that suit non-private training, where DP needs large ones
    # (DP-Cap's main lesson).
    nonprivate_batch_size: int | None = None
    # How many times the DP run's samples the baseline sees (its steps and warm-up scale with it). At 1 the
    # two runs have the same compute; above 1 the baseline is a stronger reference than the DP run's budget.
    nonprivate_sample_multiple: float = 1.0


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {annotation}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "3e-3" (no dot) as a string
    if annotation in (int, float, str, bool) and (type(value) is annotation):
        return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def from_dict(schema: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `schema` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under '{prefix or '.'}': {sorted(names)})"
        )
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(annotation, value, f"{prefix}{name}.")
        else:
            values[name] = _convert(value, annotation, f"{prefix}{name}")
    return schema(**values)


def to_dict(config: Any) -> dict:
    """A plain, YAML-ready dict (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) onto a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
    data = apply_overrides(data, list(overrides))
    try:
        config = from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    t, p = config.train, config.privacy
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.micro_batch_size": t.micro_batch_size}
    positive |= {"train.checkpoint_every": t.checkpoint_every, "privacy.max_grad_norm": p.max_grad_norm}
    positive |= {"train.keep_checkpoints": t.keep_checkpoints, "train.log_every": t.log_every}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    # `not (a < x < b)` rather than `x <= a`: NaN fails every comparison and must be refused too.
    for key, value in {"train.lr": t.lr, "privacy.max_grad_norm": p.max_grad_norm}.items():
        if not 0 < value < math.inf:
            raise ConfigError(f"{key} must be finite and > 0, got {value}")
    for key, value in {"train.clip_layer_memory_mib": t.clip_layer_memory_mib,
                       "train.clip_step_memory_mib": t.clip_step_memory_mib}.items():  # fmt: skip
        if not 0 <= value <= math.inf:
            raise ConfigError(f"{key} must be ≥ 0, got {value}")
    if not 0 <= t.weight_decay < math.inf:
        raise ConfigError(f"train.weight_decay must be finite and ≥ 0, got {t.weight_decay}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be ≥ 0, got {t.warmup_steps}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    if t.zero_stage not in (0, 1, 2):  # ZeRO-3 would partition the very weights the clipper reads
        raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {t.zero_stage!r}")
    if t.zero_stage and t.backend != "deepspeed":
        raise ConfigError(f"train.zero_stage={t.zero_stage} needs train.backend=deepspeed")
    _validate_tricks(config)
    if p.sigma is None and p.epsilon is None:
        raise ConfigError("set privacy.sigma (0 = non-private) or privacy.epsilon (σ is then calibrated)")
    if p.sigma is not None and not 0 <= p.sigma < math.inf:  # also refuses NaN
        raise ConfigError(f"privacy.sigma must be finite and ≥ 0, got {p.sigma}")
    if p.epsilon is not None and not 0 < p.epsilon < math.inf:
        # ε = ∞ would calibrate σ = 0 without saying so: a non-private run is asked for with privacy.sigma=0.
        raise ConfigError(
            f"privacy.epsilon must be finite and > 0, got {p.epsilon} (for a non-private baseline set "
            "privacy.sigma=0 and privacy.epsilon=null)"
        )
    if p.delta is not None and not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if not config.data.shards:
        raise ConfigError("data.shards is required (a folder written by `dpcap data build`)")


def _validate_tricks(config: RunConfig) -> None:
    t = config.train
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
    if t.augmentation_multiplicity < 1:
        raise ConfigError(f"train.augmentation_multiplicity must be ≥ 1, got {t.augmentation_multiplicity}")
    if not 0 <= t.public_pull < math.inf or t.public_batch_size < 0 or not 0 <= t.public_weight <= 1:
        raise ConfigError("train.public_pull and train.public_batch_size must be ≥ 0, train.public_weight in [0, 1]")
    if t.public_pull > 0 and not config.model.init_from:
        raise ConfigError("train.public_pull > 0 needs model.init_from (the public weights to pull toward)")
    public = bool(config.data.public_shards)
    if public != (t.public_batch_size > 0) or (t.public_weight > 0 and not public):
        raise ConfigError("data.public_shards, train.public_batch_size > 0 and train.public_weight go together")
    if t.backend == "deepspeed" and (public or t.public_pull > 0):
        raise ConfigError("public mixing / train.public_pull are not supported with train.backend=deepspeed")


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
