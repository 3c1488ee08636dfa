"""The privacy plan of a run: fixed at its first step, stored in every checkpoint, compared on resume.

DESIGN invariant 5: the plan (N, q, σ, δ, C, accountant, ε budget, insecure-ever) is what the
accountant's guarantee is about, so a resume never changes it silently. `resolve_plan` refuses a
resume whose config would change it (exit 2, naming the config keys) unless the operator passes
`--allow-privacy-change`; then the change is recorded (step, old → new) and the ledger composes the
old and new segments. The original ε budget is kept unless the new config sets `privacy.epsilon`
explicitly, and in ε mode σ is re-calibrated so that the steps left spend only what is left of it.

"NOT PRIVATE" is sticky: a run that ever used an insecure seed or took a σ = 0 step carries no
guarantee, whatever later segments do (`card`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dpcap.config import RunConfig
from dpcap.errors import ConfigError
from dpcap.privacy.accountant import Ledger, calibrate_sigma, epsilon

# The plan's fields a resume compares, and the config keys that set each (for the refusal message).
PLAN_KEYS = {
    "num_samples": "data.shards (N)",
    "sample_rate": "train.batch_size (q = batch_size / N)",
    "sigma": "privacy.sigma (or privacy.epsilon over train.steps)",
    "delta": "privacy.delta",
    "max_grad_norm": "privacy.max_grad_norm",
    "accountant": "privacy.accountant",
    "epsilon_budget": "privacy.epsilon (or privacy.sigma over train.steps)",
}


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything the accountant needs, fixed at the start of a run (and saved in every checkpoint)."""

    num_samples: int
    sample_rate: float
    sigma: float
    delta: float
    max_grad_norm: float
    accountant: str
    epsilon_budget: float  # inf for the non-private baseline
    insecure: bool  # a fixed noise or sampler seed, ever: the run carries no guarantee
    recipe: dict = field(default_factory=dict)  # what else shaped the weights (see training_recipe)
    changes: tuple = ()  # ({"step", "changed": {key: [old, new]}}, …): resumes with --allow-privacy-change

    def private(self, ledger: Ledger) -> bool:
        """A guarantee holds: never an insecure seed, and every step so far (and the next) noised."""
        return not self.insecure and self.sigma > 0 and all(seg.sigma > 0 for seg in ledger.segments)

    def card(self, ledger: Ledger) -> dict:
        """The privacy card: the plan, ε spent so far, each ledger segment, and every recorded change."""
        spent = ledger.epsilon(self.delta, accountant=self.accountant)
        return {
            "epsilon": spent if math.isfinite(spent) else None,
            "delta": self.delta,
            "sigma": self.sigma,
            "sample_rate": self.sample_rate,
            "steps": ledger.steps,
            "num_samples": self.num_samples,
            "max_grad_norm": self.max_grad_norm,
            "accountant": self.accountant,
            "sampling": "poisson",
            "epsilon_budget": self.epsilon_budget if math.isfinite(self.epsilon_budget) else None,
            "private": self.private(ledger),
            "insecure_seed_ever": self.insecure,
            "segments": [seg._asdict() for seg in ledger.segments],
            "plan_changes": list(self.changes),
            **self.recipe,
        }

    def to_state(self) -> dict:
        """JSON for state.json (∞ budget as null)."""
        state = dataclasses.asdict(self)
        state["epsilon_budget"] = self.epsilon_budget if math.isfinite(self.epsilon_budget) else None
        state["changes"] = list(self.changes)
        return state

    @classmethod
    def from_state(cls, state: dict) -> PrivacyPlan:
        data = dict(state)
        data["epsilon_budget"] = math.inf if data.get("epsilon_budget") is None else float(data["epsilon_budget"])
        data["changes"] = tuple(data.get("changes", ()))
        return cls(**data)

    @classmethod
    def from_card(cls, card: dict) -> PrivacyPlan:
        """The plan of a checkpoint written before plans were stored (its privacy card has the fields)."""
        sigma = float(card["sigma"])
        return cls(
            num_samples=int(card["num_samples"]),
            sample_rate=float(card["sample_rate"]),
            sigma=sigma,
            delta=float(card["delta"]),
            max_grad_norm=float(card["max_grad_norm"]),
            accountant=card["accountant"],
            epsilon_budget=math.inf if card.get("epsilon_budget") is None else float(card["epsilon_budget"]),
            insecure=sigma > 0 and not card.get("private", True),
        )


def training_recipe(config: RunConfig) -> dict:
    """The switches beside (σ, q, T, C) that shaped the weights, for the privacy card.

    None of them changes ε (public data and public weights are not accounted for; EMA and K views
    are post-processing / per-example functions), but a reader of the card must know that the
    weights also depend on public data (``public_data``, ``init_from``): the guarantee covers the
    private training set only.
    """
    t, m, d = config.train, config.model, config.data
    return {
        "augmentation_multiplicity": t.augmentation_multiplicity,
        "ema_decay": t.ema_decay,
        "init_from": m.init_from,
        "public_pull": t.public_pull,
        "public_data": d.public_shards,
        "public_batch_size": t.public_batch_size,
        "public_weight": t.public_weight,
        "frozen_parameters": ",".join(m.freeze),
    }


def plan_privacy(config: RunConfig, num_samples: int) -> PrivacyPlan:
    """The plan of a fresh run: σ (given or calibrated), q = batch_size / N, δ (default 1/N), the ε budget."""
    p, t = config.privacy, config.train
    if t.batch_size > num_samples:
        raise ConfigError(f"train.batch_size {t.batch_size} exceeds the data set size {num_samples} (q must be ≤ 1)")
    q = t.batch_size / num_samples
    delta = p.delta if p.delta is not None else 1.0 / num_samples
    if p.sigma == 0 and p.epsilon is not None:
        raise ConfigError("privacy.sigma = 0 (non-private) cannot meet privacy.epsilon; drop one of them")
    sigma = p.sigma if p.sigma is not None else calibrate_sigma(p.epsilon, q, t.steps, delta, accountant=p.accountant)
    if p.epsilon is not None:
        budget = p.epsilon
    else:
        budget = epsilon(sigma, q, t.steps, delta, accountant=p.accountant) if sigma > 0 else math.inf
    insecure = p.insecure_noise_seed is not None or p.insecure_sampler_seed is not None
    return PrivacyPlan(
        num_samples, q, sigma, delta, p.max_grad_norm, p.accountant, budget, insecure, training_recipe(config)
    )


def resolve_plan(
    config: RunConfig,
    num_samples: int,
    stored: PrivacyPlan | None,
    ledger: Ledger,
    *,
    step: int,
    allow_change: bool = False,
) -> PrivacyPlan:
    """The plan to train under: `config`'s for a fresh run (`stored` None), else the stored one.

    A resume whose config would give a different plan is refused (ConfigError, exit 2) naming the
    keys, unless `allow_change`: then the new values hold from `step` on and the change is recorded.
    """
    wanted = plan_privacy(config, num_samples)
    if stored is None:
        return wanted
    sticky = {"insecure": stored.insecure or wanted.insecure, "recipe": wanted.recipe}
    changed = _differences(stored, wanted)
    if not changed:
        return dataclasses.replace(stored, **sticky)
    if not allow_change:
        listed = "; ".join(f"{key} {old!r} → {new!r} (set by {PLAN_KEYS[key]})" for key, (old, new) in changed.items())
        raise ConfigError(
            f"resuming {config.run_dir} at step {step} would change its privacy plan: {listed}. The ledger's "
            "guarantee is about the stored plan; restore those settings, or pass --allow-privacy-change to "
            "continue with the change recorded as a new ledger segment"
        )
    new = _changed_plan(config, stored, wanted, ledger)
    diff = _differences(stored, new)
    record = {"step": step, "changed": {key: [_finite_or_none(a), _finite_or_none(b)] for key, (a, b) in diff.items()}}
    return dataclasses.replace(new, changes=(*stored.changes, record), **sticky)


def _changed_plan(config: RunConfig, stored: PrivacyPlan, wanted: PrivacyPlan, ledger: Ledger) -> PrivacyPlan:
    """`wanted`, except that the budget stays the stored one unless privacy.epsilon is set explicitly,
    and a calibrated σ is calibrated for the steps left against what is left of the budget."""
    p = config.privacy
    budget = p.epsilon if p.epsilon is not None else stored.epsilon_budget
    sigma = wanted.sigma
    remaining = config.train.steps - ledger.steps
    if p.sigma is None and remaining > 0:
        sigma = ledger.calibrate_sigma(
            budget, sample_rate=wanted.sample_rate, steps=remaining, delta=wanted.delta, accountant=wanted.accountant
        )
    return dataclasses.replace(wanted, sigma=sigma, epsilon_budget=budget)


def _differences(old: PrivacyPlan, new: PrivacyPlan) -> dict[str, tuple[Any, Any]]:
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return a == b or math.isclose(a, b, rel_tol=1e-12)
        return a == b

    return {
        key: (getattr(old, key), getattr(new, key))
        for key in PLAN_KEYS
        if not same(getattr(old, key), getattr(new, key))
    }


def _finite_or_none(value: Any) -> Any:
    """JSON has no ∞: an infinite budget is written as null, as in the card."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
