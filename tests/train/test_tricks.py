"""Seeds' tricks (issue 3): EMA, augmentation multiplicity, public warm start / pull, public mixing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpcap.config import load_config
from dpcap.data.reader import SampleReader, image_transform
from dpcap.errors import ConfigError, DataError
from dpcap.model import get_tokenizer
from dpcap.pipeline import load_run
from dpcap.privacy import Clipper
from dpcap.train.loop import _public_warm_start, build_model, train
from dpcap.train.reduce import LocalReducer
from dpcap.train.state import load_ema
from dpcap.train.step import example_losses, logical_step
from dpcap.train.tricks import StepTricks, load_public_weights, random_resized_flip
from tests.conftest import train_overrides
from tests.privacy.oracle import naive_clipped_sum

# One micro-batch of 8 per logical step keeps each tiny run short.
_SMALL = {"train.batch_size": 8, "train.micro_batch_size": 8}


def _config(shards, run_dir, **extra):
    return load_config(None, train_overrides(shards, run_dir, **{**_SMALL, **extra}))


def _checkpoint(run_dir, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / name)


def _last_state(run_dir) -> dict:
    last = (run_dir / "LAST").read_text().strip()
    return json.loads((run_dir / "checkpoints" / last / "state.json").read_text())


def _model_and_reader(shards, tmp_path):
    config = _config(shards, tmp_path / "unused")
    model = build_model(config)
    cfg = model.config
    tokenizer = get_tokenizer(config.model.size, context_length=config.model.context_length)
    reader = SampleReader(shards, image_transform(model.image_size, cfg.image_mean, cfg.image_std), tokenizer)
    return model.train(), reader


def _assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- 1. EMA


@pytest.mark.slow
def test_ema_equals_hand_computed_average_and_resumes_exactly(tiny_shards, tmp_path):
    extra = {"train.steps": 3, "train.ema_decay": 0.6, "train.keep_checkpoints": 5}
    config = _config(tiny_shards, tmp_path / "a", **extra)
    train(config)
    expected = {k: v.clone() for k, v in build_model(config).state_dict().items()}  # e_0 = θ_0
    for step in (1, 2, 3):
        weights = _checkpoint(tmp_path / "a", step)
        expected = {k: 0.6 * expected[k] + 0.4 * weights[k] for k in expected}
    saved = _checkpoint(tmp_path / "a", 3, "ema.safetensors")
    _assert_same(saved, expected)
    assert any((saved[k] - weights[k]).abs().max() > 1e-4 for k in saved)  # not just the last weights
    # Resume: 2 steps, stop, then the last one — the EMA continues from the checkpointed one.
    train(_config(tiny_shards, tmp_path / "b", **extra), max_steps_this_run=2)
    train(_config(tiny_shards, tmp_path / "b", **extra))
    _assert_same(_checkpoint(tmp_path / "b", 3, "ema.safetensors"), saved)
    model, _, _ = load_run(tmp_path / "a", ema=True)
    _assert_same({k: v.detach() for k, v in model.state_dict().items()}, saved, atol=0)
    with pytest.raises(DataError, match="ema"):  # a checkpoint without EMA says so
        load_ema(tmp_path)


def test_ema_decay_is_validated(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        _config(tiny_shards, tmp_path, **{"train.ema_decay": 1.0})


# ---------------------------------------------------------------- 2. augmentation multiplicity


def test_multiplicity_clips_the_gradient_of_each_examples_mean_over_views(tiny_shards, tmp_path):
    model, reader = _model_and_reader(tiny_shards, tmp_path)
    batch = reader.read([0, 9, 17, 30])
    first, second = (random_resized_flip(batch.images, torch.Generator().manual_seed(3)) for _ in range(2))
    generator = torch.Generator().manual_seed(3)
    view_a, view_b = random_resized_flip(batch.images, generator), random_resized_flip(batch.images, generator)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # reproducible from the generator alone
    assert (view_a - batch.images).abs().max() > 0.1 and (view_a - view_b).abs().max() > 0.1

    def mean_over_views(a, b, tokens):
        return (model.per_sample_loss(a, tokens) + model.per_sample_loss(b, tokens)) / 2

    inputs = [view_a, view_b, batch.tokens]
    _, norms = naive_clipped_sum(model, mean_over_views, inputs, max_grad_norm=float("inf"))
    clip = float(norms.median())  # some examples clipped, some not
    expected, expected_norms = naive_clipped_sum(model, mean_over_views, inputs, max_grad_norm=clip)

    clipper = Clipper(model, clip)
    model.zero_grad(set_to_none=True)
    losses = example_losses(
        model, batch, torch.device("cpu"), "fp32", multiplicity=2, generator=torch.Generator().manual_seed(3)
    )
    assert losses.shape == (len(batch),)
    got_norms = clipper.backward(losses)
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-4, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_multiplicity_changes_the_update_not_the_ledger(tiny_shards, tmp_path):
    one = train(_config(tiny_shards, tmp_path / "k1", **{"train.steps": 1}))
    two = train(_config(tiny_shards, tmp_path / "k2", **{"train.steps": 1, "train.augmentation_multiplicity": 2}))
    assert _last_state(tmp_path / "k1")["ledger"] == _last_state(tmp_path / "k2")["ledger"]
    assert one["epsilon"] == two["epsilon"] and one["sample_rate"] == two["sample_rate"]
    a, b = _checkpoint(tmp_path / "k1", 1), _checkpoint(tmp_path / "k2", 1)
    assert any((a[k] - b[k]).abs().max() > 1e-6 for k in a)


# ---------------------------------------------------------------- 3. public warm start and pull


def _public_file(shards, tmp_path) -> tuple:
    """A 'public' checkpoint: the same architecture initialised with another seed."""
    public = build_model(_config(shards, tmp_path / "p", **{"model.seed": 5})).state_dict()
    path = tmp_path / "public.safetensors"
    save_file({k: v.contiguous() for k, v in public.items()}, path)
    return path, public


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k].float() - b[k].float()).pow(2).sum() for k in a).sqrt())


def test_warm_start_loads_the_public_weights_strictly(tiny_shards, tmp_path):
    path, public = _public_file(tiny_shards, tmp_path)
    config = _config(tiny_shards, tmp_path / "run", **{"model.init_from": str(path)})
    model = build_model(config)
    anchors = _public_warm_start(config, model)
    _assert_same({k: v.detach() for k, v in model.state_dict().items()}, public, atol=0)
    assert len(anchors) == len([p for p in model.parameters() if p.requires_grad])
    broken = dict(public)
    broken.pop(next(iter(broken)))
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(DataError, match="does not match"):
        load_public_weights(str(tmp_path / "broken.safetensors"), model)
    with pytest.raises(ConfigError, match="init_from"):
        load_public_weights(str(tmp_path / "missing.safetensors"), model)
    with pytest.raises(ConfigError, match="public_pull"):
        _config(tiny_shards, tmp_path / "run", **{"train.public_pull": 1.0})


@pytest.mark.slow
def test_public_pull_keeps_weights_closer_to_the_public_ones(tiny_shards, tmp_path):
    path, public = _public_file(tiny_shards, tmp_path)
    extra = {"model.init_from": str(path), "train.steps": 3, "train.lr": 1e-2, "train.warmup_steps": 0}
    train(_config(tiny_shards, tmp_path / "free", **extra))
    train(_config(tiny_shards, tmp_path / "pulled", **extra, **{"train.public_pull": 100.0}))
    free, pulled = (
        _distance(_checkpoint(tmp_path / "free", 3), public),
        _distance(_checkpoint(tmp_path / "pulled", 3), public),
    )
    assert 0 < pulled < 0.8 * free


# ---------------------------------------------------------------- 4. public + private mixing


class _Recorder:
    """An optimizer stand-in that keeps the gradients it is asked to apply."""

    def __init__(self, params) -> None:
        self.params, self.grads = list(params), None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]


def test_public_weight_one_feeds_exactly_the_public_mean_gradient(tiny_shards, tmp_path):
    model, reader = _model_and_reader(tiny_shards, tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    public = reader.read([1, 2, 3, 40])
    expected = [torch.zeros_like(p) for p in params]  # oracle: one example at a time, no clipping
    for j in range(len(public)):
        loss = model.per_sample_loss(public.images[j : j + 1], public.tokens[j : j + 1]).sum()
        for total, g in zip(expected, torch.autograd.grad(loss, params)):
            total += g / len(public)
    clipper = Clipper(model, 1.0)
    optimizer = _Recorder(params)
    logical_step(
        model,
        [reader.read([0, 7, 12])],
        clipper=clipper,
        optimizer=optimizer,
        reducer=LocalReducer(),
        noise_std=1e4,
        generator=torch.Generator().manual_seed(0),
        expected_batch_size=8.0,
        device=torch.device("cpu"),
        tricks=StepTricks(public_batch=public, public_weight=1.0),
    )
    for got, want in zip(optimizer.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not clipper._captures  # the public forward left no activations behind


@pytest.mark.slow
def test_public_mixing_weight_zero_is_dp_only_and_never_changes_the_ledger(tiny_shards, tmp_path):
    base = {"train.steps": 2}
    public = {"data.public_shards": str(tiny_shards), "train.public_batch_size": 4}
    dp = train(_config(tiny_shards, tmp_path / "dp", **base))
    zero = train(_config(tiny_shards, tmp_path / "w0", **base, **public, **{"train.public_weight": 0.0}))
    half = train(_config(tiny_shards, tmp_path / "w5", **base, **public, **{"train.public_weight": 0.5}))
    _assert_same(_checkpoint(tmp_path / "w0", 2), _checkpoint(tmp_path / "dp", 2), atol=0)
    mixed, only = _checkpoint(tmp_path / "w5", 2), _checkpoint(tmp_path / "dp", 2)
    assert any((mixed[k] - only[k]).abs().max() > 1e-6 for k in mixed)
    ledgers = [_last_state(tmp_path / name)["ledger"] for name in ("dp", "w0", "w5")]
    assert ledgers[0] == ledgers[1] == ledgers[2]
    assert dp["epsilon"] == zero["epsilon"] == half["epsilon"] and dp["num_samples"] == half["num_samples"] == 48
    # The card discloses the public data (outside the guarantee); the DP-only run's card has none.
    assert half["public_data"] == str(tiny_shards) and half["public_weight"] == 0.5 and dp["public_data"] is None
    assert _last_state(tmp_path / "w5")["privacy"]["public_data"] == str(tiny_shards)
    with pytest.raises(ConfigError, match="public"):
        _config(tiny_shards, tmp_path / "x", **{"train.public_weight": 0.5})
