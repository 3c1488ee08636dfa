"""Privacy audit: ε-lower-bound maths against closed forms and scipy, AUC against scikit-learn, and two
end-to-end audits (a σ = 0 run must leak, a DP run must stay within its ε)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import brentq
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score

from dpcap.data.index import ShardIndex
from dpcap.data.reader import image_transform, read_all
from dpcap.data.tokenizer import CaptionTokenizer
from dpcap.errors import ConfigError, DataError
from dpcap.eval.audit import (
    SECRET_WORDS,
    SecretSpace,
    build_audit_data,
    check_canary_tokens,
    clopper_pearson,
    epsilon_lower_bound,
    exposures,
    load_canary_images,
    make_canaries,
    membership_scores,
    roc_auc,
    roc_curve,
    run_audit,
)
from dpcap.model import create_captioner
from tests.conftest import TINY_CAPTIONER, tiny_run_overrides, write_caption_folder

# ---------------------------------------------------------------- Clopper–Pearson and the ε lower bound


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (17, 200), (199, 200)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int, confidence: float) -> None:
    low, high = clopper_pearson(k, n, confidence=confidence)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert float(low) == pytest.approx(ci.low, abs=1e-10)
    assert float(high) == pytest.approx(ci.high, abs=1e-10)


def test_clopper_pearson_is_vectorised() -> None:
    k = np.array([0, 5, 20])
    low, high = clopper_pearson(k, 20, confidence=0.95)
    for i, ki in enumerate(k):
        ci = binomtest(int(ki), 20).proportion_ci(confidence_level=0.95, method="exact")
        assert (low[i], high[i]) == pytest.approx((ci.low, ci.high), abs=1e-10)


def _randomized_response(eps: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of ε-DP randomized response: say "member" (1) with prob e^ε/(1+e^ε) if in, 1/(1+e^ε) if out."""
    rng = np.random.default_rng(seed)
    p = math.exp(eps) / (1 + math.exp(eps))
    return (rng.random(n) < p).astype(float), (rng.random(n) < 1 - p).astype(float)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_lower_bound_never_exceeds_randomized_response_epsilon(eps: float) -> None:
    members, others = _randomized_response(eps, 20_000, seed=int(10 * eps))
    bound = epsilon_lower_bound(members, others, delta=0.0)["epsilon_lower_bound"]
    assert bound <= eps
    assert bound >= 0.85 * eps  # 20k trials per side: the bound is tight


def _gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of μ-GDP (Dong, Roth & Su 2019): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε."""

    def gap(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

    return brentq(gap, 0.0, 100.0)


def test_lower_bound_below_gaussian_dp_epsilon_and_increasing_with_separation() -> None:
    rng = np.random.default_rng(3)
    n, delta = 5000, 1e-3
    bounds = []
    for mu in (0.5, 1.0, 2.0, 3.0):
        members, others = rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n)
        bound = epsilon_lower_bound(members, others, delta=delta)["epsilon_lower_bound"]
        assert bound <= _gaussian_dp_epsilon(mu, delta)
        bounds.append(bound)
    assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[0] > 0


def test_lower_bound_is_zero_without_separation() -> None:
    scores = np.random.default_rng(0).normal(size=500)
    assert epsilon_lower_bound(scores, scores, delta=1e-5)["epsilon_lower_bound"] == 0.0
    shuffled = np.random.default_rng(1).permutation(scores)
    assert epsilon_lower_bound(scores, shuffled, delta=0.0)["epsilon_lower_bound"] == 0.0
    assert epsilon_lower_bound(np.zeros(50), np.zeros(80), delta=0.0)["epsilon_lower_bound"] == 0.0


@pytest.mark.parametrize("n", [8, 16, 64, 65])
def test_lower_bound_of_perfect_separation_has_closed_form(n: int) -> None:
    # All n inserted far above all n held out: the threshold chosen on ⌊n/2⌋ per side separates the other
    # m = ⌈n/2⌉ per side too, TP = m, FP = 0, so with α = 0.05 TPR_lo = (α/2)^(1/m) and
    # FPR_hi = 1 − (α/2)^(1/m); ε_lb = max(0, log(TPR_lo / FPR_hi)) (δ = 0): 0 for m = 4.
    result = epsilon_lower_bound(np.arange(n) + 10.0 * n, np.arange(n), delta=0.0, confidence=0.95)
    m = n - n // 2
    assert result["bound_canaries"] == {"inserted": m, "held_out": m}
    q = 0.025 ** (1 / m)
    expected = max(0.0, math.log(q / (1 - q)))
    assert result["epsilon_lower_bound"] == pytest.approx(expected, rel=1e-9)
    if expected > 0:
        assert (result["tpr"], result["fpr"]) == (1.0, 0.0)
        assert n <= result["threshold"] <= 10 * n - 1


def test_lower_bound_shrinks_with_delta_and_confidence() -> None:
    members, others = _randomized_response(1.0, 2000, seed=5)
    at = {d: epsilon_lower_bound(members, others, delta=d)["epsilon_lower_bound"] for d in (0.0, 0.05)}
    assert at[0.05] < at[0.0]
    looser = epsilon_lower_bound(members, others, delta=0.0, confidence=0.999)["epsilon_lower_bound"]
    assert looser < at[0.0]


def test_lower_bound_rejects_bad_input() -> None:
    with pytest.raises(DataError):
        epsilon_lower_bound([], [1.0], delta=0.0)
    with pytest.raises(DataError):
        epsilon_lower_bound([np.nan], [1.0], delta=0.0)
    with pytest.raises(ConfigError):
        epsilon_lower_bound([1.0], [0.0], delta=1.5)
    with pytest.raises(ConfigError):
        clopper_pearson(1, 2, confidence=1.0)


# ---------------------------------------------------------------- AUC and ROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members, others = rng.integers(0, 6, 37).astype(float) + 0.7, rng.integers(0, 6, 23).astype(float)
    labels = np.r_[np.ones(37), np.zeros(23)]
    expected = roc_auc_score(labels, np.r_[members, others])
    assert roc_auc(members, others) == pytest.approx(expected, abs=1e-12)
    fpr, tpr = roc_curve(members, others)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_auc_extremes() -> None:
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5


# ---------------------------------------------------------------- canaries, secrets, exposure


def test_secret_words_are_single_tokens_and_captions_distinct() -> None:
    tok = CaptionTokenizer(77)
    assert len(set(SECRET_WORDS)) == len(SECRET_WORDS) == 256
    assert all(len(tok.encode_one(w)) == 3 for w in [*SECRET_WORDS, "canary"])
    assert SecretSpace().size == 256**3
    space = SecretSpace(words=tuple(SECRET_WORDS[:6]), length=3)
    captions = [space.caption(s) for s in range(space.size)]
    assert len(set(captions)) == space.size == 216
    w = SECRET_WORDS
    assert captions[0] == f"canary {w[0]} {w[0]} {w[0]}" and captions[1] == f"canary {w[0]} {w[0]} {w[1]}"
    assert captions[6 * 2 + 5] == f"canary {w[0]} {w[2]} {w[5]}"  # base-6 digits, most significant first
    others = SecretSpace().others(5, 200, np.random.default_rng(0))
    assert len(set(others.tolist())) == 200 and 5 not in others.tolist()
    assert others.min() >= 0 and others.max() < SecretSpace().size
    small = space.others(3, space.size - 1, np.random.default_rng(1))
    assert sorted(small.tolist()) == [s for s in range(space.size) if s != 3]  # all but the secret
    with pytest.raises(ConfigError):
        space.others(3, space.size, np.random.default_rng(1))


def test_make_canaries_is_seeded_and_flips_independent_coins(tmp_path: Path) -> None:
    def make(root: Path, seed: int) -> list:
        gens = np.random.SeedSequence(seed).spawn(2)
        return make_canaries(
            root, 40, image_size=16, space=SecretSpace(), rng=np.random.default_rng(gens[0]),
            coins=np.random.default_rng(gens[1]),
        )  # fmt: skip

    a, b, c = make(tmp_path / "a", 0), make(tmp_path / "b", 0), make(tmp_path / "c", 1)
    assert [(x.secret, x.inserted) for x in a] == [(x.secret, x.inserted) for x in b]
    assert [x.secret for x in a] != [x.secret for x in c]
    assert len({x.secret for x in a}) == 40
    assert 0 < sum(x.inserted for x in a) < 40
    first = np.asarray(Image.open(a[0].image))
    assert first.shape == (16, 16, 3)
    assert np.array_equal(first, np.asarray(Image.open(b[0].image)))
    with pytest.raises(ConfigError):
        make_canaries(tmp_path / "d", 1, image_size=16, space=SecretSpace(), rng=None, coins=None)


def test_build_audit_data_adds_only_inserted_canaries(tmp_path: Path, tiny_shards: Path) -> None:
    gens = np.random.SeedSequence(4).spawn(2)
    canaries = make_canaries(
        tmp_path / "canaries", 12, image_size=16, space=SecretSpace(), rng=np.random.default_rng(gens[0]),
        coins=np.random.default_rng(gens[1]),
    )  # fmt: skip
    summary = build_audit_data(tiny_shards, canaries, tmp_path / "data")
    inserted = sum(c.inserted for c in canaries)
    base = len(ShardIndex(tiny_shards))
    assert summary["base_samples"] == base and summary["written"] == base + inserted
    _, meta = read_all(summary["out"], lambda im: torch.zeros(1))
    _, base_meta = read_all(tiny_shards, lambda im: torch.zeros(1))
    assert [m["caption"] for m in meta[:base]] == [m["caption"] for m in base_meta]
    assert [m["colour"] for m in meta[:base]] == [m["colour"] for m in base_meta]
    captions = {m["caption"] for m in meta[base:]}
    assert captions == {c.caption for c in canaries if c.inserted}
    assert not captions & {c.caption for c in canaries if not c.inserted}


class _Oracle(torch.nn.Module):
    """Caption log-likelihood that prefers one secret's tokens (or none): exposure is then known exactly."""

    def __init__(self, favourite: torch.Tensor | None) -> None:
        super().__init__()
        self.favourite = favourite

    def caption_logprob(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.favourite is None:
            return torch.zeros(tokens.shape[0])
        return (tokens == self.favourite).all(dim=1).float()


def test_exposure_is_log2_candidates_for_a_memorised_secret_and_zero_for_ties(tmp_path: Path) -> None:
    space, tok = SecretSpace(), CaptionTokenizer(12)
    gens = np.random.SeedSequence(2).spawn(2)
    canaries = make_canaries(
        tmp_path, 3, image_size=8, space=space, rng=np.random.default_rng(gens[0]), coins=np.random.default_rng(gens[1])
    )
    images = torch.zeros(3, 3, 8, 8)
    favourite = tok([canaries[0].caption])[0]
    got = exposures(_Oracle(favourite), images, canaries, space, tok, candidates=64, rng=np.random.default_rng(0))
    assert got[0] == pytest.approx(6.0)  # log2 64: rank 1
    assert got[1:] == pytest.approx([0.0, 0.0])  # tied with all 63 others: rank 64
    flat = exposures(_Oracle(None), images, canaries, space, tok, candidates=8, rng=np.random.default_rng(0))
    assert flat == pytest.approx([0.0, 0.0, 0.0])


def test_membership_scores_are_minus_per_sample_loss_in_any_chunking(tmp_path: Path) -> None:
    model = create_captioner("nano", seed=0, **TINY_CAPTIONER).eval()
    tok = CaptionTokenizer(12)
    gens = np.random.SeedSequence(3).spawn(2)
    canaries = make_canaries(
        tmp_path, 5, image_size=16, space=SecretSpace(), rng=np.random.default_rng(gens[0]),
        coins=np.random.default_rng(gens[1]),
    )  # fmt: skip
    images = load_canary_images(canaries, image_transform(16, (0.5,) * 3, (0.5,) * 3))
    tokens = check_canary_tokens(tok, [c.caption for c in canaries])
    with torch.no_grad():
        expected = [-float(model.per_sample_loss(images[i : i + 1], tokens[i : i + 1])) for i in range(5)]
    assert membership_scores(model, images, tokens, batch_size=2) == pytest.approx(expected, abs=1e-5)
    assert images.shape == (5, 3, 16, 16)
    pixels = np.asarray(Image.open(canaries[0].image), dtype=np.float32) / 255
    assert images[0].permute(1, 2, 0).numpy() == pytest.approx((pixels - 0.5) / 0.5, abs=1e-5)


def test_short_context_is_refused() -> None:
    with pytest.raises(ConfigError, match="context_length"):
        check_canary_tokens(CaptionTokenizer(5), [SecretSpace().caption(7)])


def test_audit_refuses_a_used_output_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    with pytest.raises(DataError, match="not an empty folder"):
        run_audit(None, [], out_dir=tmp_path / "out")


# ---------------------------------------------------------------- end to end

AUDIT_CANARIES = 32
AUDIT_CANDIDATES = 16


def _audit_overrides(**extra: object) -> list[str]:
    base = {
        "train.steps": 10,
        "train.batch_size": 16,
        "train.micro_batch_size": 32,
        "train.lr": 0.03,
        "train.warmup_steps": 1,
        "train.checkpoint_every": 1000,
        "privacy.insecure_noise_seed": 7,
        "privacy.insecure_sampler_seed": 11,
        "log.wandb": "disabled",
        "log.progress": False,
    }
    return tiny_run_overrides({**base, **extra})


def _audit(tmp_path: Path, **extra: object) -> dict:
    manifest = write_caption_folder(tmp_path / "src", count=16)
    return run_audit(
        None,
        _audit_overrides(**extra),
        out_dir=tmp_path / "audit",
        canaries=AUDIT_CANARIES,
        seed=0,
        base_source=manifest,
        candidates=AUDIT_CANDIDATES,
    )


def _check_report_files(out: Path, report: dict) -> None:
    saved = json.loads((out / "report.json").read_text())
    assert saved["auc"] == report["auc"]
    per_canary = json.loads((out / "canaries.json").read_text())
    labels = [c["inserted"] for c in per_canary]
    assert roc_auc_score(labels, [c["score"] for c in per_canary]) == pytest.approx(report["auc"], abs=1e-12)
    assert report["canaries"] == {"inserted": sum(labels), "held_out": len(labels) - sum(labels)}
    assert report["num_samples"] == report["base_samples"] + sum(labels) == 16 + sum(labels)
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_nonprivate_run_leaks_canaries(tmp_path: Path) -> None:
    report = _audit(tmp_path, **{"privacy.sigma": 0})
    _check_report_files(tmp_path / "audit", report)
    assert report["private"] is False and report["epsilon"] is None and report["sigma"] == 0
    assert report["auc"] >= 0.8
    assert report["exposure"]["inserted"] - report["exposure"]["held_out"] >= 1.0  # bits
    assert report["epsilon_lower_bound"] > 0


@pytest.mark.slow
def test_dp_run_stays_within_its_epsilon(tmp_path: Path) -> None:
    report = _audit(tmp_path, **{"privacy.epsilon": 1.0})
    _check_report_files(tmp_path / "audit", report)
    assert report["sigma"] > 1 and report["epsilon"] <= 1.0 + 1e-6
    assert report["epsilon_lower_bound"] <= report["epsilon"]
    # 32 canaries: the AUC of a chance attacker has standard deviation ≈ 0.1 around 0.5.
    assert abs(report["auc"] - 0.5) <= 0.3
