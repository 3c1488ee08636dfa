"""The run planner on DP-Cap's settings, with dp-accounting as the oracle for ε."""

import json
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from dpcap.errors import ConfigError
from dpcap.privacy.accountant import epsilon
from dpcap.privacy.planner import TAN_NOTE, plan

N = 233_804_767
B = 1_310_720
T = 5_708


def _oracle_rdp(sigma, q, steps, delta):
    accountant = RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(dp_event.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def dpcap_rdp_plan():
    return plan(num_samples=N, batch_size=B, steps=T, epsilon=8.0, gpus=128, per_gpu_batch=128, accountant="rdp")


def test_dpcap_plan_rdp(dpcap_rdp_plan):
    p = dpcap_rdp_plan
    assert p["sigma"] == pytest.approx(0.728, rel=0.01)
    assert p["delta"] == 1 / N and p["sample_rate"] == B / N
    assert p["epochs"] == pytest.approx(32.0, abs=0.05)
    assert p["accumulation_steps"] == 80
    assert p["accountant"] == "rdp" and p["steps"] == T and p["num_samples"] == N and p["batch_size"] == B
    assert p["gpus"] == 128 and p["per_gpu_batch"] == 128
    assert p["epsilon"] <= p["target_epsilon"] == 8.0
    assert _oracle_rdp(p["sigma"], B / N, T, 1 / N) == pytest.approx(8.0, rel=0.01)
    assert p["noise_std_per_coordinate"] == pytest.approx(p["sigma"] / B, rel=1e-12)


def test_tan_equivalent_keeps_noise_per_coordinate(dpcap_rdp_plan):
    tan = dpcap_rdp_plan["tan_equivalent"]
    assert tan["batch_size"] == 128 * 128
    assert tan["sigma"] / tan["batch_size"] == pytest.approx(dpcap_rdp_plan["noise_std_per_coordinate"], rel=1e-12)
    assert "NO DP guarantee" in tan["note"] and tan["note"] == TAN_NOTE


def test_plan_is_json_ready(dpcap_rdp_plan):
    assert json.loads(json.dumps(dpcap_rdp_plan, allow_nan=False)) == dpcap_rdp_plan


@pytest.mark.slow
def test_dpcap_plan_prv_needs_less_noise(dpcap_rdp_plan):
    p = plan(num_samples=N, batch_size=B, steps=T, epsilon=8.0)
    assert p["accountant"] == "prv"
    assert p["sigma"] < dpcap_rdp_plan["sigma"] * 0.99
    assert p["epsilon"] <= 8.0 < epsilon(p["sigma"] * (1 - 2e-3), B / N, T, 1 / N, "prv")


def test_small_plan_without_hardware():
    p = plan(10_000, 1_000, 50, 4.0, delta=1e-5, accountant="rdp")  # the CLI calls it positionally
    assert p["accumulation_steps"] is None and p["gpus"] is None and p["per_gpu_batch"] is None
    assert p["epochs"] == pytest.approx(5.0)
    assert p["tan_equivalent"]["batch_size"] == 1_000 // 256
    assert _oracle_rdp(p["sigma"], 0.1, 50, 1e-5) == pytest.approx(4.0, rel=0.01)


def test_accumulation_rounds_up():
    p = plan(num_samples=1_000, batch_size=100, steps=10, epsilon=8.0, gpus=3, per_gpu_batch=16, accountant="rdp")
    assert p["accumulation_steps"] == math.ceil(100 / 48) == 3
    assert p["tan_equivalent"]["batch_size"] == 48


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": 2_000}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"gpus": 0}, "gpus"),
        ({"per_gpu_batch": -4}, "per_gpu_batch"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_invalid_inputs(overrides, name):
    args = {"num_samples": 1_000, "batch_size": 100, "steps": 10, "epsilon": 8.0} | overrides
    with pytest.raises(ConfigError, match=name):
        plan(**args)
