"""Strict configs: unknown keys, wrong types and impossible values are errors naming the key."""

from __future__ import annotations

import pytest

from dpcap.config import load_config
from dpcap.errors import ConfigError
from dpcap.train.loop import build_model, lr_at
from tests.conftest import TINY_MODEL

BASE = ["data.shards=x", "privacy.sigma=1"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=3.5", "train.steps"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.precision=fp8", "train.precision"),
        ("privacy.delta=2", "privacy.delta"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.clip_step_memory_mib=-1", "train.clip_step_memory_mib"),
        ("train.clip_layer_memory_mib=.nan", "train.clip_layer_memory_mib"),
        ("model=3", "model"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [*BASE, override])


def test_types_are_coerced_only_when_lossless():
    config = load_config(None, [*BASE, "train.lr=1", "train.betas=[0.8, 0.99]", "model.freeze=[decoder.head]"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.betas == (0.8, 0.99) and config.model.freeze == ["decoder.head"]


def test_freeze_prefixes_freeze_and_must_match():
    config = load_config(None, [*BASE, *TINY_MODEL, "model.freeze=[decoder.head, decoder.token_embedding]"])
    model = build_model(config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"decoder.head.weight", "decoder.head.bias", "decoder.token_embedding.weight"}
    with pytest.raises(ConfigError, match="decoder.nothing"):
        build_model(load_config(None, [*BASE, *TINY_MODEL, "model.freeze=[decoder.nothing]"]))


def test_learning_rate_schedule():
    config = load_config(
        None, [*BASE, "train.steps=10", "train.warmup_steps=2", "train.lr=1.0", "train.min_lr_ratio=0.1"]
    )
    rates = [lr_at(step, config) for step in range(10)]
    assert rates[:2] == [0.5, 1.0] and rates[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] > 0.1


def test_clipper_memory_budgets_come_from_the_run_config():
    """The defaults are the Clipper's own; the keys reach the Clipper the training loop builds, in bytes."""
    from torch import nn

    from dpcap.privacy.layers.base import DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_STEP_MEMORY_BUDGET_BYTES
    from dpcap.train.loop import clipper_for

    default = load_config(None, BASE).train
    clipper = clipper_for(nn.Linear(3, 2), 1.0, default)
    assert clipper.memory_budget_bytes == DEFAULT_MEMORY_BUDGET_BYTES
    assert clipper.step_memory_budget_bytes == DEFAULT_STEP_MEMORY_BUDGET_BYTES
    tuned = load_config(None, [*BASE, "train.clip_layer_memory_mib=0.5", "train.clip_step_memory_mib=0"]).train
    clipper = clipper_for(nn.Linear(3, 2), 1.0, tuned)
    assert (clipper.memory_budget_bytes, clipper.step_memory_budget_bytes) == (512 * 1024, 0)
