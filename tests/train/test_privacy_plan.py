"""The privacy record stays true across resumes (issue 11, cases 1-3; DESIGN invariant 5).

The plan (N, q, σ, δ, C, accountant, ε budget, insecure-ever) is fixed at the first step and stored
in every checkpoint; a resume that would change it is refused (exit 2) unless
--allow-privacy-change, which records the change; "NOT PRIVATE" is sticky. ε values are checked
against opacus' RDP accountant (an independent implementation) where the run uses the RDP accountant.
"""

from __future__ import annotations

import json
import math

import pytest

from dpcap.cli import main
from dpcap.config import load_config
from dpcap.errors import BudgetExceededError, ConfigError
from dpcap.pipeline import export_run
from dpcap.privacy.accountant import epsilon
from dpcap.train.loop import train
from tests.conftest import train_overrides

SECRET = {"privacy.insecure_noise_seed": None, "privacy.insecure_sampler_seed": None}


def config(shards, run_dir, **extra):
    return load_config(None, train_overrides(shards, run_dir, **extra))


def last_state(run_dir) -> dict:
    last = (run_dir / "LAST").read_text().strip()
    return json.loads((run_dir / "checkpoints" / last / "state.json").read_text())


def opacus_rdp_epsilon(segments, delta: float) -> float:
    """ε of consecutive (σ, q, steps) segments by opacus' RDP accountant (its own orders and conversion)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(s["sigma"], s["sample_rate"], s["steps"]) for s in segments]
    return accountant.get_epsilon(delta)


def test_a_run_that_once_used_insecure_seeds_stays_not_private(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = train(config(tiny_shards, run, **{"train.steps": 4}), max_steps_this_run=2)
    assert first["private"] is False and first["insecure_seed_ever"] is True
    resumed = train(config(tiny_shards, run, **{"train.steps": 4}, **SECRET))  # the seeds dropped on resume
    assert resumed["step"] == 4 and resumed["private"] is False and resumed["insecure_seed_ever"] is True
    assert last_state(run)["plan"]["insecure"] is True
    card = export_run(run, tmp_path / "export")
    assert card["private"] is False
    text = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "NOT PRIVATE" in text and "-differentially private with respect to" not in text


def test_a_resume_that_changes_sigma_is_refused_then_recorded_with_the_original_budget(tiny_shards, tmp_path):
    run, base = tmp_path / "run", {"train.steps": 4, "privacy.accountant": "rdp", **SECRET}
    first = train(config(tiny_shards, run, **base), max_steps_this_run=2)
    budget = first["epsilon_budget"]
    assert budget == pytest.approx(epsilon(1.0, first["sample_rate"], 4, first["delta"], accountant="rdp"))
    lower = {**base, "privacy.sigma": 0.9}
    with pytest.raises(
        ConfigError, match=r"privacy plan: sigma 1\.0 → 0\.9 \(set by privacy\.sigma.*--allow-privacy-change"
    ):
        train(config(tiny_shards, run, **lower))
    assert last_state(run)["step"] == 2  # nothing was trained

    # Allowed: σ = 0.9 spends faster than the σ = 1.0 plan did, and the original budget still holds: one
    # σ = 0.9 step fits in it, the second would cross it (exit 3).
    with pytest.raises(BudgetExceededError):
        train(config(tiny_shards, run, **lower), allow_privacy_change=True)
    state = last_state(run)
    segments = state["ledger"]["segments"]
    assert [(s["sigma"], s["steps"]) for s in segments][0] == (1.0, 2) and segments[-1] == {
        "sigma": 0.9,
        "sample_rate": segments[0]["sample_rate"],
        "steps": 1,
    }
    card = state["privacy"]
    assert card["epsilon_budget"] == pytest.approx(budget) and card["sigma"] == 0.9
    assert card["segments"] == segments
    assert card["plan_changes"][0]["step"] == 2 and card["plan_changes"][0]["changed"]["sigma"] == [1.0, 0.9]
    assert "epsilon_budget" not in card["plan_changes"][0]["changed"]  # kept, not silently raised
    assert card["epsilon"] == pytest.approx(opacus_rdp_epsilon(segments, card["delta"]), rel=0.02)
    assert card["epsilon"] <= budget

    # Raising the budget takes an explicit privacy.epsilon, and is recorded too.
    raised = {**lower, "privacy.epsilon": 2 * budget}
    done = train(config(tiny_shards, run, **raised), allow_privacy_change=True)
    assert done["done"] and done["epsilon_budget"] == pytest.approx(2 * budget)
    assert done["plan_changes"][-1]["changed"]["epsilon_budget"] == [pytest.approx(budget), pytest.approx(2 * budget)]
    assert done["epsilon"] == pytest.approx(opacus_rdp_epsilon(done["segments"], done["delta"]), rel=0.02)


def test_epsilon_mode_more_steps_recalibrates_sigma_for_what_is_left(tiny_shards, tmp_path):
    run, base = tmp_path / "run", {"privacy.sigma": None, "privacy.epsilon": 3.0, **SECRET}
    first = train(config(tiny_shards, run, **base, **{"train.steps": 4}), max_steps_this_run=2)
    with pytest.raises(ConfigError, match=r"sigma .* → .*privacy\.epsilon over train\.steps"):
        train(config(tiny_shards, run, **base, **{"train.steps": 8}))
    done = train(config(tiny_shards, run, **base, **{"train.steps": 8}), allow_privacy_change=True)
    assert done["done"] and done["step"] == 8  # no exit 3 part-way: σ was calibrated for the 6 steps left
    assert done["epsilon_budget"] == 3.0 and done["epsilon"] <= 3.0 * (1 + 1e-6)
    assert done["epsilon"] == pytest.approx(3.0, rel=0.01)  # and it spends the budget, not less
    assert [s["steps"] for s in done["segments"]] == [2, 6] and done["segments"][0]["sigma"] == first["sigma"]
    assert done["sigma"] > first["sigma"]


def test_noise_free_steps_make_the_run_not_private_forever(tiny_shards, tmp_path):
    run, base = tmp_path / "run", {"train.steps": 6, "privacy.sigma": 0, **SECRET}
    train(config(tiny_shards, run, **base), max_steps_this_run=3)
    noisy = {**base, "privacy.sigma": 1.0}
    with pytest.raises(ConfigError, match="sigma 0.0 → 1.0"):
        train(config(tiny_shards, run, **noisy))
    done = train(config(tiny_shards, run, **noisy), allow_privacy_change=True)
    assert done["done"] and done["private"] is False and done["epsilon"] is None
    assert [(s["sigma"], s["steps"]) for s in done["segments"]] == [(0.0, 3), (1.0, 3)]
    card = export_run(run, tmp_path / "export")
    assert card["private"] is False
    text = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "NOT PRIVATE" in text and "-differentially private with respect to" not in text
    assert "(, " not in text  # the broken "(, 0.0047)-differentially private" sentence


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_an_infinite_or_nan_epsilon_is_a_config_error(tiny_shards, tmp_path, value):
    with pytest.raises(ConfigError, match="privacy.epsilon must be finite"):
        config(tiny_shards, tmp_path / "run", **{"privacy.sigma": 1.0, "privacy.epsilon": value})
    with pytest.raises(ConfigError, match="privacy.epsilon must be finite"):
        config(tiny_shards, tmp_path / "run", **{"privacy.sigma": None, "privacy.epsilon": value})


def test_cli_refuses_a_changed_resume_with_exit_2_and_takes_the_flag(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(tiny_shards, run, **{"train.steps": 3}), max_steps_this_run=2)  # stopped after 2 of 3 steps
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "privacy.max_grad_norm=2.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_grad_norm 1.0 → 2.0" in err and "--allow-privacy-change" in err
    resumed = ["train", "--resume", str(run), "privacy.max_grad_norm=2.0", "--allow-privacy-change"]
    assert main([*resumed, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 3 and report["plan_changes"][0]["changed"]["max_grad_norm"] == [1.0, 2.0]
    assert math.isfinite(report["epsilon"])
