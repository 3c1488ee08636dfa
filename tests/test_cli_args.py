"""Argument order: options, `--json` and KEY=VALUE overrides may come in any order.

The library functions the commands call are replaced by fakes that record their arguments, so
these tests check only what reaches them (no training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpcap.cli import main, parse_args
from dpcap.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo-cpu.yaml")
AUDIT_CONFIG = str(REPO / "configs" / "audit-tiny.yaml")


@pytest.fixture()
def trained(monkeypatch) -> list:
    """The configs `dpcap train` hands to dpcap.train.loop.train."""
    calls = []

    def fake_train(config, **kwargs):
        calls.append(config)
        return {"run_dir": config.run_dir, "step": config.train.steps, "done": True, "stopped_by": None}

    monkeypatch.setattr("dpcap.train.loop.train", fake_train)
    return calls


@pytest.fixture()
def audited(monkeypatch) -> list:
    """The (config path, overrides, keyword arguments) `dpcap audit` hands to dpcap.eval.audit.run_audit."""
    calls = []

    def fake_run_audit(config_path, overrides=(), **kwargs):
        calls.append((config_path, list(overrides), kwargs))
        return {"auc": 0.5}

    monkeypatch.setattr("dpcap.eval.audit.run_audit", fake_run_audit)
    return calls


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["train", DEMO_CONFIG, "train.steps=3", "run_dir=R", "data.shards=S", "--json"],
        ["train", DEMO_CONFIG, "--json", "train.steps=3", "run_dir=R", "data.shards=S"],
        ["train", "--json", DEMO_CONFIG, "train.steps=3", "run_dir=R", "data.shards=S"],
        ["train", DEMO_CONFIG, "train.steps=3", "--json", "run_dir=R", "data.shards=S"],
        ["--json", "train", DEMO_CONFIG, "train.steps=3", "run_dir=R", "data.shards=S"],
    ],
)
def test_train_overrides_and_json_in_any_order(capsys, trained, argv):
    assert main(argv) == 0
    (config,) = trained
    assert (config.train.steps, config.run_dir, config.data.shards) == (3, "R", "S")
    assert last_json(capsys)["step"] == 3


def test_train_resume_then_overrides(capsys, trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(DEMO_CONFIG, ["train.steps=5", "data.shards=S"]), run / "config.yaml")
    assert main(["train", "--resume", str(run), "train.steps=7", "--json", "train.lr=0.5"]) == 0
    (config,) = trained
    assert (config.run_dir, config.train.steps, config.train.lr, config.data.shards) == (str(run), 7, 0.5, "S")
    assert last_json(capsys)["run_dir"] == str(run)


@pytest.mark.parametrize(
    "argv",
    [
        # The form configs/audit-tiny.yaml's own comment shows: overrides after --out.
        ["audit", AUDIT_CONFIG, "--out", "runs/audit", "privacy.sigma=0", "privacy.epsilon=null"],
        ["audit", AUDIT_CONFIG, "privacy.sigma=0", "--out", "runs/audit", "privacy.epsilon=null", "--json"],
        ["audit", "--out", "runs/audit", AUDIT_CONFIG, "privacy.sigma=0", "--json", "privacy.epsilon=null"],
        ["audit", AUDIT_CONFIG, "privacy.sigma=0", "privacy.epsilon=null", "--out", "runs/audit"],
    ],
)
def test_audit_overrides_after_options_reach_the_config(capsys, audited, argv):
    assert main(argv) == 0
    ((config_path, overrides, kwargs),) = audited
    assert config_path == AUDIT_CONFIG and kwargs["out_dir"] == "runs/audit"
    assert overrides == ["privacy.sigma=0", "privacy.epsilon=null"]
    config = load_config(config_path, overrides)  # what run_audit does with them
    assert config.privacy.sigma == 0 and config.privacy.epsilon is None


def test_audit_options_after_overrides_keep_their_values(audited):
    argv = ["audit", AUDIT_CONFIG, "privacy.sigma=0", "--out", "o", "--canaries", "8", "--seed", "3", "train.steps=2"]
    assert main(argv) == 0
    ((_, overrides, kwargs),) = audited
    assert overrides == ["privacy.sigma=0", "train.steps=2"]
    assert (kwargs["out_dir"], kwargs["canaries"], kwargs["seed"]) == ("o", 8, 3)


def test_demo_overrides_after_options():
    args = parse_args(["demo", "train.steps=2", "--out", "runs/x", "privacy.epsilon=4", "--json"])
    assert (args.out, args.overrides, args.json) == ("runs/x", ["train.steps=2", "privacy.epsilon=4"], True)


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "stats", "DIR", "--json"],
        ["data", "--json", "stats", "DIR"],
        ["--json", "data", "stats", "DIR"],
        ["privacy", "epsilon", "--json", "--sigma", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"],
        ["plan", "--num-samples", "10", "--json", "--batch-size", "2", "--steps", "3", "--epsilon", "1"],
    ],
)
def test_json_flag_anywhere_in_other_commands(argv):
    assert parse_args(argv).json is True


def test_json_defaults_to_off():
    assert parse_args(["data", "stats", "DIR"]).json is False


@pytest.mark.parametrize(
    "argv, unknown",
    [
        (["train", DEMO_CONFIG, "--bogus"], "--bogus"),
        (["audit", AUDIT_CONFIG, "--out", "o", "not-an-override"], "not-an-override"),
        (["plan", "--num-samples", "10", "--batch-size", "2", "--steps", "3", "--epsilon", "1", "a=1"], "a=1"),
    ],
)
def test_other_unknown_arguments_are_still_argparse_errors(capsys, trained, audited, argv, unknown):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err
    assert not trained and not audited
