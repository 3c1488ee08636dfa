"""Privacy accounting for DP-SGD: the Poisson-subsampled Gaussian mechanism, composed over steps.

One step of DP-SGD samples every example independently with probability ``q`` (the sample rate),
clips each per-sample gradient to norm ``C`` and adds ``N(0, σ²C²)`` to the sum: the Sampled
Gaussian Mechanism (SGM) with noise multiplier ``σ``. A run is a sequence of such steps, stored
as segments ``(σ, q, steps)``. Two accountants turn a run into an ``(ε, δ)`` guarantee:

- ``"rdp"``: Rényi DP of the SGM (Mironov, Talwar & Zhang 2019, arXiv:1908.10530), summed over
  steps and segments (RDP composes additively at each order α), then converted to ``(ε, δ)`` with
  Balle et al. 2020, Thm 21 (arXiv:1905.09982). Computed by ``opacus.accountants.analysis.rdp`` on
  the order grid ``RDP_ORDERS``.
- ``"prv"``: numerical composition of privacy-loss random variables (Gopi, Lee & Wutschitz 2021,
  arXiv:2106.02848), built from ``opacus.accountants.analysis.prv``: each segment's PRV is
  truncated and discretised on one common mesh, self-composed by FFT and the segments convolved
  together. It reports the upper end of the PRV error bracket (estimate + ``eps_error``), or the
  RDP bound on ``INTEGER_RDP_ORDERS`` where that is lower (both are valid upper bounds; this
  only happens for very small or very large ε).

Robustness of the PRV path (documented failure modes of the numerical method):

- the discretisation domain is sized from RDP tail bounds (Gopi et al., remark 5.6) on cached
  integer-order RDP curves, so repeated calls during training cost one discretisation and FFT;
- ``eps_error`` is 0.01 (opacus' default) for 1 ≤ ε ≤ 10, 1 % of ε below (down to 1e-3) and 0.1 %
  above, and coarser when huge step counts would need more than ``PRV_MAX_DOMAIN`` mesh points;
- ``delta_error`` is δ/1000, so the upper bound holds at δ itself;
- any numerical failure of the PRV machinery (tiny δ, a discretisation whose mean drifts, an ε
  outside the domain, overflow when ε is in the hundreds) falls back to the RDP bound with a
  ``RuntimeWarning``.

All functions are pure; caches are ``functools.lru_cache`` on pure functions of hashable inputs.
The :class:`Ledger` is the only stateful object and knows nothing of optimizers or files.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)

from dpcap.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "INTEGER_RDP_ORDERS",
    "RDP_ORDERS",
    "Ledger",
    "LedgerStateError",
    "Segment",
    "calibrate_sigma",
    "epsilon",
]

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

#: RDP orders α: opacus' default grid (1.1 … 10.9 by 0.1, then 12 … 63) extended with larger
#: integer orders up to 1024 (as dp-accounting's default), which large σ or small q need: the
#: optimal order grows roughly like 1 + σ²·log(1/δ)/ε. Integer orders are cheap to evaluate.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 100)]
    + list(range(12, 64))
    + [64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024]
)
#: The integer orders of ``RDP_ORDERS`` (2 … 1024): a closed-form binomial sum each, so fast even
#: where fractional orders' series converge slowly (q ≳ 0.1 with large σ). Used where a valid but
#: slightly looser RDP bound is enough: PRV domain sizing, the RDP cap on PRV, calibration starts.
INTEGER_RDP_ORDERS: tuple[float, ...] = tuple(a for a in RDP_ORDERS if float(a).is_integer())

PRV_EPS_ERROR = 1e-2
PRV_MIN_EPS_ERROR = 1e-3
PRV_MAX_DOMAIN = 1 << 22

SIGMA_MIN = 1e-3
SIGMA_MAX = 1e6

_Segments = tuple[tuple[float, float, int], ...]


class LedgerStateError(ConfigError, ValueError):
    """A ledger state dict that is malformed: unknown or missing keys, or invalid values."""


class Segment(NamedTuple):
    """``steps`` consecutive steps of the SGM with noise multiplier ``sigma`` and rate ``sample_rate``."""

    sigma: float
    sample_rate: float
    steps: int


# ---------------------------------------------------------------------------------------------
# validation


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must not be NaN")
    return value


def _check_sigma(sigma: Any) -> float:
    value = _check_real("sigma", sigma)
    if not (0.0 <= value < math.inf):
        raise ConfigError(f"sigma (noise multiplier) must be finite and >= 0, got {sigma!r}")
    return value


def _check_sample_rate(sample_rate: Any) -> float:
    value = _check_real("sample_rate", sample_rate)
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return value


def _check_delta(delta: Any) -> float:
    value = _check_real("delta", delta)
    if not (0.0 < value < 1.0):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return value


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ConfigError(f"steps must be an integer, got {steps!r}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps!r}")
    return int(steps)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; valid accountants: {', '.join(ACCOUNTANTS)}")
    return accountant


# ---------------------------------------------------------------------------------------------
# RDP


@functools.lru_cache(maxsize=1024)
def _rdp_curve(sigma: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP ε_α of one SGM step at every order α in ``orders`` (Mironov et al. 2019, §3.3)."""
    curve = np.asarray(
        opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=list(orders)),
        dtype=np.float64,
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(segments: _Segments, delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    """ε at ``delta`` from RDP summed over segments: ε_α(run) = Σ_k steps_k · ε_α(σ_k, q_k) (composition).

    An optimum at the grid's edge only means the bound is looser than it could be; it stays valid.
    """
    total = sum(steps * _rdp_curve(sigma, q, orders) for sigma, q, steps in segments)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return max(0.0, float(eps))


# ---------------------------------------------------------------------------------------------
# PRV


def _prv_eps_error(segments: _Segments, rdp_eps: float, half_width: float, delta_error: float) -> float:
    """The additive ε error: max(1e-3, min(1e-2, ε/100), ε/1000), widened so the mesh fits ``PRV_MAX_DOMAIN``.

    So 0.01 (opacus' default) for 1 ≤ ε ≤ 10, 1 % of ε below, 0.1 % of ε above (where the domain,
    and the cost, would otherwise grow with ε).

    The mesh is eps_error / sqrt(T·log(12/δ_err)/2) (Gopi et al. 2021, Thm 5.5 with Hoeffding), so a
    domain [-L, L] has about 2L·sqrt(T·log(12/δ_err)/2) / eps_error points.
    """
    wanted = max(PRV_MIN_EPS_ERROR, min(PRV_EPS_ERROR, rdp_eps / 100), rdp_eps / 1000)
    total_steps = sum(steps for _, _, steps in segments)
    needed = 2 * half_width * math.sqrt(total_steps * math.log(12 / delta_error) / 2) / PRV_MAX_DOMAIN
    return max(wanted, needed)


def _prv_loss_bound(segments: _Segments, delta_error: float) -> float:
    """Bound on the privacy loss for the truncation domain (Gopi et al. 2021, remark 5.6).

    The larger of the RDP ε at tail mass δ_err/4 for the whole composition and at δ_err/(8T) for
    any single step; the domain is then [-L, L] with L = max(bound, eps_error) + 3.
    """
    total_steps = sum(steps for _, _, steps in segments)
    tail = _rdp_epsilon(segments, delta_error / 4, INTEGER_RDP_ORDERS)
    single = max(
        _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total_steps), INTEGER_RDP_ORDERS) for sigma, q, _ in segments
    )
    return max(tail, single)


def _prv_upper_epsilon(segments: _Segments, delta: float, rdp_eps: float) -> float:
    """Upper bound on ε from numerically composed PRVs (Gopi et al. 2021, Thm 5.5)."""
    delta_error = delta / 1000
    loss_bound = _prv_loss_bound(segments, delta_error)
    eps_error = _prv_eps_error(segments, rdp_eps, loss_bound + 3, delta_error)
    half_width = max(loss_bound, eps_error) + 3
    total_steps = sum(steps for _, _, steps in segments)
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [
        discretize(
            TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max), domain
        )
        for sigma, q, _ in segments
    ]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[steps for _, _, steps in segments])
    _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    if not math.isfinite(upper):
        raise RuntimeError(f"PRV returned a non-finite epsilon ({upper})")
    return max(0.0, float(upper))


def _prv_epsilon(segments: _Segments, delta: float) -> float:
    """min(PRV upper bound, RDP bound on integer orders); the full RDP bound if the PRV numerics fail."""
    rdp_eps = _rdp_epsilon(segments, delta, INTEGER_RDP_ORDERS)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prv_eps = _prv_upper_epsilon(segments, delta, rdp_eps)
    except (ValueError, RuntimeError, FloatingPointError, OverflowError, ZeroDivisionError) as exc:
        warnings.warn(f"PRV accounting failed ({exc}); reporting the RDP bound instead", RuntimeWarning, stacklevel=3)
        return _rdp_epsilon(segments, delta)
    return min(prv_eps, rdp_eps)


# ---------------------------------------------------------------------------------------------
# composition


def _canonical(segments: Iterable[tuple[float, float, int]]) -> _Segments:
    """Merge segments with equal (σ, q) — composition is commutative — and sort: a cache key."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in segments:
        if steps:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return tuple((sigma, q, steps) for (sigma, q), steps in sorted(merged.items()))


@functools.lru_cache(maxsize=1024)
def _compose(segments: _Segments, delta: float, accountant: str) -> float:
    """ε of a canonical, non-empty composition with σ > 0 throughout."""
    if accountant == "rdp":
        return _rdp_epsilon(segments, delta)
    return _prv_epsilon(segments, delta)


def _epsilon_of(segments: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of any composition: 0 for no steps, inf if any step had σ = 0 (no noise, no privacy)."""
    canonical = _canonical(segments)
    if not canonical:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in canonical):
        return math.inf
    return _compose(canonical, delta, accountant)


def epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """ε(δ) of the SGM with noise multiplier ``sigma`` and rate ``sample_rate`` composed ``steps`` times.

    Returns 0.0 for ``steps == 0`` and ``math.inf`` for ``sigma == 0``. Raises ``ConfigError`` for
    out-of-range arguments (σ ≥ 0, q ∈ (0, 1], integer steps ≥ 0, δ ∈ (0, 1)) or an unknown
    accountant (``"prv"`` or ``"rdp"``).
    """
    sigma, sample_rate = _check_sigma(sigma), _check_sample_rate(sample_rate)
    steps, delta, accountant = _check_steps(steps), _check_delta(delta), _check_accountant(accountant)
    return _epsilon_of(((sigma, sample_rate, steps),), delta, accountant)


# ---------------------------------------------------------------------------------------------
# calibration


def _bracket(eps_of: Callable[[float], float], target: float, start: float, factor: float) -> tuple[float, float]:
    """(lo, hi) with ε(lo) > target ≥ ε(hi), searched geometrically from ``start``.

    The step factor squares after every miss, so a poor start costs few evaluations; σ stays within
    [SIGMA_MIN, SIGMA_MAX] and a target outside that range is a ``ConfigError``.
    """
    lo = hi = start
    if eps_of(start) > target:
        while eps_of(hi) > target:
            if hi >= SIGMA_MAX:
                raise ConfigError(f"epsilon={target} is unreachable: even sigma={SIGMA_MAX:g} gives more")
            lo, hi, factor = hi, min(hi * factor, SIGMA_MAX), factor * factor
    else:
        while eps_of(lo) <= target:
            if lo <= SIGMA_MIN:
                raise ConfigError(f"epsilon={target} is so large that any sigma >= {SIGMA_MIN:g} meets it")
            hi, lo, factor = lo, max(lo / factor, SIGMA_MIN), factor * factor
    return lo, hi


def _bisect_log(eps_of: Callable[[float], float], target: float, lo: float, hi: float, rtol: float) -> float:
    """Bisection on log σ (ε decreases in σ) until hi/lo ≤ 1 + rtol; returns hi (ε(hi) ≤ target)."""
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_sigma(
    epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
    *,
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier σ (to ``rtol`` relative) with ``epsilon(σ, …) <= epsilon``.

    ε(σ) is decreasing in σ, so a geometric bracket search followed by bisection on log σ finds it;
    the returned σ always satisfies the target, and σ/(1 + rtol) does not. For ``"prv"`` the
    search starts from the solution for the integer-order RDP bound, which caps PRV's ε, so that
    σ already meets the target. Edge
    cases: ``steps == 0`` or ``epsilon == inf`` → 0.0 (no noise needed). ``ConfigError`` for
    ε ≤ 0 or NaN, a target that needs σ > 1e6, or one so loose that every σ ≥ 1e-3 meets it.
    """
    target = _check_real("epsilon", epsilon)
    if target <= 0:
        raise ConfigError(f"epsilon must be > 0 (epsilon = 0 needs infinite noise), got {epsilon!r}")
    sample_rate, steps = _check_sample_rate(sample_rate), _check_steps(steps)
    delta, accountant = _check_delta(delta), _check_accountant(accountant)
    if not (0 < rtol < 1):
        raise ConfigError(f"rtol must be in (0, 1), got {rtol!r}")
    if steps == 0 or target == math.inf:
        return 0.0

    def eps_rdp(s: float) -> float:
        orders = RDP_ORDERS if accountant == "rdp" else INTEGER_RDP_ORDERS
        return _rdp_epsilon(((s, sample_rate, steps),), delta, orders)

    sigma = _bisect_log(eps_rdp, target, *_bracket(eps_rdp, target, 1.0, 2.0), rtol)
    if accountant == "rdp":
        return sigma

    def eps_prv(s: float) -> float:
        return _epsilon_of(((s, sample_rate, steps),), delta, "prv")

    return _bisect_log(eps_prv, target, *_bracket(eps_prv, target, sigma, 1.05), rtol)


# ---------------------------------------------------------------------------------------------
# ledger


class Ledger:
    """The run's privacy history: segments of consecutive steps with equal (σ, q).

    ε of the whole run composes all segments (RDP: sum of RDP curves; PRV: convolution of the
    segments' PRVs). A segment with σ = 0 (non-private baseline) makes ε infinite.
    """

    _STATE_KEYS = frozenset({"version", "segments"})
    _SEGMENT_KEYS = frozenset(Segment._fields)
    _VERSION = 1

    def __init__(self) -> None:
        self._segments: list[Segment] = []

    def __repr__(self) -> str:
        return f"Ledger(steps={self.steps}, segments={self._segments!r})"

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The recorded segments, oldest first."""
        return tuple(self._segments)

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(seg.steps for seg in self._segments)

    def record(self, sigma: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more steps with noise multiplier ``sigma`` and rate ``sample_rate``."""
        segment = Segment(_check_sigma(sigma), _check_sample_rate(sample_rate), _check_steps(steps))
        if segment.steps == 0:
            return
        last = self._segments[-1] if self._segments else None
        if last is not None and (last.sigma, last.sample_rate) == (segment.sigma, segment.sample_rate):
            self._segments[-1] = last._replace(steps=last.steps + segment.steps)
        else:
            self._segments.append(segment)

    def epsilon(self, delta: float, *, accountant: str = "prv") -> float:
        """ε(δ) of all recorded steps: 0.0 if none, inf if any had σ = 0."""
        return _epsilon_of(self._segments, _check_delta(delta), _check_accountant(accountant))

    def epsilon_after(
        self, *, sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
    ) -> float:
        """ε(δ) if ``steps`` more steps with (σ, q) were taken (the budget guard); the ledger is unchanged."""
        extra = Segment(_check_sigma(sigma), _check_sample_rate(sample_rate), _check_steps(steps))
        return _epsilon_of([*self._segments, extra], _check_delta(delta), _check_accountant(accountant))

    def calibrate_sigma(
        self,
        budget: float,
        *,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str = "prv",
        rtol: float = 1e-3,
    ) -> float:
        """The smallest σ (to ``rtol``) whose ``steps`` more steps at rate ``sample_rate`` keep ε(δ) of the
        whole ledger within ``budget`` (a resumed run whose plan changed spends only what is left).

        ``ConfigError`` when the recorded steps alone already spend the budget.
        """
        budget = _check_real("budget", budget)
        sample_rate, steps = _check_sample_rate(sample_rate), _check_steps(steps)
        delta, accountant = _check_delta(delta), _check_accountant(accountant)
        if steps == 0 or budget == math.inf:
            return 0.0
        spent = self.epsilon(delta, accountant=accountant)
        if spent >= budget:
            raise ConfigError(
                f"the recorded {self.steps} steps already spend ε = {spent:.4f} of the budget {budget:.4f}"
            )

        def eps_of(s: float) -> float:
            return self.epsilon_after(sigma=s, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)

        return _bisect_log(eps_of, budget, *_bracket(eps_of, budget, 1.0, 2.0), rtol)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"version": 1, "segments": [{"sigma", "sample_rate", "steps"}, …]}``."""
        return {"version": self._VERSION, "segments": [seg._asdict() for seg in self._segments]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Ledger:
        """Rebuild a ledger from :meth:`state_dict` output; strict: any unknown/missing key or bad value raises."""
        _check_keys("ledger state", state, cls._STATE_KEYS)
        if state["version"] != cls._VERSION:
            raise LedgerStateError(f"ledger state: unsupported version {state['version']!r} (expected {cls._VERSION})")
        if not isinstance(state["segments"], list):
            raise LedgerStateError("ledger state: 'segments' must be a list")
        ledger = cls()
        for i, raw in enumerate(state["segments"]):
            ledger._segments.append(_segment_from_state(i, raw))
        return ledger


def _check_keys(where: str, state: Any, expected: frozenset[str]) -> None:
    if not isinstance(state, Mapping):
        raise LedgerStateError(f"{where} must be a mapping, got {type(state).__name__}")
    unknown, missing = set(state) - expected, expected - set(state)
    if unknown or missing:
        raise LedgerStateError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")


def _segment_from_state(index: int, raw: Any) -> Segment:
    where = f"ledger state: segments[{index}]"
    _check_keys(where, raw, Ledger._SEGMENT_KEYS)
    try:
        segment = Segment(
            _check_sigma(raw["sigma"]), _check_sample_rate(raw["sample_rate"]), _check_steps(raw["steps"])
        )
    except ConfigError as exc:
        raise LedgerStateError(f"{where}: {exc}") from exc
    if segment.steps == 0:
        raise LedgerStateError(f"{where}: steps must be >= 1")
    return segment
