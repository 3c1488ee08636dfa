"""ε, σ calibration and the Ledger, checked against dp-accounting (an independent implementation)."""

import json
import math
import time

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpcap.errors import ConfigError
from dpcap.privacy.accountant import RDP_ORDERS, Ledger, LedgerStateError, Segment, calibrate_sigma, epsilon

DPCAP_N = 233_804_767
DPCAP_Q = 1_310_720 / DPCAP_N
DPCAP_STEPS = 5_708


def _event(segments):
    """dp-accounting's event for Poisson-subsampled Gaussian segments [(σ, q, steps), …]."""
    events = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in segments
    ]
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def _oracle_rdp(segments, delta):
    accountant = RdpAccountant()
    accountant.compose(_event(segments))
    return accountant.get_epsilon(delta)


def _oracle_pld(segments, delta):
    accountant = PLDAccountant()
    accountant.compose(_event(segments))
    return accountant.get_epsilon(delta)


# --- epsilon vs dp-accounting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [(1.1, 0.02, 500, 1e-5), (3.0, 0.1, 100, 1e-5), (0.9, 0.3, 40, 1e-3), (8.0, 0.01, 20, 1e-6)],
)
def test_rdp_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(sigma, q, steps, delta, "rdp")
    oracle = _oracle_rdp([(sigma, q, steps)], delta)
    # our order grid extends dp-accounting's, so never looser, and within 1 %
    assert ours <= oracle * (1 + 1e-9)
    assert ours == pytest.approx(oracle, rel=0.01)


def test_reference_numbers_from_notes():
    assert _oracle_rdp([(1.1, 0.02, 500)], 1e-5) == pytest.approx(2.576, abs=1e-3)
    assert epsilon(1.1, 0.02, 500, 1e-5, accountant="rdp") == pytest.approx(2.576, abs=2e-3)
    assert epsilon(1.1, 0.02, 500, 1e-5, accountant="prv") == pytest.approx(2.293, abs=0.02)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), [(1.1, 0.02, 500, 1e-5), (2.0, 0.2, 60, 1e-4)])
def test_prv_matches_pld(sigma, q, steps, delta):
    ours = epsilon(sigma, q, steps, delta)  # default accountant is PRV
    assert abs(ours - _oracle_pld([(sigma, q, steps)], delta)) < 0.02
    assert ours < epsilon(sigma, q, steps, delta, "rdp")


def test_prv_small_epsilon_is_tight():
    """Tiny ε: opacus' fixed eps_error = 0.01 would dwarf it; ours scales the error with ε."""
    ours = epsilon(20.0, 0.01, 10, 1e-5, "prv")
    oracle = _oracle_pld([(20.0, 0.01, 10)], 1e-5)
    assert oracle <= ours <= oracle + 2e-3


def test_dpcap_regime():
    delta = 1 / DPCAP_N
    start = time.perf_counter()
    prv = epsilon(0.728, DPCAP_Q, DPCAP_STEPS, delta, "prv")
    elapsed = time.perf_counter() - start
    rdp = epsilon(0.728, DPCAP_Q, DPCAP_STEPS, delta, "rdp")
    assert rdp == pytest.approx(8.05, abs=0.01)
    assert rdp == pytest.approx(_oracle_rdp([(0.728, DPCAP_Q, DPCAP_STEPS)], delta), rel=0.01)
    assert prv == pytest.approx(7.35, abs=0.02)
    assert abs(prv - _oracle_pld([(0.728, DPCAP_Q, DPCAP_STEPS)], delta)) < 0.02
    assert elapsed < 2.0


def test_edge_cases():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert epsilon(0.0, 0.1, 10, 1e-5, "rdp") == math.inf
    # q = 1: the full-batch Gaussian mechanism, RDP exactly α·T/(2σ²) (Mironov 2017, Prop. 7),
    # converted with Balle et al. 2020, Thm 21 over the same orders
    closed_form = min(
        a * 10 / (2 * 2.0**2) - (math.log(1e-5) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in RDP_ORDERS
    )
    assert epsilon(2.0, 1.0, 10, 1e-5, "rdp") == pytest.approx(closed_form, rel=1e-12)


def test_monotone_in_sigma_steps_and_rate():
    base = epsilon(1.0, 0.05, 100, 1e-5, "rdp")
    assert epsilon(1.2, 0.05, 100, 1e-5, "rdp") < base
    assert epsilon(1.0, 0.05, 200, 1e-5, "rdp") > base
    assert epsilon(1.0, 0.10, 100, 1e-5, "rdp") > base


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1.0, 0.1, 10, 1e-5), "sigma"),
        ((math.nan, 0.1, 10, 1e-5), "sigma"),
        ((math.inf, 0.1, 10, 1e-5), "sigma"),
        ((1.0, 0.0, 10, 1e-5), "sample_rate"),
        ((1.0, 1.5, 10, 1e-5), "sample_rate"),
        ((1.0, 0.1, -1, 1e-5), "steps"),
        ((1.0, 0.1, 2.5, 1e-5), "steps"),
        ((1.0, 0.1, True, 1e-5), "steps"),
        ((1.0, 0.1, 10, 0.0), "delta"),
        ((1.0, 0.1, 10, 1.0), "delta"),
        (("1.0", 0.1, 10, 1e-5), "sigma"),
    ],
)
def test_invalid_arguments_name_the_argument(args, name):
    with pytest.raises(ConfigError, match=name):
        epsilon(*args)


def test_unknown_accountant_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"gdp.*prv, rdp"):
        epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp")


def test_prv_failure_falls_back_to_rdp():
    """δ below long-double resolution × domain size: opacus' PRV refuses; we report the RDP bound."""
    with pytest.warns(RuntimeWarning, match="PRV accounting failed"):
        ours = epsilon(1.37, 0.1, 10, 1e-19, "prv")
    assert ours == epsilon(1.37, 0.1, 10, 1e-19, "rdp")


# --- calibrate_sigma ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "q", "steps", "delta", "accountant"),
    [
        (2.0, 0.02, 500, 1e-5, "rdp"),
        (2.0, 0.02, 500, 1e-5, "prv"),
        (3.0, 0.2, 50, 1e-3, "prv"),
        (0.5, 0.1, 100, 1e-5, "rdp"),
    ],
)
def test_calibrate_sigma_round_trip(target, q, steps, delta, accountant):
    sigma = calibrate_sigma(target, q, steps, delta, accountant)
    assert epsilon(sigma, q, steps, delta, accountant) <= target
    assert epsilon(sigma * (1 - 2e-3), q, steps, delta, accountant) > target


def test_calibrate_sigma_prv_needs_less_noise_and_rdp_oracle():
    sigma_rdp = calibrate_sigma(2.0, 0.02, 500, 1e-5, "rdp")
    assert _oracle_rdp([(sigma_rdp, 0.02, 500)], 1e-5) == pytest.approx(2.0, rel=0.01)
    assert calibrate_sigma(2.0, 0.02, 500, 1e-5, "prv") < sigma_rdp


def test_calibrate_sigma_edge_cases():
    assert calibrate_sigma(1.0, 0.1, 0, 1e-5) == 0.0
    assert calibrate_sigma(math.inf, 0.1, 10, 1e-5) == 0.0
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="epsilon"):
            calibrate_sigma(bad, 0.1, 10, 1e-5)
    with pytest.raises(ConfigError, match="sample_rate"):
        calibrate_sigma(1.0, 2.0, 10, 1e-5)
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_sigma(1e-12, 1.0, 10_000, 1e-5, "rdp")


# --- Ledger ------------------------------------------------------------------------------------


def test_ledger_single_segment_equals_epsilon():
    ledger = Ledger()
    for _ in range(30):
        ledger.record(1.1, 0.02)
    ledger.record(1.1, 0.02, steps=470)
    assert ledger.steps == 500
    assert ledger.segments == (Segment(1.1, 0.02, 500),)
    for accountant in ("rdp", "prv"):
        assert ledger.epsilon(1e-5, accountant=accountant) == epsilon(1.1, 0.02, 500, 1e-5, accountant)


def test_ledger_heterogeneous_segments_vs_dp_accounting():
    segments = [(1.1, 0.02, 300), (2.0, 0.05, 200)]
    ledger = Ledger()
    for sigma, q, steps in segments:
        ledger.record(sigma, q, steps)
    assert len(ledger.segments) == 2
    rdp = ledger.epsilon(1e-5, accountant="rdp")
    assert rdp == pytest.approx(_oracle_rdp(segments, 1e-5), rel=0.01)
    prv = ledger.epsilon(1e-5, accountant="prv")
    assert abs(prv - _oracle_pld(segments, 1e-5)) < 0.02
    # composition is commutative
    reverse = Ledger()
    for sigma, q, steps in reversed(segments):
        reverse.record(sigma, q, steps)
    assert reverse.epsilon(1e-5, accountant="prv") == pytest.approx(prv, abs=1e-9)


def test_ledger_epsilon_after_is_consistent_and_pure():
    ledger = Ledger()
    ledger.record(1.0, 0.05, 100)
    before = ledger.state_dict()
    after = ledger.epsilon_after(sigma=1.5, sample_rate=0.05, steps=20, delta=1e-5, accountant="prv")
    assert ledger.state_dict() == before
    ledger.record(1.5, 0.05, 20)
    assert after == ledger.epsilon(1e-5, accountant="prv")
    assert after > Ledger.from_state_dict(before).epsilon(1e-5, accountant="prv")


def test_ledger_empty_and_non_private():
    ledger = Ledger()
    assert ledger.steps == 0 and ledger.epsilon(1e-5) == 0.0
    ledger.record(1.0, 0.1, 0)
    assert ledger.segments == ()
    ledger.record(1.0, 0.1, 5)
    ledger.record(0.0, 0.1, 1)
    assert ledger.epsilon(1e-5) == math.inf
    assert Ledger().epsilon_after(sigma=0.0, sample_rate=0.1, steps=1, delta=1e-5) == math.inf


def test_ledger_state_dict_round_trip_through_json():
    ledger = Ledger()
    ledger.record(1.1, 0.02, 10)
    ledger.record(0.9, 0.02, 3)
    ledger.record(1.1, 0.02, 2)
    text = json.dumps(ledger.state_dict())
    restored = Ledger.from_state_dict(json.loads(text))
    assert restored.segments == ledger.segments
    assert restored.steps == 15
    assert restored.epsilon(1e-5, accountant="rdp") == ledger.epsilon(1e-5, accountant="rdp")
    assert json.loads(text)["segments"][0] == {"sigma": 1.1, "sample_rate": 0.02, "steps": 10}


@pytest.mark.parametrize(
    "state",
    [
        {"segments": []},
        {"version": 1, "segments": [], "extra": 0},
        {"version": 2, "segments": []},
        {"version": 1, "segments": {}},
        {"version": 1, "segments": [{"sigma": 1.0, "sample_rate": 0.1}]},
        {"version": 1, "segments": [{"sigma": 1.0, "sample_rate": 0.1, "steps": 1, "seed": 3}]},
        {"version": 1, "segments": [{"sigma": -1.0, "sample_rate": 0.1, "steps": 1}]},
        {"version": 1, "segments": [{"sigma": 1.0, "sample_rate": 0.1, "steps": 0}]},
        {"version": 1, "segments": [{"sigma": 1.0, "sample_rate": 0.1, "steps": 1.5}]},
        [],
    ],
)
def test_ledger_from_state_dict_is_strict(state):
    with pytest.raises(LedgerStateError) as info:
        Ledger.from_state_dict(state)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_ledger_validates_records():
    with pytest.raises(ConfigError, match="sample_rate"):
        Ledger().record(1.0, 0.0)
    with pytest.raises(ConfigError, match="accountant"):
        Ledger().epsilon(1e-5, accountant="moments")


def test_repeated_small_step_calls_are_fast():
    """The training loop asks for ε after every step: each call must stay well under 0.2 s."""
    ledger = Ledger()
    ledger.record(1.3, 0.25)
    ledger.epsilon(1e-5)  # first call builds the (cached) RDP curve of this (σ, q)
    start = time.perf_counter()
    for _ in range(10):
        ledger.record(1.3, 0.25)
        ledger.epsilon(1e-5)
        ledger.epsilon_after(sigma=1.3, sample_rate=0.25, steps=1, delta=1e-5)
    assert (time.perf_counter() - start) / 20 < 0.2


@pytest.mark.parametrize("accountant, oracle, slack", [("rdp", _oracle_rdp, 0.01), ("prv", _oracle_pld, 0.02)])
def test_ledger_calibrate_sigma_spends_what_is_left_of_the_budget(accountant, oracle, slack):
    """σ for the steps left after a recorded segment: dp-accounting composes both segments to the budget."""
    ledger = Ledger()
    ledger.record(1.1, 0.02, 300)
    budget, delta = 4.0, 1e-5
    sigma = ledger.calibrate_sigma(budget, sample_rate=0.05, steps=200, delta=delta, accountant=accountant)
    composed = oracle([(1.1, 0.02, 300), (sigma, 0.05, 200)], delta)
    assert composed == pytest.approx(budget, abs=slack * budget)
    assert ledger.epsilon_after(sigma=sigma, sample_rate=0.05, steps=200, delta=delta, accountant=accountant) <= budget
    lower = sigma / 1.002  # just below the calibrated σ: over the budget
    assert ledger.epsilon_after(sigma=lower, sample_rate=0.05, steps=200, delta=delta, accountant=accountant) > budget
    assert ledger.steps == 300  # calibrating records nothing
    spent = ledger.epsilon(delta, accountant=accountant)
    with pytest.raises(ConfigError, match="already spend"):
        ledger.calibrate_sigma(spent * 0.9, sample_rate=0.05, steps=10, delta=delta, accountant=accountant)
